r"""Train-step throughput of whole configs, Pallas vs dense XLA attention, in one run.

Times the jitted, sharded train step (`train.make_train_step`, the one training runs) on
random tokens, after warm-up, synchronised, on all local devices, with the timing of
`pgm_jax.tools.bench.time_train_step`. Prints a table and writes JSON; the ratios are measured
in this one run. (PGM vs MDLM vs AR at the bench settings, in bench.json:
`python -m pgm_jax.main --config=configs/bench.py:cpu --mode=bench --config.bench.what=train`.)

  # the paper models at L = 1024 (on a GPU or TPU; the "prepared script" of docs/scaling.md)
  python scripts/bench_train_step.py --configs=owt.py:pgm_6_6,owt.py:mdlm \
      --impls=pallas,xla --batch=8 --out=/tmp/train_bench.json
  # a CPU smoke run
  python scripts/bench_train_step.py --configs=shakespeare.py:tiny,shakespeare.py:tiny+mdlm \
      --impls=xla --batch=8 --steps=3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from pgm_jax.tools import bench  # noqa: E402


def load_config(spec: str):
  """'owt.py:pgm_6_6' -> configs/owt.py get_config('pgm_6_6'); '+' joins presets
  ('shakespeare.py:tiny+mdlm'), since ',' separates the configs on the command line."""
  name, _, arg = spec.partition(":")
  path = os.path.join(REPO, "configs", name)
  module_spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg.replace("+", ",") or None)


def time_step(config, batch_size: int, steps: int, warmup: int) -> dict:
  """`pgm_jax.tools.bench.time_train_step` (the timing `--mode=bench --config.bench.what=train`
  uses too)."""
  return bench.time_train_step(config, batch_size, steps, warmup)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="owt.py:pgm_6_6,owt.py:mdlm")
  parser.add_argument("--impls", default="pallas,xla")
  parser.add_argument("--batch", type=int, default=8, help="global batch per step")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rows = []
  for spec in args.configs.split(","):
    for impl in args.impls.split(","):
      config = load_config(spec)
      config.attn.impl = impl
      result = time_step(config, args.batch, args.steps, args.warmup)
      result.update(config=spec, attn_impl=impl, seq_len=config.data.seq_len,
                    device=jax.devices()[0].device_kind, num_devices=jax.device_count())
      rows.append(result)
      print(f"{spec:28s} {impl:7s} {result['step_seconds'] * 1e3:9.1f} ms/step "
            f"{result['tokens_per_s']:12.0f} tokens/s", flush=True)
  base = {r["attn_impl"]: r for r in rows if r["config"] == rows[-1]["config"]}
  for r in rows:
    ref = base.get(r["attn_impl"])
    if ref is not None:
      r["step_time_ratio_vs_last_config"] = r["step_seconds"] / ref["step_seconds"]
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
