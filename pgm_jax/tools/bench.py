"""--mode=bench: sampling throughput and FLOPs, PGM (efficient-uniform) vs MDLM (ddpm_cache),
and, when `bench.ar` / `bench.pgm_block` are set, AR with its KV cache and the block PGM
(block-efficient, its KV cache). (Image configs: PGM vs MaskGIT, see bench_images.py.)

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
`confidence-threshold` is not benched: its passes depend on the weights (random here) and
it cannot be costed without running; `--mode=sample` / gen PPL report its mean passes.
"""
import copy
import json
import os
import statistics
import time

import jax
import numpy as np
from absl import logging
import ml_collections
from ml_collections.config_dict import placeholder

from pgm_jax import families, samplers
from pgm_jax.core import checkpointing, fileio
from pgm_jax.data import tokenizers
from pgm_jax.samplers import common as sampler_common
from pgm_jax.models import ModelConfig


def config_defaults(images: bool = False) -> ml_collections.ConfigDict:
  """`config.bench`: the options of --mode=bench (a config file adds this section with
  `pgm_jax.tools.with_tool_configs`); `images`: the image bench's keys too (PGM vs
  MaskGIT, `bench_images.py`)."""
  c = ml_collections.ConfigDict()
  c.what = "sample"                 # sample: samplers' tokens/s and FLOPs | train: the jitted
                                    # train step's tokens/s (PGM vs MDLM vs AR) | all: both
  c.setting = "cpu"
  c.batch_size = 8
  c.seq_len = 128
  c.steps = 32
  c.repeats = 5                     # timed runs (median reported), after warmup runs
  c.warmup = 1
  c.flops_only = False              # True: cost analysis only, nothing is executed
  c.exact_flops = True              # also count the unpadded FLOPs (padding overhead)
  c.mdlm = ml_collections.ConfigDict(dict(hidden=128, num_heads=2, num_layers=4))
  c.pgm = (dict(name="pgm_2_2", hidden=128, num_heads=2, enc_layers=2, dec_layers=2),)
  c.ar = ml_collections.ConfigDict(dict(hidden=128, num_heads=2, num_layers=4))  # {} = no row
  c.pgm_block = (dict(name="pgm_block_2_2_b16", hidden=128, num_heads=2, enc_layers=2,
                      dec_layers=2, block_len=16),)   # () = no block PGM rows
  c.pgm_workdir = placeholder(str)         # restore the PGM's EMA weights from here
  c.mdlm_workdir = placeholder(str)        # restore the MDLM's EMA weights from here
  if images:
    c.sampler = "auto"                # the sampler both models run
    c.latency_batch_size = 1          # latency at batch 1, images/s at bench.batch_size
    c.maskgit = ml_collections.ConfigDict(dict(hidden=128, num_heads=2, num_layers=4))
  return c


def _model(kind, dims, tokenizer, config):
  family_config = copy.deepcopy(config)  # the family's own fields (AR: causal; block_len)
  family_config.model.block_len = int(dims.get("block_len", 0))
  fields = dict(hidden=dims["hidden"], num_heads=dims["num_heads"],
                cond_dim=dims.get("cond_dim", config.model.cond_dim),
                num_layers=dims.get("num_layers", 12),
                enc_layers=dims.get("enc_layers", 6), dec_layers=dims.get("dec_layers", 6),
                query_mode=dims.get("query_mode", config.model.query_mode), dropout=0.0,
                dtype=config.model.dtype, attn_impl=config.attn.impl)
  fields.update(families.get(kind).model_config_fields(
      family_config, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id))
  fields["cond_dim"] = dims.get("cond_dim", config.model.cond_dim)
  cfg = ModelConfig(kind=kind, mask_id=tokenizer.mask_id, **fields)
  return families.build_model(cfg)


def _params(model, kind, workdir, *, abstract: bool, seed: int):
  init = lambda r: families.get(kind).init_params(model, r)
  if abstract:
    return jax.eval_shape(init, jax.random.key(seed))
  if workdir:
    target = jax.eval_shape(init, jax.random.key(seed))
    return checkpointing.restore_params(workdir, target, key="ema_params")
  return jax.jit(init)(jax.random.key(seed))


