r"""The checks to run when a GPU or TPU is lent (scripts/device_check.sh), in one process:

  a. kernel:      the Pallas attention kernels (same_group, other_group, packed masks of the
                  sorted layout) forward and dq/dk/dv against the dense XLA oracle at L = 1024
                  (compiled on the accelerator: interpret mode only on CPU);
  b. train_step:  one PGM train step (configs/owt.py:pgm_6_6, L = 1024) with attention
                  xla / pallas (unsorted) / pallas + sorted layout, timed in the same run;
  c. block_sweep: forward + backward time of the kernels for each block size;
  d. sampler:     the sampler bench at the paper setting (configs/bench.py:paper: B 32,
                  L 1024, S 128; 3 timed runs instead of 10, to fit the time);
  e. mfu:         each train step of (b) as MFU (`Family.train_flops` over the step time and
                  the chip's peak, pgm_jax/core/throughput.py) and tokens/s per chip.

Writes OUT/device_check.json and OUT/device_check.md (the device kind named), rewritten after
every section so that a run cut short still leaves what it measured. A section that fails is
recorded with its error and the others still run; once --budget_s is spent the rest are
recorded as skipped. Exit status 1 when a section failed or a kernel error is over tolerance.

  python scripts/device_check.py --out=/tmp/device_check             # on a GPU / TPU
  python scripts/device_check.py --smoke --out=/tmp/device_check     # CPU, tiny, ~1 minute
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_attention  # noqa: E402  (scripts/: masks, rel_err, timeit)
import bench_train_step  # noqa: E402  (scripts/: load_config)
from pgm_jax.core import throughput  # noqa: E402
from pgm_jax.ops import partition_attention  # noqa: E402
from pgm_jax.ops import pallas_attention as pa  # noqa: E402

# Relative (Frobenius) error vs the dense oracle, float32 inputs. Accelerators: the
# kernels' and XLA's matmuls may run at reduced precision (TF32 / bf16 passes).
TOLERANCE = {"cpu": {"fwd": 1e-4, "grad": 1e-4}, "accelerator": {"fwd": 2e-2, "grad": 2e-2}}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT") or "device_check_out")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes for a CPU end-to-end check (interpret mode); the numbers "
                      "mean nothing")
  p.add_argument("--sections", default="kernel,train_step,block_sweep,sampler,mfu")
  p.add_argument("--budget_s", type=float, default=420.0,
                 help="no section starts after this many seconds")
  p.add_argument("--seq_len", type=int, default=None, help="attention L (default 1024)")
  p.add_argument("--batch", type=int, default=None, help="attention batch (default 4)")
  p.add_argument("--heads", type=int, default=None, help="attention heads (default 12)")
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--blocks", default=None, help="block sizes to sweep (default 64,128,256)")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--train_config", default=None,
                 help="configs/<file>:<preset> (default owt.py:pgm_6_6)")
  p.add_argument("--train_batch", type=int, default=None, help="train step global batch")
  p.add_argument("--bench_config", default=None,
                 help="configs/bench.py preset (default paper)")
  args = p.parse_args(argv)
  small = args.smoke
  defaults = dict(seq_len=128 if small else 1024, batch=1 if small else 4,
                  heads=2 if small else 12, blocks="32,64" if small else "64,128,256",
                  repeats=1 if small else 5,
                  train_config="shakespeare.py:tiny" if small else "owt.py:pgm_6_6",
                  train_batch=4 if small else 8,
                  bench_config="cpu,runlocal" if small else "paper")
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if small:
    args.head_dim = min(args.head_dim, 32)
  return args


def _inputs(args, seed: int = 0):
  rng = np.random.default_rng(seed)
  b, length, h, d = args.batch, args.seq_len, args.heads, args.head_dim
  t_B = rng.random(b)  # the training partition: group 1 w.p. t ~ U(0, 1) per example
  groups = jnp.asarray((rng.random((b, length)) < t_B[:, None]).astype(np.int32))
  q, k, v, ct = (jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32) for _ in range(4))
  return groups, q, k, v, ct


def _fns(mask, ct, impl: str, block: int):
  op = functools.partial(partition_attention, impl=impl, block_q=block, block_kv=block)
  fwd = jax.jit(lambda q, k, v: op(q, k, v, mask))
  loss = lambda q, k, v: jnp.sum(op(q, k, v, mask).astype(jnp.float32) * ct)
  return fwd, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check_kernel(args, on_cpu: bool) -> dict:
  """(a) pallas vs the dense oracle, forward and gradients, every mask kind."""
  groups, q, k, v, ct = _inputs(args)
  block = 64 if args.smoke else 128
  tol = TOLERANCE["cpu" if on_cpu else "accelerator"]
  rows, ok = {}, True
  for kind, mask in bench_attention.masks(groups, args.seq_len).items():
    out, grads = {}, {}
    for impl in ("xla", "pallas"):
      fwd, fb = _fns(mask, ct, impl, block)
      out[impl] = fwd(q, k, v)
      grads[impl] = fb(q, k, v)[1]
    fwd_err = bench_attention.rel_err(out["pallas"], out["xla"])
    grad_err = {f"d{n}": bench_attention.rel_err(a, r)
                for n, a, r in zip("qkv", grads["pallas"], grads["xla"])}
    passed = fwd_err < tol["fwd"] and max(grad_err.values()) < tol["grad"]
    ok &= passed
    rows[kind] = {"fwd_rel_err": fwd_err, **{f"{n}_rel_err": e for n, e in grad_err.items()},
                  "pass": passed}
  return {"ok": ok, "seq_len": args.seq_len, "batch": args.batch, "heads": args.heads,
          "head_dim": args.head_dim, "block": block, "dtype": "float32",
          "interpret": on_cpu, "tolerance": tol, "masks": rows}


def block_sweep(args) -> dict:
  """(c) forward + backward time of the kernels per block size (and xla once)."""
  groups, q, k, v, ct = _inputs(args, seed=1)
  rows = {}
  kinds = ("other_group",) if args.smoke else ("same_group", "other_group")
  for kind, mask in bench_attention.masks(groups, args.seq_len).items():
    if kind not in kinds:
      continue
    row = {"xla_fwd_bwd_ms": 1e3 * bench_attention.timeit(_fns(mask, ct, "xla", 128)[1], q, k,
                                                          v, repeats=args.repeats)}
    for block in (int(b) for b in args.blocks.split(",")):
      try:
        counts = pa.block_counts(mask, args.batch, args.seq_len, args.seq_len, block_q=block,
                                 block_kv=block)
        ms = 1e3 * bench_attention.timeit(_fns(mask, ct, "pallas", block)[1], q, k, v,
                                          repeats=args.repeats)
        row[f"block_{block}"] = {"fwd_bwd_ms": ms, "computed_fraction": counts["fraction"]}
      except Exception as e:  # pylint: disable=broad-except  (a block the backend refuses)
        row[f"block_{block}"] = {"error": _one_line(e)}
    rows[kind] = row
  return {"ok": True, "seq_len": args.seq_len, "batch": args.batch, "heads": args.heads,
          "head_dim": args.head_dim, "masks": rows}


def _train_config(args, impl: str, sorted_layout: bool):
  config = bench_train_step.load_config(args.train_config)
  config.attn.impl = impl
  config.attn.sorted_layout = sorted_layout
  return config


TRAIN_VARIANTS = (("xla", "xla", False), ("pallas", "pallas", False),
                  ("pallas_sorted", "pallas", True))


def train_steps(args) -> dict:
  """(b) one train step per attention variant, timed in interleaved rounds."""
  from pgm_jax.tools import bench  # pylint: disable=g-import-not-at-top
  configs = {name: _train_config(args, impl, s) for name, impl, s in TRAIN_VARIANTS}
  steps = 1 if args.smoke else 10
  rows = bench.time_train_steps(configs, args.train_batch, steps=steps, warmup=1)
  base = rows["xla"]["step_seconds"]
  for name, row in rows.items():
    row["speedup_vs_xla"] = base / row["step_seconds"]
  config = configs["xla"]
  return {"ok": True, "config": args.train_config, "model": config.model.kind,
          "batch": args.train_batch, "seq_len": int(config.data.seq_len),
          "dtype": config.model.dtype, "steps_timed": steps, "variants": rows}


def mfu(args, train: dict | None) -> dict:
  """(e) the train steps of (b) as MFU and tokens/s per chip."""
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  if not train or not train.get("variants"):
    raise RuntimeError("needs the train_step section's timings")
  config = _train_config(args, "xla", False)
  config.train.batch_size, config.train.grad_accum_steps = args.train_batch, 1
  setup = experiment.make_setup(config)
  flops = setup.family.train_flops(setup.model_cfg, setup.abstract_state.params,
                                   args.train_batch, int(config.data.seq_len))["total"]
  kind = jax.devices()[0].device_kind
  peak = throughput.peak_flops_per_chip(kind)
  chips = setup.mesh.size
  rows = {}
  for name, row in train["variants"].items():
    rate = 1.0 / row["step_seconds"]
    rows[name] = {"tokens_per_s_per_chip": row["tokens_per_s"] / chips,
                  "mfu": None if peak is None else throughput.mfu(flops, rate, peak, chips)}
  return {"ok": True, "model_flops_per_step": flops, "peak_flops_per_chip": peak,
          "num_chips": chips,
          "note": None if peak is not None else f"no peak known for {kind!r}: mfu left out",
          "variants": rows}


def sampler(args, out_dir: str) -> dict:
  """(d) --mode=bench at the paper setting (3 timed runs)."""
  from pgm_jax.tools import bench  # pylint: disable=g-import-not-at-top
  config = bench_train_step.load_config(f"bench.py:{args.bench_config.replace(',', '+')}")
  if args.smoke:  # fewer sampler programs to compile
    config.bench.seq_len, config.bench.steps = 16, 2
  else:
    config.bench.repeats, config.bench.warmup = 3, 1
  workdir = os.path.join(out_dir, "sampler_bench")
  report = bench.run_bench(config, workdir)
  return {"ok": True, "preset": args.bench_config, "bench_json": workdir + "/bench.json",
          "report": report}


def _one_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def device_info() -> dict:
  devices = jax.devices()
  kind = devices[0].device_kind
  return {"device_kind": kind, "backend": jax.default_backend(), "num_devices": len(devices),
          "jax": jax.__version__, "host": platform.node(),
          "peak_flops_per_chip": throughput.peak_flops_per_chip(kind)}


def to_markdown(summary: dict) -> str:
  d = summary["device"]
  lines = [f"# Device check: {d['device_kind']} x{d['num_devices']} ({d['backend']})", "",
           f"jax {d['jax']}; smoke={summary['smoke']}; total {summary['seconds']:.0f} s", ""]
  s = summary["sections"]
  for name, sec in s.items():
    status = sec.get("status")
    lines.append(f"## {name}: {status} ({sec.get('seconds', 0):.1f} s)")
    if status != "ok":
      lines += ["", f"    {sec.get('error', '')}", ""]
      continue
    if name == "kernel":
      lines += ["", f"L={sec['seq_len']} B={sec['batch']} H={sec['heads']} D={sec['head_dim']} "
                    f"block={sec['block']} float32, interpret={sec['interpret']}", "",
                "| mask | fwd err | dq err | dk err | dv err | pass |", "|---|---|---|---|---|---|"]
      for kind, r in sec["masks"].items():
        lines.append(f"| {kind} | {r['fwd_rel_err']:.2e} | {r['dq_rel_err']:.2e} | "
                     f"{r['dk_rel_err']:.2e} | {r['dv_rel_err']:.2e} | {r['pass']} |")
    elif name == "train_step":
      lines += ["", f"{sec['config']} ({sec['model']}), B={sec['batch']} L={sec['seq_len']} "
                    f"{sec['dtype']}", "", "| attention | ms / step | tokens/s | x xla |",
                "|---|---|---|---|"]
      for v, r in sec["variants"].items():
        lines.append(f"| {v} | {r['step_seconds'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_xla']:.2f} |")
    elif name == "block_sweep":
      for kind, r in sec["masks"].items():
        cells = [f"xla {r['xla_fwd_bwd_ms']:.2f} ms"] + [
            f"{k}: " + (f"{v['fwd_bwd_ms']:.2f} ms ({v['computed_fraction']:.2f} of blocks)"
                        if "fwd_bwd_ms" in v else v["error"])
            for k, v in r.items() if k.startswith("block_")]
        lines.append(f"- {kind} (fwd+bwd): " + "; ".join(cells))
    elif name == "mfu":
      lines += ["", f"model FLOPs / step {sec['model_flops_per_step']:.4g}; peak "
                    f"{sec['peak_flops_per_chip']} FLOP/s per chip x {sec['num_chips']}", "",
                "| attention | MFU | tokens/s/chip |", "|---|---|---|"]
      for v, r in sec["variants"].items():
        m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {v} | {m} | {r['tokens_per_s_per_chip']:.0f} |")
    elif name == "sampler":
      lines += ["", f"preset {sec['preset']}: {sec['bench_json']}"]
      report = sec["report"]
      if "mdlm" in report:
        lines.append(f"- mdlm: {report['mdlm']['tokens_per_s']:.0f} tokens/s")
      for variant in report.get("variants", []):
        lines.append(f"- {variant['name']}: {variant['pgm']['tokens_per_s']:.0f} tokens/s, "
                     f"{variant['throughput_ratio']:.2f}x MDLM's throughput, "
                     f"{variant['flop_ratio']:.2f}x fewer FLOPs")
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = parse_args(argv)
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  os.makedirs(args.out, exist_ok=True)
  on_cpu = jax.default_backend() == "cpu"
  start = time.time()
  summary = {"device": device_info(), "smoke": args.smoke, "args": vars(args),
             "sections": {}, "seconds": 0.0}
  if on_cpu and not args.smoke:
    print("NOTE: CPU backend: the kernels run in interpret mode; timings mean nothing.")

  def write():
    summary["seconds"] = time.time() - start
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
      json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(args.out, "device_check.md"), "w") as f:
      f.write(to_markdown(summary))

  runners = {
      "kernel": lambda: check_kernel(args, on_cpu),
      "train_step": lambda: train_steps(args),
      "block_sweep": lambda: block_sweep(args),
      "sampler": lambda: sampler(args, args.out),
      "mfu": lambda: mfu(args, summary["sections"].get("train_step")),
  }
  failed = False
  for name in args.sections.split(","):
    if name not in runners:
      raise SystemExit(f"--sections: unknown section {name!r}; use {sorted(runners)}")
    if time.time() - start > args.budget_s:
      summary["sections"][name] = {"status": "skipped", "error": f"--budget_s={args.budget_s} "
                                                                 f"spent", "seconds": 0.0}
      write()
      continue
    print(f"== {name}", flush=True)
    t0 = time.time()
    try:
      result = runners[name]()
      result["status"] = "ok" if result.pop("ok") else "FAILED (over tolerance)"
    except Exception as e:  # pylint: disable=broad-except  (record it, run the rest)
      traceback.print_exc()
      result = {"status": "error", "error": _one_line(e)}
    result["seconds"] = time.time() - t0
    failed |= result["status"] != "ok"
    summary["sections"][name] = result
    write()
    print(f"== {name}: {result['status']} ({result['seconds']:.1f} s)", flush=True)
  write()
  print(to_markdown(summary))
  print(f"Written: {os.path.join(args.out, 'device_check.json')} and device_check.md")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
