"""--mode=bench on an image config: sampling speed and FLOPs, PGM vs MaskGIT.

Both models run the same sampler (config.bench.sampler, "auto" = config.sample.sampler),
the same S (config.bench.steps), guidance weight (config.sample.cfg_w) and classes:
  * images/s at batch config.bench.batch_size, and the latency of one image (batch
    config.bench.latency_batch_size): medians of config.bench.repeats timed runs after
    config.bench.warmup untimed ones, each synchronised with the device;
  * FLOPs per image: XLA cost analysis of the programs as executed (padding included), and
    the analytic matmul count of `samplers.image.analytic_flops_per_image` (unpadded);
  * compiles: programs traced during the first run.
The report has the text bench's schema (bench.py): "setting", the baseline's entry (here
"maskgit"), "pgm" (the first variant), "throughput_ratio", "flop_ratio", "variants", plus
"latency_ratio" and "analytic_flop_ratio". With config.bench.flops_only nothing runs: the
paper's setting (1024 codes, S = 32) is then costed on a CPU. Weights are random (speed does
not depend on them).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from pgm_jax.core import fileio
from pgm_jax.data import tokenizers
from pgm_jax.samplers import common as sampler_common
from pgm_jax import families
from pgm_jax.models import ModelConfig
from pgm_jax.samplers import image as image_samplers

DEFAULT_REGISTER = {"pgm_image": 2, "maskgit": 1}  # the reference's image runs


def _model(kind: str, dims: dict, vocab, config):
  m = config.model
  cfg = ModelConfig(
      kind=kind, vocab_size=families.get(kind).model_config_fields(
          config, vocab_size=vocab.vocab_size, mask_id=vocab.mask_id)["vocab_size"],
      mask_id=vocab.mask_id, hidden=dims["hidden"], num_heads=dims["num_heads"],
      cond_dim=dims["hidden"], mlp_ratio=m.mlp_ratio, num_layers=dims.get("num_layers", 24),
      enc_layers=dims.get("enc_layers", 12), dec_layers=dims.get("dec_layers", 12),
      query_mode=m.query_mode, dropout=0.0, dtype=m.dtype, attn_impl=config.attn.impl,
      block_q=config.attn.block_q, block_kv=config.attn.block_kv, num_classes=m.num_classes,
      register=dims.get("register", DEFAULT_REGISTER[kind]),
      num_positions=config.data.grid ** 2)
  return families.build_model(cfg)


def _params(model, *, abstract: bool, seed: int):
  init = lambda r: families.get(model.config.kind).init_params(model, r)
  if abstract:
    return jax.eval_shape(init, jax.random.key(seed))
  return jax.jit(init)(jax.random.key(seed))


def run_image_bench(config, workdir: str) -> dict:
  b = config.bench
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir)
  vocab = tokenizers.get_tokenizer(config.data)
  grid, steps = config.data.grid, b.steps
  sampler = b.sampler if b.sampler != "auto" else families.resolve_sampler(config)
  cfg_w = float(config.sample.cfg_w)
  num_classes = config.model.num_classes
  batch, latency_batch = b.batch_size, b.latency_batch_size
  sample_kw = dict(sampler=sampler, steps=steps, seed=config.sample.seed, grid=grid, cfg_w=cfg_w,
                   temperature=config.sample.temperature,
                   temperature_min=config.sample.temperature_min, r_temp=config.sample.r_temp,
                   bucket_size=config.sample.bucket_size, execute=not b.flops_only)
  labels = np.arange(batch) % num_classes

  def bench_model(kind: str, dims: dict, seed: int) -> dict:
    model = _model(kind, dims, vocab, config)
    params = _params(model, abstract=b.flops_only, seed=seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("bench: %s %s, %s, B=%d S=%d cfg_w=%g", kind, dims, sampler, batch, steps, cfg_w)
    run = lambda m, lab: image_samplers.image_sample(params, lab, model=model, measure_flops=m,
                                                     **sample_kw)
    result, seconds = sampler_common.measure_sampler(
        lambda m: run(m, labels), warmup=b.warmup, repeats=b.repeats, flops_only=b.flops_only)
    latency = None
    if not b.flops_only:
      _, latency = sampler_common.measure_sampler(
          lambda m: run(False, labels[:latency_batch]), warmup=b.warmup, repeats=b.repeats,
          flops_only=False)
    analytic = image_samplers.analytic_flops_per_image(
        model.config, sampler, grid, steps, cfg_w=cfg_w,
        step_flops=families.get(kind).step_flops)
    return {"images_per_s": None if seconds is None else batch / seconds,
            "seconds_per_run": seconds, "latency_s": latency,
            "flops_per_image": result.flops_per_seq, "analytic_flops_per_image": analytic,
            "compiles": result.compiles, "passes": result.passes, "params": n_params}

  baseline = bench_model("maskgit", dict(b.maskgit), seed=0)
  variants = []
  for dims in b.pgm:
    dims = dict(dims)
    name = dims.pop("name", "pgm")
    pgm = bench_model("pgm_image", dims, seed=1)
    ratio = lambda key, inverse=False: (
        None if pgm[key] is None or baseline[key] is None else
        (baseline[key] / pgm[key] if inverse else pgm[key] / baseline[key]))
    variants.append({
        "name": name, "pgm": pgm,
        "throughput_ratio": ratio("images_per_s"),
        "latency_ratio": ratio("latency_s", inverse=True),  # MaskGIT latency / PGM latency
        "flop_ratio": ratio("flops_per_image", inverse=True),
        "analytic_flop_ratio": ratio("analytic_flops_per_image", inverse=True)})

  first = variants[0]
  report = {
      "setting": {"name": b.setting, "modality": "images", "baseline": "maskgit",
                  "sampler": sampler, "steps": steps, "cfg_w": cfg_w, "batch_size": batch,
                  "latency_batch_size": latency_batch, "codes_per_image": grid * grid,
                  "seq_len": grid * grid + 1, "vocab_size": vocab.vocab_size,
                  "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                  "flops_only": bool(b.flops_only),
                  "bucket_size": config.sample.bucket_size or max(8, (grid * grid + 1) // 16),
                  "weights": "random"},
      "maskgit": baseline, "pgm": first["pgm"],
      "throughput_ratio": first["throughput_ratio"], "latency_ratio": first["latency_ratio"],
      "flop_ratio": first["flop_ratio"], "analytic_flop_ratio": first["analytic_flop_ratio"],
      "variants": variants,
  }
  print(format_table(report))
  if jax.process_index() == 0:
    fileio.atomic_write_text(os.path.join(workdir, "bench.json"), json.dumps(report, indent=2))
  return report


def format_table(report: dict) -> str:
  s = report["setting"]
  lines = [f"bench {s['name']} (images): {s['sampler']}, S={s['steps']}, cfg_w={s['cfg_w']:g}, "
           f"B={s['batch_size']} (latency at B={s['latency_batch_size']}), "
           f"{s['codes_per_image']} codes, V={s['vocab_size']} on {s['backend']} "
           f"({s['device']})",
           f"{'model':<14}{'params':>9}{'images/s':>10}{'latency s':>11}{'GFLOP/img':>11}"
           f"{'analytic':>10}{'compiles':>9}{'passes':>7}{'thru x':>8}{'lat x':>7}"
           f"{'FLOP x':>8}{'anal x':>8}"]
  fmt = lambda x, spec: "-" if x is None else format(x, spec)

  def row(name, e, v=None):
    v = v or {}
    lines.append(
        f"{name:<14}{e['params'] / 1e6:>8.1f}M{fmt(e['images_per_s'], '.2f'):>10}"
        f"{fmt(e['latency_s'], '.3f'):>11}{fmt(e['flops_per_image'] and e['flops_per_image'] / 1e9, '.3f'):>11}"
        f"{e['analytic_flops_per_image'] / 1e9:>10.3f}{e['compiles']:>9}{e['passes']:>7}"
        f"{fmt(v.get('throughput_ratio'), '.2f'):>8}{fmt(v.get('latency_ratio'), '.2f'):>7}"
        f"{fmt(v.get('flop_ratio'), '.2f'):>8}{fmt(v.get('analytic_flop_ratio'), '.2f'):>8}")

  row("maskgit", report["maskgit"])
  for v in report["variants"]:
    row(v["name"], v["pgm"], v)
  lines.append("thru x = PGM images/s / MaskGIT images/s; lat x = MaskGIT latency / PGM latency; "
               "FLOP x = MaskGIT FLOPs / PGM FLOPs (as executed, XLA cost analysis); anal x = "
               "the analytic matmul-FLOP ratio (unpadded)")
  return "\n".join(lines)