BENCH_WHAT = ("sample", "train", "all")


class _TrainStepTimer:
  """One model's jitted train step on a fixed random batch, ready to be timed."""

  def __init__(self, config, batch_size: int):
    from pgm_jax import experiment, train  # pylint: disable=g-import-not-at-top
    from pgm_jax.core import sharding
    config.train.batch_size = batch_size
    config.train.grad_accum_steps = 1
    setup = experiment.make_setup(config)
    self.state = experiment.init_state(setup, jax.random.key(0))
    self.step_fn = train.make_train_step(setup)
    self.rng = jax.jit(lambda: jax.random.key(1),
                       out_shardings=sharding.replicated(setup.mesh))()
    tokens = np.random.default_rng(0).integers(
        0, setup.tokenizer.vocab_size - 1, (batch_size, config.data.seq_len)).astype(np.int32)
    tokens[tokens == setup.mask_id] = 0
    self.batch = sharding.global_batch(
        {"tokens": tokens, "valid": np.ones_like(tokens, bool)}, setup.batch_sharding)
    self.tokens_per_step = batch_size * config.data.seq_len
    self.params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
    self.metrics, self.times = None, []

  def step(self, timed: bool) -> None:
    """One step, synchronised (the state is donated: the next step waits for it anyway)."""
    start = time.perf_counter()
    self.state, self.metrics = self.step_fn(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, self.metrics))
    if timed:
      self.times.append(time.perf_counter() - start)

  def result(self) -> dict:
    mean = statistics.mean(self.times)
    return {"step_seconds": mean, "step_seconds_std": statistics.pstdev(self.times),
            "step_seconds_median": statistics.median(self.times),
            "tokens_per_s": self.tokens_per_step / mean, "params": self.params,
            "loss": float(jax.device_get(self.metrics.loss.compute())),
            "timed_steps": len(self.times)}


def time_train_steps(configs: dict, batch_size: int, steps: int, warmup: int) -> dict:
  """{name: timing} of `train.make_train_step` for each config, on random tokens.

  Every model is compiled and warmed up (`warmup` untimed steps, at least one) first;
  then `steps` rounds each time one synchronised step of every model in turn, so that a
  change of machine load hits all models alike and their ratios stay fair.
  """
  timers = {}
  for name, config in configs.items():
    logging.info("bench: compiling the train step of %s", name)
    timers[name] = _TrainStepTimer(config, batch_size)
    for _ in range(max(warmup, 1)):
      timers[name].step(timed=False)
  for _ in range(steps):
    for timer in timers.values():
      timer.step(timed=True)
  return {name: timer.result() for name, timer in timers.items()}


def time_train_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  """`time_train_steps` of one config."""
  return time_train_steps({"model": config}, batch_size, steps, warmup)["model"]


def train_bench_config(config, kind: str, dims: dict):
  """The bench config turned into a train config of one bench model (bench.seq_len,
  the bench's tokenizer, model dtype and attention)."""
  c = copy.deepcopy(config)
  dims = dict(dims)
  dims.pop("name", None)
  c.model.kind = kind
  for key in ("hidden", "num_heads", "cond_dim", "num_layers", "enc_layers", "dec_layers",
              "query_mode"):
    if key in dims:
      c.model[key] = dims[key]
  c.data.seq_len = config.bench.seq_len
  c.sample.steps = min(c.sample.steps, c.data.seq_len - 1)
  return c


