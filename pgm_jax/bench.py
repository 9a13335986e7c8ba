"""--mode=bench: sampling throughput and FLOPs, PGM (efficient-uniform) vs MDLM (ddpm_cache).

Everything is measured in one process and one run, with the same batch, steps and
length for every model:
  * tokens/s: the median of `bench.repeats` timed runs after `bench.warmup` untimed
    runs, each synchronised with the device (results fetched to host);
  * FLOPs per generated sequence: XLA cost analysis of the programs as executed
    (padding included), and the same count without padding ("exact"), whose ratio
    is the bucketing overhead;
  * compiles: programs traced during the first (warm-up) run.
Weights are random unless `bench.pgm_workdir` / `bench.mdlm_workdir` name checkpoints
(speed does not depend on the weights; MDLM's cache hits depend only on the reveal
process). With `bench.flops_only` nothing runs: paper-size FLOPs on a CPU.
"""
import json
import os
import statistics

import jax
import jax.numpy as jnp
from absl import logging

from pgm_jax import checkpointing, fileio, samplers
from pgm_jax.data import tokenizers
from pgm_jax.models import ModelConfig, build_model


def _model(kind, dims, tokenizer, config):
  cfg = ModelConfig(kind=kind, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                    hidden=dims["hidden"], num_heads=dims["num_heads"],
                    cond_dim=dims.get("cond_dim", config.model.cond_dim),
                    num_layers=dims.get("num_layers", 12),
                    enc_layers=dims.get("enc_layers", 6), dec_layers=dims.get("dec_layers", 6),
                    query_mode=dims.get("query_mode", config.model.query_mode), dropout=0.0,
                    dtype=config.model.dtype, attn_impl=config.attn.impl)
  return build_model(cfg)


def _params(model, kind, workdir, *, abstract: bool, seed: int):
  tokens = jnp.zeros((1, 8), jnp.int32)
  args = (tokens, tokens) if kind == "pgm" else (tokens,)
  init = lambda r: jax.tree.map(lambda x: getattr(x, "value", x),
                                model.init(r, *args)["params"],
                                is_leaf=lambda x: hasattr(x, "value"))
  if abstract:
    return jax.eval_shape(init, jax.random.key(seed))
  if workdir:
    target = jax.eval_shape(init, jax.random.key(seed))
    return checkpointing.restore_params(workdir, target, key="ema_params")
  return jax.jit(init)(jax.random.key(seed))


def _measure(run, *, warmup: int, repeats: int, flops_only: bool):
  """run(measure) -> SampleResult. Returns (first result, median seconds or None)."""
  first = run(True)
  if flops_only:
    return first, None
  for _ in range(max(warmup - 1, 0)):
    run(False)
  times = [run(False).seconds for _ in range(repeats)]
  return first, statistics.median(times)


