"""Benchmark `partition_attention`: xla (dense) vs pallas (block-skipping kernels).

For each mask kind (same_group / other_group in the sorted layout, packed, and with
--block_len the block PGM's block_same_group / block_other_group / block_causal in their
training layout: encoder 2L x 2L, decoder L x 2L, clean stream L x L) it
  * reports computed vs dense key blocks (the work the kernels skip) and the alive
    fraction of the (query, key) pairs in this batch,
  * checks the pallas output and dq/dk/dv against the dense oracle (relative error),
  * times forward and forward+backward of each impl (jitted, median of --repeats),
and optionally times a whole PGM train step (`--train_step`) with each impl.

On CPU the kernels run in Pallas interpret mode: the timings say NOTHING about kernel
speed there (only correctness is meaningful). On a GPU/TPU the kernels are compiled.

  python scripts/bench_attention.py --seq_len=1024 --batch=8 --heads=12 --head_dim=64
  python scripts/bench_attention.py --seq_len=256 --batch=2 --heads=2 --block_q=64   # CPU
  python scripts/bench_attention.py --seq_len=128 --batch=2 --block_len=16 --repeats=1
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pgm_jax.ops import AttentionMask, partition_attention, permute, sort_by_group  # noqa: E402
from pgm_jax.ops import pallas_attention as pa  # noqa: E402
from pgm_jax.ops.masks import block_training_masks  # noqa: E402


def timeit(fn, *args, repeats: int):
  jax.block_until_ready(fn(*args))          # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def masks(groups_BxL, length):
  layout = sort_by_group(groups_BxL)
  g = permute(groups_BxL, layout.perm)
  return {
      "same_group": AttentionMask.sorted_groups("same_group", g, layout.split),
      "other_group": AttentionMask.sorted_groups("other_group", g, layout.split),
      "packed": AttentionMask.packed(layout.split, length),
  }


def block_masks(groups_BxL, block_len: int) -> dict:
  """The block PGM's training masks (`masks.block_training_masks`) as {kind: (mask, q_len,
  kv_len)}: block_same_group (encoder, 2L x 2L), block_other_group (decoder, L x 2L),
  block_causal (clean stream, L x L)."""
  length = groups_BxL.shape[1]
  shapes = {"encoder": (2, 2), "decoder": (1, 2), "clean": (1, 1)}
  return {m.kind: (m, shapes[name][0] * length, shapes[name][1] * length)
          for name, m in block_training_masks(groups_BxL, block_len).items()}


def bench_op(args):
  rng = np.random.default_rng(args.seed)
  b, length, h, d = args.batch, args.seq_len, args.heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  # Partition at t ~ U(0, 1): each token in group 1 with probability t (per example).
  t_B = rng.random(b) if args.split == "uniform_t" else np.full(b, 0.5)
  groups = jnp.asarray((rng.random((b, length)) < t_B[:, None]).astype(np.int32))
  cases = {kind: (mask, length, length) for kind, mask in masks(groups, length).items()}
  if args.block_len:
    cases.update(block_masks(groups, args.block_len))
  print(f"backend={jax.default_backend()} B={b} L={length} H={h} D={d} dtype={args.dtype} "
        f"block_q={args.block_q} block_kv={args.block_kv} split={args.split}"
        + (f" block_len={args.block_len}" if args.block_len else ""))
  if jax.default_backend() == "cpu":
    print("NOTE: CPU -> Pallas interpret mode. Timings below say nothing about kernel speed; "
          "only the errors and block counts are meaningful.")
  print(f"{'kind':17s} {'q x kv':>11s} {'blocks':>14s} {'frac':>6s} {'alive':>6s} "
        f"{'fwd err':>9s} {'grad err':>9s} {'xla fwd':>9s} {'pl fwd':>9s} {'xla f+b':>9s} "
        f"{'pl f+b':>9s} {'speedup f+b':>11s}")
  for kind, (mask, q_len, kv_len) in cases.items():
    q = jnp.asarray(rng.normal(size=(b, q_len, h, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, kv_len, h, d)), dtype) for _ in range(2))
    ct = jnp.asarray(rng.normal(size=(b, q_len, h, d)), dtype)
    counts = pa.block_counts(mask, b, q_len, kv_len, block_q=args.block_q,
                             block_kv=args.block_kv)
    alive = float(np.asarray(mask.dense(q_len, kv_len)).mean())
    fns = {}
    for impl in ("xla", "pallas"):
      op = functools.partial(partition_attention, impl=impl, block_q=args.block_q,
                             block_kv=args.block_kv)
      fwd = jax.jit(lambda q, k, v, op=op, mask=mask: op(q, k, v, mask))
      loss = lambda q, k, v, op=op, mask=mask, ct=ct: jnp.sum(
          op(q, k, v, mask).astype(jnp.float32) * ct)
      fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      fns[impl] = (fwd, fb)
    out = {impl: fns[impl][0](q, k, v) for impl in fns}
    grads = {impl: fns[impl][1](q, k, v)[1] for impl in fns}
    fwd_err = rel_err(out["pallas"], out["xla"])
    grad_err = max(rel_err(a, r) for a, r in zip(grads["pallas"], grads["xla"]))
    t = {(impl, i): timeit(fns[impl][i], q, k, v, repeats=args.repeats)
         for impl in fns for i in (0, 1)}
    print(f"{kind:17s} {q_len:>5d}x{kv_len:<5d} {counts['computed']:>6d}/{counts['dense']:<7d} "
          f"{counts['fraction']:6.3f} {alive:6.3f} {fwd_err:9.2e} {grad_err:9.2e} "
          f"{t['xla', 0] * 1e3:7.2f}ms {t['pallas', 0] * 1e3:7.2f}ms "
          f"{t['xla', 1] * 1e3:7.2f}ms {t['pallas', 1] * 1e3:7.2f}ms "
          f"{t['xla', 1] / t['pallas', 1]:10.2f}x")


def _load_config(name: str, arg: str | None):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(root, "configs",
                                                                           f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def bench_train_step(args):
  """Times `steps.train_step` with impl=xla and impl=pallas (+ sorted layout)."""
  import dataclasses

  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from pgm_jax import experiment, steps
  from pgm_jax.models import pgm as pgm_mod
  from pgm_jax.models.layers import ModelConfig

  @dataclasses.dataclass(frozen=True)
  class SortedConfig(ModelConfig):
    sorted_layout: bool = True

  cfg = _load_config(args.config, args.config_arg)
  setup = experiment.make_setup(cfg)
  state = experiment.init_state(setup, jax.random.key(0))
  rng = np.random.default_rng(0)
  bsz, length = cfg.train.batch_size, cfg.data.seq_len
  batch = {"tokens": jnp.asarray(rng.integers(0, setup.model_cfg.vocab_size - 1,
                                              (bsz, length))),
           "valid": jnp.ones((bsz, length), bool)}
  results = {}
  for name, model_cfg in (
      ("xla", setup.model_cfg),
      ("pallas+sorted", SortedConfig(**dataclasses.asdict(dataclasses.replace(
          setup.model_cfg, attn_impl="pallas"))))):
    model = pgm_mod.PartitionDiT(model_cfg)
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=setup.tx, config=cfg,
                                   mask_id=setup.mask_id))
    loss = float(fn(state, batch, jax.random.key(1))[1].compute()["loss"])
    results[name] = (timeit(lambda s: fn(s, batch, jax.random.key(1)), state,
                            repeats=args.repeats), loss)
    print(f"train step {name:14s}: {results[name][0] * 1e3:9.1f} ms  loss {loss:.6f}")
  print(f"train step time ratio xla / pallas+sorted: "
        f"{results['xla'][0] / results['pallas+sorted'][0]:.2f}x (attention blocks: the op "
        f"defaults, 128 clipped to seq_len={length}, until the model passes config.attn.block_*)")
  if jax.default_backend() == "cpu":
    print("NOTE: CPU interpret mode; the train-step times say nothing about kernel speed.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--block_q", type=int, default=64)
  parser.add_argument("--block_kv", type=int, default=64)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--split", choices=("uniform_t", "half"), default="uniform_t",
                      help="uniform_t: group-1 probability t ~ U(0,1) per example (training); "
                           "half: every token in group 1 with p = 1/2")
  parser.add_argument("--block_len", type=int, default=0,
                      help="also the block PGM's kinds (training layout) at this block length")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--train_step", action="store_true",
                      help="also time a whole PGM train step with each impl")
  parser.add_argument("--config", default="shakespeare")
  parser.add_argument("--config_arg", default="tiny")
  args = parser.parse_args()
  bench_op(args)
  if args.train_step:
    bench_train_step(args)


if __name__ == "__main__":
  main()