def run_train_bench(config) -> dict:
  """PGM vs MDLM vs AR train-step speed at equal settings (see the module docstring)."""
  b = config.bench
  models = [("mdlm", "mdlm", dict(b.mdlm)), ("ar", "ar", dict(b.mdlm))]
  models += [(dict(d).get("name", "pgm"), "pgm", dict(d)) for d in b.pgm]
  logging.info("bench: train steps of %s, B=%d L=%d", [m[0] for m in models], b.batch_size,
               b.seq_len)
  rows = time_train_steps({name: train_bench_config(config, kind, dims)
                           for name, kind, dims in models}, b.batch_size, b.repeats, b.warmup)
  for name, kind, _ in models:
    rows[name]["kind"] = kind
  baseline = models[0][0]  # the MDLM row: every ratio is a step time over its
  ratios = {name: r["step_seconds"] / rows[baseline]["step_seconds"]
            for name, r in rows.items() if name != baseline}
  first_pgm = models[2][0]
  return {"train": {"batch_size": b.batch_size, "seq_len": b.seq_len, "models": rows,
                    "step_time_ratio_vs_mdlm": ratios},
          "train_tokens_per_s": {name: r["tokens_per_s"] for name, r in rows.items()},
          "train_step_time_ratio": ratios[first_pgm]}


def run_bench(config, workdir: str) -> dict:
  if families.of(config).is_image:  # images: PGM vs MaskGIT
    from pgm_jax.tools import bench_images  # pylint: disable=g-import-not-at-top
    return bench_images.run_image_bench(config, workdir)
  b = config.bench
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir)
  what = b.get("what", "sample")
  if what not in BENCH_WHAT:
    raise ValueError(f"config.bench.what must be one of {BENCH_WHAT}, got {what!r}")
  if b.flops_only and what != "sample":
    raise ValueError(f"config.bench.flops_only needs config.bench.what=sample (got {what!r}): "
                     f"the train bench times real steps, run it on the target accelerator")
  if what == "train":
    report = {"setting": _setting(config)}
    report.update(run_train_bench(config))
    return _write(report, workdir)
  report = run_sample_bench(config)
  if what == "all":
    report.update(run_train_bench(config))
  return _write(report, workdir)


def _setting(config) -> dict:
  b = config.bench
  return {"name": b.setting, "what": b.get("what", "sample"), "batch_size": b.batch_size,
          "seq_len": b.seq_len, "steps": b.steps,
          "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "backend": jax.default_backend(), "flops_only": bool(b.flops_only),
          "model_dtype": config.model.dtype, "attn_impl": config.attn.impl}


def _write(report: dict, workdir: str) -> dict:
  print(format_table(report))
  if jax.process_index() == 0:
    fileio.atomic_write_text(os.path.join(workdir, "bench.json"), json.dumps(report, indent=2))
  return report


