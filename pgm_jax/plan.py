r"""--mode=plan: compile the train step ahead of time on a mesh and report memory and FLOPs.

Nothing is run: `jax.jit(train_step).lower(abstract state, batch, rng).compile()` on the
config's mesh, then `compiled.memory_analysis()` (per-device argument / output / temp
bytes) and `compiled.cost_analysis()` (FLOPs of one device's program). Writes
WORKDIR/plan.json and prints a table.

The target mesh may be larger than the machine: on CPU the compile then runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N virtual devices.
E.g. the paper's PGM 6/6 on a TPU v4-32-like slice (16 chips):

  python -m pgm_jax.main --config=configs/owt.py:pgm_6_6 --workdir=/tmp/plan --mode=plan \
      --config.mesh.shape='(16,1,1)' --config.plan.num_devices=16 \
      --config.plan.device_memory_gib=32

CPU memory analysis approximates the accelerator's (other layouts, fusions, rematerialisation
and, for attention, the Pallas kernels instead of the dense XLA path): treat it as a
guide and keep a margin (docs/scaling.md).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

_GIB = 1024 ** 3


def num_plan_devices(config) -> int:
  """config.plan.num_devices, else the mesh product (no -1), else the local devices."""
  n = config.get("plan", {}).get("num_devices") if "plan" in config else None
  if n:
    return int(n)
  shape = [int(s) for s in config.mesh.shape]
  if -1 not in shape:
    return math.prod(shape)
  return jax.device_count()


def _state_bytes_per_device(abstract_tree) -> int:
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def compile_plan(config, devices=None) -> dict:
  """Lowers and compiles the train step on `devices` (default: all); runs nothing."""
  from pgm_jax import sharding, train  # pylint: disable=g-import-not-at-top
  setup = train.make_setup(config, devices)
  step_fn = train.make_train_step(setup)
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(setup.mesh))
  micro = config.train.batch_size // config.train.grad_accum_steps
  lowered = step_fn.lower(setup.abstract_state, train.abstract_batch(setup), rng)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  per_device = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem is not None else {}
  if per_device:
    # Donated state aliases its output: peak ~ arguments + outputs - aliased + temporaries.
    per_device["peak_estimate_bytes"] = (
        per_device["argument_size_in_bytes"] + per_device["output_size_in_bytes"]
        - per_device["alias_size_in_bytes"] + per_device["temp_size_in_bytes"])
  # XLA's cost analysis counts a loop body once: the gradient-accumulation scan runs
  # grad_accum_steps times (the optimizer update, counted as many times, is negligible).
  flops = float(cost.get("flops", 0.0)) * int(config.train.grad_accum_steps)
  result = {
      "model": config.model.kind,
      "backend": jax.default_backend(),
      "num_devices": setup.mesh.size,
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "batch_size": int(config.train.batch_size),
      "microbatch_size": int(micro),
      "per_device_microbatch": micro // setup.data_parallel,
      "seq_len": int(config.data.seq_len),
      "dtype": config.model.dtype,
      "attn_impl": config.attn.impl,
      "num_params": int(n_params),
      "state_bytes_per_device": _state_bytes_per_device(setup.abstract_state),
      "memory_per_device": per_device,
      "flops_per_device": flops,
      "flops_total": flops * setup.mesh.size,
      "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
  }
  gib = config.get("plan", {}).get("device_memory_gib") if "plan" in config else None
  if gib and per_device:
    result["device_memory_gib"] = float(gib)
    result["fits"] = per_device["peak_estimate_bytes"] <= float(gib) * _GIB
  return result


def _compile_in_subprocess(config, n: int) -> dict:
  """Compiles on N virtual CPU devices in a fresh process (XLA_FLAGS set before jax)."""
  with tempfile.TemporaryDirectory() as tmp:
    cfg_path, out_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "plan.json")
    with open(cfg_path, "w") as f:
      f.write(config.to_json())
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]))
    env.pop("PGM_JAX_DISTRIBUTED", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "pgm_jax.plan", cfg_path, out_path], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
      raise ValueError(f"config.plan.num_devices={n}: compiling on {n} virtual CPU devices "
                       f"failed:\n{tail}")
    with open(out_path) as f:
      return json.load(f)


def plan(config) -> dict:
  """The plan of `config` (in this process if enough devices, else a CPU subprocess)."""
  n = num_plan_devices(config)
  if n <= 0:
    raise ValueError(f"config.plan.num_devices={n} must be positive")
  local = jax.device_count()
  if n <= local and jax.process_count() == 1:
    return compile_plan(config, jax.devices()[:n])
  if jax.default_backend() != "cpu" or jax.process_count() > 1:
    raise ValueError(f"config.plan.num_devices={n} exceeds the {local} devices here; "
                     f"plan larger meshes on a CPU machine (virtual devices)")
  return _compile_in_subprocess(config, n)


def format_table(result: dict) -> str:
  mem = result.get("memory_per_device", {})
  gb = lambda b: f"{b / _GIB:9.3f} GiB"
  rows = [
      ("model", f"{result['model']}  {result['num_params'] / 1e6:.1f}M params, "
                f"{result['dtype']}, attn={result['attn_impl']}"),
      ("mesh", f"{result['mesh']}  ({result['num_devices']} devices, {result['backend']})"),
      ("batch", f"{result['batch_size']} x L={result['seq_len']} (microbatch "
                f"{result['microbatch_size']}, {result['per_device_microbatch']} per device)"),
      ("state / device", gb(result["state_bytes_per_device"]) + "  (params, Adam, EMA)"),
  ]
  for key, label in (("argument_size_in_bytes", "arguments"), ("output_size_in_bytes", "outputs"),
                     ("alias_size_in_bytes", "aliased (donated)"),
                     ("temp_size_in_bytes", "temporaries"),
                     ("peak_estimate_bytes", "peak estimate")):
    if key in mem:
      rows.append((f"{label} / device", gb(mem[key])))
  rows.append(("FLOPs / device", f"{result['flops_per_device']:.4g} per step"))
  rows.append(("FLOPs total", f"{result['flops_total']:.4g} per step"))
  if "fits" in result:
    rows.append(("fits", f"{'yes' if result['fits'] else 'NO'} "
                         f"(device memory {result['device_memory_gib']:g} GiB)"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_plan(config, workdir: str) -> dict:
  """--mode=plan: WORKDIR/plan.json and a printed table (process 0 writes)."""
  result = plan(config)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
      json.dump(result, f, indent=2)
    print(format_table(result))
  return result


def _main(argv):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg_path, out_path = argv[1], argv[2]
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  result = compile_plan(config)
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _main(sys.argv)