def run_bench(config, workdir: str) -> dict:
  b = config.bench
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir)
  tokenizer = tokenizers.get_tokenizer(config.data)
  length, steps, batch = b.seq_len, b.steps, b.batch_size
  if length < 3:
    raise ValueError(f"config.bench.seq_len={length} must be >= 3")
  if not 1 <= steps <= length - 1:
    raise ValueError(f"config.bench.steps={steps} must be in [1, config.bench.seq_len - 1]")
  for key in ("batch_size", "repeats"):
    if b[key] < 1:
      raise ValueError(f"config.bench.{key}={b[key]} must be >= 1")
  if b.warmup < 0:
    raise ValueError(f"config.bench.warmup={b.warmup} must be >= 0")
  prompt = samplers.unconditional_prompt(batch, length, tokenizer.bos_id)
  common = dict(steps=steps, seed=config.sample.seed, mask_id=tokenizer.mask_id)
  tokens_per_run = batch * (length - 1)
  rows = {}

  def entry(result, seconds):
    e = {"tokens_per_s": None if seconds is None else tokens_per_run / seconds,
         "seconds_per_run": seconds, "flops_per_seq": result.flops_per_seq,
         "compiles": result.compiles, "passes": result.passes}
    if result.exact_flops_per_seq:
      e["exact_flops_per_seq"] = result.exact_flops_per_seq
      e["padding_overhead"] = result.flops_per_seq / result.exact_flops_per_seq - 1.0
    return e

  mdlm = _model("mdlm", dict(b.mdlm), tokenizer, config)
  mdlm_params = _params(mdlm, "mdlm", b.get("mdlm_workdir"), abstract=b.flops_only, seed=0)
  logging.info("bench: MDLM ddpm_cache, B=%d L=%d S=%d", batch, length, steps)
  result, seconds = _measure(
      lambda m: samplers.mdlm_sample(mdlm_params, prompt, model=mdlm, sampler="ddpm_cache",
                                     measure_flops=m, execute=not b.flops_only, **common),
      warmup=b.warmup, repeats=b.repeats, flops_only=b.flops_only)
  rows["mdlm"] = entry(result, seconds)

  variants = []
  for dims in b.pgm:
    dims = dict(dims)
    name = dims.pop("name", "pgm")
    model = _model("pgm", dims, tokenizer, config)
    params = _params(model, "pgm", b.get("pgm_workdir"), abstract=b.flops_only, seed=1)
    logging.info("bench: PGM %s efficient-uniform", name)
    result, seconds = _measure(
        lambda m: samplers.pgm_sample(params, prompt, model=model, sampler="efficient-uniform",
                                      bucket_size=config.sample.bucket_size,
                                      measure_flops=m, exact_flops=m and b.exact_flops,
                                      execute=not b.flops_only, **common),
        warmup=b.warmup, repeats=b.repeats, flops_only=b.flops_only)
    pgm = entry(result, seconds)
    variant = {"name": name, "pgm": pgm,
               "flop_ratio": rows["mdlm"]["flops_per_seq"] / pgm["flops_per_seq"],
               "exact_flop_ratio": (rows["mdlm"]["flops_per_seq"] / pgm["exact_flops_per_seq"]
                                    if "exact_flops_per_seq" in pgm else None),
               "throughput_ratio": (None if seconds is None
                                    else pgm["tokens_per_s"] / rows["mdlm"]["tokens_per_s"])}
    variants.append(variant)

  report = {
      "setting": {"name": b.setting, "batch_size": batch, "seq_len": length, "steps": steps,
                  "vocab_size": tokenizer.vocab_size, "device": jax.devices()[0].device_kind,
                  "backend": jax.default_backend(), "flops_only": bool(b.flops_only),
                  "bucket_size": config.sample.bucket_size or max(8, length // 16),
                  "weights": {"pgm": b.get("pgm_workdir") or "random",
                              "mdlm": b.get("mdlm_workdir") or "random"}},
      "mdlm": rows["mdlm"],
      "pgm": variants[0]["pgm"],
      "throughput_ratio": variants[0]["throughput_ratio"],
      "flop_ratio": variants[0]["flop_ratio"],
      "variants": variants,
  }
  print(format_table(report))
  if jax.process_index() == 0:
    fileio.atomic_write_text(os.path.join(workdir, "bench.json"), json.dumps(report, indent=2))
  return report


def format_table(report: dict) -> str:
  s = report["setting"]
  lines = [f"bench {s['name']}: B={s['batch_size']} L={s['seq_len']} S={s['steps']} "
           f"V={s['vocab_size']} on {s['backend']} ({s['device']})",
           f"{'model':<18}{'tokens/s':>12}{'GFLOP/seq':>12}{'pad ovh':>9}{'compiles':>9}"
           f"{'passes':>8}{'thru x':>8}{'FLOP x':>8}{'exact x':>8}"]

  def row(name, e, thru=None, flop=None, exact=None):
    tps = "-" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:.1f}"
    ovh = f"{100 * e['padding_overhead']:.1f}%" if "padding_overhead" in e else "-"
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    lines.append(f"{name:<18}{tps:>12}{e['flops_per_seq'] / 1e9:>12.2f}{ovh:>9}"
                 f"{e['compiles']:>9}{e['passes']:>8}{fmt(thru):>8}{fmt(flop):>8}"
                 f"{fmt(exact):>8}")

  row("mdlm ddpm_cache", report["mdlm"])
  for v in report["variants"]:
    row(f"{v['name']}", v["pgm"], v["throughput_ratio"], v["flop_ratio"],
        v["exact_flop_ratio"])
  lines.append("thru x = PGM tokens/s / MDLM tokens/s;  FLOP x = MDLM FLOPs / PGM FLOPs "
               "(as executed);  exact x = the same without PGM padding")
  return "\n".join(lines)