def run_sample_bench(config) -> dict:
  b = config.bench
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
  result, seconds = sampler_common.measure_sampler(
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
    result, seconds = sampler_common.measure_sampler(
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

  ar_dims = dict(b.get("ar", {}) or {})
  if ar_dims:
    ar = _model("ar", ar_dims, tokenizer, config)
    ar_params = _params(ar, "ar", None, abstract=b.flops_only, seed=2)
    logging.info("bench: AR with its KV cache")
    result, seconds = sampler_common.measure_sampler(
        lambda m: samplers.ar_sample(ar_params, prompt, model=ar, measure_flops=m,
                                     execute=not b.flops_only, **common),
        warmup=b.warmup, repeats=b.repeats, flops_only=b.flops_only)
    rows["ar_kv_cache"] = entry(result, seconds)
  block_variants = []
  for dims in b.get("pgm_block", ()) or ():
    dims = dict(dims)
    name = dims.pop("name", "pgm_block")
    model = _model("pgm_block", dims, tokenizer, config)
    params = _params(model, "pgm_block", None, abstract=b.flops_only, seed=3)
    logging.info("bench: block PGM %s block-efficient (b=%d)", name, dims["block_len"])
    result, seconds = sampler_common.measure_sampler(
        lambda m: samplers.block_sample(params, prompt, model=model, sampler="block-efficient",
                                        bucket_size=config.sample.bucket_size,
                                        measure_flops=m, execute=not b.flops_only, **common),
        warmup=b.warmup, repeats=b.repeats, flops_only=b.flops_only)
    e = entry(result, seconds)
    ratios = {}
    for ref, ref_entry in (("mdlm", rows["mdlm"]), ("pgm", variants[0]["pgm"]),
                           ("ar", rows.get("ar_kv_cache"))):
      if ref_entry is None:
        continue
      ratios[f"flop_ratio_vs_{ref}"] = ref_entry["flops_per_seq"] / e["flops_per_seq"]
      ratios[f"throughput_ratio_vs_{ref}"] = (
          None if seconds is None else e["tokens_per_s"] / ref_entry["tokens_per_s"])
    block_variants.append({"name": name, "block_len": dims["block_len"], "pgm_block": e,
                           **ratios})

  setting = _setting(config)
  setting.update({"vocab_size": tokenizer.vocab_size,
                  "bucket_size": config.sample.bucket_size or max(8, length // 16),
                  "weights": {"pgm": b.get("pgm_workdir") or "random",
                              "mdlm": b.get("mdlm_workdir") or "random"}})
  return {
      "setting": setting,
      "mdlm": rows["mdlm"],
      "pgm": variants[0]["pgm"],
      "throughput_ratio": variants[0]["throughput_ratio"],
      "flop_ratio": variants[0]["flop_ratio"],
      "variants": variants,
      **({"ar_kv_cache": rows["ar_kv_cache"]} if "ar_kv_cache" in rows else {}),
      **({"block_variants": block_variants} if block_variants else {}),
  }


def format_table(report: dict) -> str:
  parts = []
  if "variants" in report:
    parts.append(_sample_table(report))
  if "train" in report:
    parts.append(_train_table(report))
  return "\n".join(parts)


def _train_table(report: dict) -> str:
  s, t = report["setting"], report["train"]
  lines = [f"train step ({s['name']}): B={t['batch_size']} L={t['seq_len']} on {s['backend']} "
           f"({s['device']} x{s['num_devices']}), {s['model_dtype']}, attn {s['attn_impl']}",
           f"{'model':<18}{'params':>10}{'ms/step':>10}{'+-':>8}{'tokens/s':>12}{'vs MDLM':>9}"]
  for name, r in t["models"].items():
    ratio = t["step_time_ratio_vs_mdlm"].get(name)
    lines.append(f"{name:<18}{r['params'] / 1e6:>9.2f}M{1e3 * r['step_seconds']:>10.1f}"
                 f"{1e3 * r['step_seconds_std']:>8.1f}{r['tokens_per_s']:>12.0f}"
                 f"{'-' if ratio is None else f'{ratio:.2f}':>9}")
  lines.append("vs MDLM = step time / MDLM step time (> 1: slower than MDLM)")
  return "\n".join(lines)


def _sample_table(report: dict) -> str:
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
  if "ar_kv_cache" in report or "block_variants" in report:
    lines.append(f"{'model':<18}{'tokens/s':>12}{'GFLOP/seq':>12}{'compiles':>9}{'passes':>8}"
                 f"{'thru/AR':>9}{'thru/PGM':>9}{'thru/MDLM':>10}{'FLOP AR/x':>10}")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    entries = ([("ar (KV cache)", report["ar_kv_cache"], {})] if "ar_kv_cache" in report
               else []) + [
        (v["name"], v["pgm_block"], v) for v in report.get("block_variants", ())]
    for name, e, v in entries:
      tps = "-" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:.1f}"
      lines.append(f"{name:<18}{tps:>12}{e['flops_per_seq'] / 1e9:>12.2f}{e['compiles']:>9}"
                   f"{e['passes']:>8}{fmt(v.get('throughput_ratio_vs_ar')):>9}"
                   f"{fmt(v.get('throughput_ratio_vs_pgm')):>9}"
                   f"{fmt(v.get('throughput_ratio_vs_mdlm')):>10}"
                   f"{fmt(v.get('flop_ratio_vs_ar')):>10}")
    lines.append("thru/X = block PGM tokens/s / X tokens/s;  FLOP AR/x = AR FLOPs / block PGM "
                 "FLOPs (as executed)")
  return "\n".join(lines)

