r"""--mode=plan: compile (never run) the train step or the samplers and report memory and FLOPs.

Nothing is executed: `jax.jit(fn).lower(abstract args).compile()`, then
`compiled.memory_analysis()` (per device: arguments, outputs, donated aliases,
temporaries, the compiler's peak) and `compiled.cost_analysis()` (FLOPs of one device's
program). Writes WORKDIR/plan.json and prints a table.

Compilers (`config.plan.compiler`, default "auto"):
  * "tpu": the real TPU compiler in libtpu (`pip install -e '.[tpu]'`), on this CPU
    machine, for a named slice: `--config.plan.topology=v5e-16` (table `TOPOLOGIES`, or
    a raw topology string such as "v5e:4x4"). The mesh is config.mesh.shape resolved over
    the slice's devices, the attention is traced and compiled as it runs on TPU (inside
    `pgm_jax.ops.attention.compile_target("tpu")`: attn.impl="auto" -> the Pallas/Mosaic
    kernels), and memory is the TPU compiler's own per-chip accounting. A program over
    the chip's HBM fails to compile with RESOURCE_EXHAUSTED: reported as fits=false with
    the bytes the compiler names, not an error.
  * "cpu-virtual": XLA:CPU on N virtual CPU devices (a subprocess with
    XLA_FLAGS=--xla_force_host_platform_device_count=N when N exceeds the devices here);
    N = config.plan.num_devices, else the topology's device count, else the mesh product.
    XLA:CPU's layouts, fusions and buffer reuse differ from the accelerator's and the
    dense XLA attention is planned: a rough guide only. "auto" falls back to it when
    libtpu is not importable (or PGM_JAX_PLAN_NO_LIBTPU=1), and says so on one line.

  python -m pgm_jax.main --config=configs/owt.py:pgm_6_6 --workdir=/tmp/plan --mode=plan \
      --config.plan.topology=v5e-16 --config.attn.impl=auto --config.mesh.shape='(-1,1,1)'

`--config.plan.what=sample` instead compiles the samplers on ONE chip of the topology at
the bench setting (config.bench.batch_size / seq_len / steps; configs/bench.py:paper is
B 32, L 1024, S 128) with config.model's dimensions: the PGM efficient step at the
largest encoder bucket (n_enc = L) with the uniform schedule's query count
m = ceil((L - 1) / S) (= L / S = 8 at the paper setting), and MDLM's whole `ddpm_cache`
run (`samplers.mdlm._mdlm_run`, one program). Image configs (the family's `is_image`)
compile instead, at config.sample.* (batch_size, steps, sampler, bucket_size) on
config.data.grid, their own model's sampler step (`ImageFamily.sampler_program`: the image
PGM's efficient step at the largest encoder length and query count of the run, MaskGIT's
full-canvas step), with classifier-free guidance (the batch doubled) unless
config.plan.sample_guidance=False and config.sample.cfg_w=0, and the VQ decoder (codes ->
pixels, `sample.decode_images`) at the FID eval's sampling batch and at the --mode=sample
grid, both decoded on one device.

FLOPs. "compiled" FLOPs are XLA's cost analysis of the per-device program (times
grad_accum_steps: a loop body is counted once). Pallas/Mosaic custom calls are NOT
costed, so with attn_impl="pallas" they miss the attention. "model" FLOPs are analytic,
per optimizer step, for the whole slice (docstring of `families.base.Family.train_flops`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from ml_collections.config_dict import placeholder

from pgm_jax import families
from pgm_jax.families import base as families_base
from pgm_jax.core import fileio, sharding


def config_defaults() -> ml_collections.ConfigDict:
  """`config.plan`: the options of --mode=plan (a config file adds this section with
  `pgm_jax.tools.with_tool_configs`)."""
  c = ml_collections.ConfigDict()
  c.num_devices = placeholder(int)       # mesh size to plan for; None = product of
                                         # config.mesh.shape (or the local devices if -1).
                                         # On CPU, more than are here -> virtual devices.
  c.device_memory_gib = placeholder(float)  # e.g. 32 (TPU v4), 16 (v5e), 80 (H100);
                                         # with a topology: overrides the compiler's HBM
  c.topology = placeholder(str)          # compile with the real TPU compiler (libtpu) for a
                                         # named slice: v4-16, v4-32, v5e-16, v5e-32, v5e-256,
                                         # v5p-16, v6e-16, ... (plan.TOPOLOGIES) or a raw
                                         # topology string "v5e:4x4"; sets the device count
  c.compiler = "auto"                    # auto (tpu if libtpu imports, else cpu-virtual) |
                                         # tpu | cpu-virtual (XLA:CPU on virtual devices)
  c.what = "train"                       # train: the train step on the mesh | sample: the
                                         # samplers at config.bench.* on ONE chip
  c.max_memory_fraction = 0.9            # fits = peak <= this fraction of device memory
  c.sample_models = ("pgm", "mdlm")       # what=sample, text: PGM efficient step, MDLM
                                         # ddpm_cache (both built from config.model's
                                         # dimensions); image configs plan their own model
  c.sample_guidance = True               # what=sample, images: classifier-free guidance on
                                         # (the batch doubled: the larger program; the
                                         # paper's FID runs use cfg_w = 2) whatever
                                         # config.sample.cfg_w; False: as cfg_w says
  return c


_GIB = 1024 ** 3
NO_LIBTPU_ENV = "PGM_JAX_PLAN_NO_LIBTPU"  # "1": behave as if libtpu were not importable


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice as `jax.experimental.topologies.get_topology_desc` builds it.

  name: the Cloud TPU accelerator name. v4-N and v5p-N count TensorCores (2 per chip),
  v5e-N and v6e-N count chips. devices: JAX devices = chips on every generation here
  (v4 and v5p run "megacore": one device drives both TensorCores of a chip, as on a
  real v4/v5p VM; libtpu's default for v4 would be one device per core with half the
  HBM, hence chip_config_name="megacore"). hbm_gib: the HBM per device that the
  compiler budgets against (read from the compiler at run time, `device_memory_bytes`;
  this value is the fallback and was measured with libtpu 0.0.42.1).
  """
  name: str
  topology: str
  chips: int
  hbm_gib: float
  options: tuple = ()

  @property
  def devices(self) -> int:
    return self.chips

  @property
  def accelerator_type(self) -> str:  # TPU_ACCELERATOR_TYPE of such a slice
    gen, n = self.name.split("-")
    return {"v5e": "v5litepod", "v6e": "v6e"}.get(gen, gen) + "-" + n


_MEGACORE = (("chip_config_name", "megacore"),)
_HBM = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}  # GiB per device (compiler)


def _table():
  rows = []
  for name, topo, chips in (
      ("v4-8", "v4:2x2x1", 4), ("v4-16", "v4:2x2x2", 8), ("v4-32", "v4:2x2x4", 16),
      ("v4-64", "v4:2x4x4", 32),
      ("v5e-4", "v5e:2x2", 4), ("v5e-8", "v5e:2x4", 8), ("v5e-16", "v5e:4x4", 16),
      ("v5e-32", "v5e:4x8", 32), ("v5e-64", "v5e:8x8", 64), ("v5e-128", "v5e:8x16", 128),
      ("v5e-256", "v5e:16x16", 256),
      ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-32", "v5p:2x2x4", 16),
      ("v6e-4", "v6e:2x2", 4), ("v6e-8", "v6e:2x4", 8), ("v6e-16", "v6e:4x4", 16),
      ("v6e-32", "v6e:4x8", 32), ("v6e-256", "v6e:16x16", 256)):
    gen = name.split("-")[0]
    rows.append(Topology(name, topo, chips, _HBM[gen], _MEGACORE if gen == "v4" else ()))
  return {t.name: t for t in rows}


TOPOLOGIES = _table()


def resolve_topology(name: str) -> Topology:
  """A TOPOLOGIES name ("v5e-16") or a raw topology string ("v5e:4x4")."""
  if name in TOPOLOGIES:
    return TOPOLOGIES[name]
  for t in TOPOLOGIES.values():
    if t.topology == name:
      return t
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name or "")
  if not m:
    raise ValueError(f"config.plan.topology={name!r}: expected one of {sorted(TOPOLOGIES)} "
                     f"or a topology string like 'v5e:4x4'")
  gen = m.group(1)
  chips = math.prod(int(s) for s in m.group(2).split("x"))
  per_name = chips * (2 if gen in ("v4", "v5p") else 1)
  return Topology(f"{gen}-{per_name}", name, chips, _HBM[gen], _MEGACORE if gen == "v4" else ())


def libtpu_available() -> bool:
  """libtpu (the TPU compiler) importable here, unless PGM_JAX_PLAN_NO_LIBTPU=1."""
  if os.environ.get(NO_LIBTPU_ENV) == "1":
    return False
  return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def topology_devices(topo: Topology) -> tuple:
  """Compile-only TPU devices of the slice (nothing is attached; libtpu compiles)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # While libtpu loads (then restored, so that child processes do not inherit them):
  # TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES quiet its warnings (no TPU VM metadata
  # here); ALLOW_MULTIPLE_LIBTPU_LOAD skips
  # /tmp/libtpu_lockfile (one process per TPU host), since we only compile and several
  # planners (or test workers) may load libtpu at once.
  names = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")
  saved = {k: os.environ.get(k) for k in names}
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology,
                                        **dict(topo.options))
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  devices = tuple(desc.devices)
  if len(devices) != topo.devices:
    raise ValueError(f"topology {topo.topology}: {len(devices)} devices, expected "
                     f"{topo.devices}")
  return devices


# -- RESOURCE_EXHAUSTED messages ---------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4,
          "P": 1024 ** 5}
_SIZE = r"([\d.]+)\s*([KMGTP]?)(?:i?B)?"


def _bytes(num: str, unit: str) -> int:
  return int(round(float(num) * _UNITS[unit.upper()]))


def parse_resource_exhausted(message: str) -> dict | None:
  """{"required_bytes", "available_bytes"} from the TPU compiler's out-of-memory message.

  Seen with libtpu 0.0.42.1: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total
  memory required for HLO temporaries (400.00G) exceeds available HBM (15.75G)." (sizes
  in GiB); older compilers: "Used 20.5G of 15.48G hbm. Exceeded hbm capacity by 5.0G."
  """
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  m = re.search(r"required for ([^(]*?)\s*\(" + _SIZE + r"\)\s*exceeds available HBM \("
                + _SIZE + r"\)", message)
  if m:
    return {"what": m.group(1), "required_bytes": _bytes(m.group(2), m.group(3)),
            "available_bytes": _bytes(m.group(4), m.group(5))}
  m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message)
  if m:
    return {"what": "total", "required_bytes": _bytes(m.group(1), m.group(2)),
            "available_bytes": _bytes(m.group(3), m.group(4))}
  return {"what": "unparsed", "required_bytes": None, "available_bytes": None}


def _is_resource_exhausted(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e)


@functools.lru_cache(maxsize=None)
def device_memory_bytes(topo: Topology) -> tuple[int, str]:
  """(HBM bytes per device the compiler budgets against, source).

  Compile-only devices have no `memory_stats()`, so this compiles a program that is
  certainly over budget on one device and reads "exceeds available HBM (...)" from the
  RESOURCE_EXHAUSTED message (about 0.1 s); the table value if that fails.
  """
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  device = topology_devices(topo)[0]
  big = jax.ShapeDtypeStruct((1024, 1024, 1024, 64), jnp.float32,  # 256 GiB
                             sharding=SingleDeviceSharding(device))
  try:
    jax.jit(lambda x: x + 1).lower(big).compile()
  except Exception as e:  # pylint: disable=broad-except
    parsed = parse_resource_exhausted(str(e))
    if parsed and parsed["available_bytes"]:
      return parsed["available_bytes"], "compiler"
  return int(topo.hbm_gib * _GIB), "table"


# -- analytic FLOPs -----------------------------------------------------------------------

# The count lives with the families (`Family.train_flops`), below the training loop, which
# reports MFU from it; plan keeps these names.
matmul_params = families_base.matmul_params


def model_flops(model_cfg, params, batch_size: int, seq_len: int) -> dict:
  """Analytic training FLOPs of one optimizer step: `Family.train_flops` of the model's
  family (its docstring has the formula)."""
  return families.get(model_cfg.kind).train_flops(model_cfg, params, batch_size, seq_len)


# -- compiling ----------------------------------------------------------------------------

def _state_bytes_per_device(abstract_tree) -> int:
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def _target(compiler: str):
  """The attention's compile target while tracing and compiling."""
  if compiler != "tpu":
    return contextlib.nullcontext()
  from pgm_jax.ops import attention  # pylint: disable=g-import-not-at-top
  return attention.compile_target("tpu")


def _resolved_impl(impl: str) -> str:
  from pgm_jax.ops import attention  # pylint: disable=g-import-not-at-top
  return attention.resolve_impl(impl)


MOSAIC_CALL = "tpu_custom_call"  # custom_call_target of Pallas TPU (Mosaic) kernels


def compile_program(jitted, args, kwargs=None, *, compiler: str, impl: str) -> dict:
  """Lowers and compiles `jitted(*args, **kwargs)` (abstract args); runs nothing.

  Returns memory (per device), cost, compile seconds and the attention as compiled; a
  RESOURCE_EXHAUSTED compile gives {"resource_exhausted": {...}} instead of raising.
  """
  kwargs = kwargs or {}
  out = {}
  with _target(compiler):
    out["attn_impl"] = _resolved_impl(impl)
    start = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    out["lower_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_resource_exhausted(e):
        raise
      out["compile_seconds"] = time.perf_counter() - start
      parsed = parse_resource_exhausted(str(e))
      parsed["message"] = str(e).strip().splitlines()[0][:500]
      out["resource_exhausted"] = parsed
      out["mosaic_custom_calls"] = lowered.as_text().count(MOSAIC_CALL)
      return out
    out["compile_seconds"] = time.perf_counter() - start
  out["mosaic_custom_calls"] = compiled.as_text().count(MOSAIC_CALL)
  if out["attn_impl"] == "pallas" and not out["mosaic_custom_calls"] and compiler == "tpu":
    out["attn_impl"] = "xla"  # "auto" fell back to the dense path (blocks do not tile)
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
  per_device = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem is not None else {}
  if per_device:
    # Donated state aliases its output: arguments + outputs - aliased + temporaries. The
    # TPU compiler also reports its own peak (peak_memory_in_bytes; it includes buffers,
    # e.g. collectives', that temp_size leaves out): the larger one is used.
    per_device["peak_estimate_bytes"] = (
        per_device["argument_size_in_bytes"] + per_device["output_size_in_bytes"]
        - per_device["alias_size_in_bytes"] + per_device["temp_size_in_bytes"])
    per_device["peak_bytes"] = max(per_device["peak_estimate_bytes"],
                                   per_device["peak_memory_in_bytes"])
  out["memory_per_device"] = per_device
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  out["flops"] = float(cost.get("flops", 0.0))
  out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
  return out


def _fits(entry: dict, budget_bytes: float | None) -> bool | None:
  if "resource_exhausted" in entry:
    return False
  peak = entry.get("memory_per_device", {}).get("peak_bytes")
  if budget_bytes is None or peak is None:
    return None
  return peak <= budget_bytes


def compile_plan(config, devices=None, *, compiler: str | None = None) -> dict:
  """Lowers and compiles the train step on `devices` (default: all); runs nothing."""
  from pgm_jax import experiment, train  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import sharding
  compiler = compiler or ("cpu-virtual" if jax.default_backend() == "cpu"
                          else jax.default_backend())
  setup = experiment.make_setup(config, devices)
  # How make_setup's mesh ordered the devices (the same call, repeated for its report).
  _, mesh_info = sharding.build_mesh(config.mesh, devices)
  step_fn = train.make_train_step(setup)
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(setup.mesh))
  micro = config.train.batch_size // config.train.grad_accum_steps
  prog = compile_program(step_fn, (setup.abstract_state, experiment.abstract_batch(setup), rng),
                         compiler=compiler, impl=config.attn.impl)
  params = setup.abstract_state.params
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  # XLA's cost analysis counts a loop body once: the gradient-accumulation scan runs
  # grad_accum_steps times (the optimizer update, counted as many times, is negligible).
  flops = (prog["flops"] * int(config.train.grad_accum_steps) if "flops" in prog
           else None)  # None: the compile ran out of memory
  analytic = model_flops(setup.model_cfg, params, int(config.train.batch_size),
                         int(config.data.seq_len))
  result = {
      "what": "train",
      "compiler": compiler,
      "model": config.model.kind,
      "backend": jax.default_backend(),
      "device_kind": setup.mesh.devices.flat[0].device_kind,
      "num_devices": setup.mesh.size,
      "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
      "mesh_method": mesh_info["method"],
      "dcn_shape": mesh_info["dcn_shape"],
      "ici_shape": mesh_info["ici_shape"],
      "mesh_device_order": sharding.mesh_devices(setup.mesh),
      "batch_size": int(config.train.batch_size),
      "microbatch_size": int(micro),
      "per_device_microbatch": micro // setup.data_parallel,
      "seq_len": int(config.data.seq_len),
      "dtype": config.model.dtype,
      "attn_impl_config": config.attn.impl,
      # The memory levers as compiled (docs/scaling.md).
      "sorted_layout": families.sorted_layout(config, attn_impl=prog["attn_impl"]),
      "remat": config.model.get("remat", "none"),
      "loss_chunk_len": int(config.model.get("loss_chunk_len", 0) or 0),
      "grad_accum_steps": int(config.train.grad_accum_steps),
      "attn_impl": prog["attn_impl"],
      "mosaic_custom_calls": prog["mosaic_custom_calls"],
      "num_params": int(n_params),
      "state_bytes_per_device": _state_bytes_per_device(setup.abstract_state),
      "memory_per_device": prog.get("memory_per_device", {}),
      "compile_seconds": prog["lower_seconds"] + prog["compile_seconds"],
      "flops_per_device": flops,
      "flops_total": None if flops is None else flops * setup.mesh.size,
      "flops_note": ("XLA cost analysis; Pallas (Mosaic) custom calls are not costed"
                     if prog["mosaic_custom_calls"] else "XLA cost analysis"),
      "bytes_accessed_per_device": prog.get("bytes_accessed", 0.0),
      "model_flops_per_step": analytic["total"],
      "model_flops_per_device": analytic["total"] / setup.mesh.size,
      "model_flops": analytic,
  }
  if "resource_exhausted" in prog:
    result["resource_exhausted"] = prog["resource_exhausted"]
  return result


def _text_sample_setting(config, tok) -> tuple[dict, list]:
  """Text: config.bench's batch, length and steps; the models of config.plan.sample_models
  with config.model's dimensions."""
  b = config.bench
  batch, length, steps = int(b.batch_size), int(b.seq_len), int(b.steps)
  if not 1 <= steps <= length - 1:
    raise ValueError(f"config.bench.steps={steps} must be in [1, config.bench.seq_len - 1]")
  n_query = -(-(length - 1) // steps)  # the uniform schedule's largest step (m = L / S)
  setting = {"batch_size": batch, "seq_len": length, "steps": steps,
             "vocab_size": tok.vocab_size, "n_enc": length, "n_query": n_query}
  base = families.model_config_from(config, vocab_size=tok.vocab_size, mask_id=tok.mask_id)
  models = []
  for kind in tuple(config.plan.sample_models):
    families.get(kind, key="config.plan.sample_models")
    models.append(dataclasses.replace(base, kind=kind, dropout=0.0))
  return setting, models


def _image_sample_setting(config, tok) -> tuple[dict, list]:
  """Images: config.sample's batch, steps, sampler and bucket on config.data.grid, the
  config's own model, guidance as config.plan.sample_guidance says."""
  from pgm_jax.samplers import image as image_samplers  # pylint: disable=g-import-not-at-top
  s, grid = config.sample, int(config.data.grid)
  length = grid * grid + 1
  setting = {"batch_size": int(s.batch_size), "grid": grid, "seq_len": length,
             "steps": int(s.steps), "sampler": families.check_sampler(config),
             "bucket_size": int(s.bucket_size) or image_samplers.default_bucket(length),
             "cfg": bool(config.plan.get("sample_guidance", True) or float(s.cfg_w) != 0),
             "cfg_w": float(s.cfg_w), "vocab_size": tok.vocab_size}
  model_cfg = dataclasses.replace(
      families.model_config_from(config, vocab_size=tok.vocab_size, mask_id=tok.mask_id),
      dropout=0.0)
  return setting, [model_cfg]


def _decoder_programs(config, setting: dict, on, compiler: str) -> dict:
  """The VQ decoder (codes -> pixels) at the batches the sampling paths decode on one
  device: each sampling batch of the FID evaluation (config.sample.batch_size) and the
  whole --mode=sample / end-of-training grid at once (`sample.decode_images`). None for a
  source without one (the digits)."""
  from pgm_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from pgm_jax.models import vq  # pylint: disable=g-import-not-at-top
  if not sample_lib.has_vq_decoder(config):
    return {}
  vq_cfg = vq.VQConfig(codebook_size=int(config.data.num_codes))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on),
                        vq.abstract_params(vq_cfg))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  grid = setting["grid"]
  grid_images = len(sample_lib.grid_classes(config)) * int(config.sample.samples_per_class)
  programs, compiled = {}, {}
  for name, batch, note in (
      ("vq_decode_eval_batch", setting["batch_size"], "one sampling batch of the FID eval"),
      ("vq_decode_sample_grid", grid_images, "the --mode=sample grid, decoded at once")):
    if batch not in compiled:
      # The jitted decode VQTokenizer.decode runs (sample.decode_images).
      codes = jax.ShapeDtypeStruct((batch, grid, grid), jnp.int32, sharding=on)
      compiled[batch] = compile_program(vq.decode_program(vq_cfg), (params, codes),
                                        compiler=compiler, impl="xla")
    programs[name] = dict(compiled[batch], model="vq", num_params=int(n_params),
                          flops_note="XLA cost analysis", decode_batch=int(batch),
                          image_size=grid * vq_cfg.downsample, note=note)
  return programs


def _sample_programs(config, device, compiler: str) -> dict:
  """The samplers' programs on one device (see module docstring)."""
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  from pgm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer(config.data)
  image = families.of(config).is_image
  setting, model_cfgs = (_image_sample_setting if image else _text_sample_setting)(config, tok)
  on = SingleDeviceSharding(device)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=on)
  programs = {}
  for model_cfg in model_cfgs:
    family = families.get(model_cfg.kind)
    model = family.build_model(model_cfg)
    params = jax.eval_shape(lambda r, m=model, f=family: f.init_params(m, r), jax.random.key(0))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on),
                          params)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    spec = family.sampler_program(model=model, setting=setting, sds=sds, key=key)
    prog = compile_program(spec["fn"], (params,) + tuple(spec["args"]), spec["static"],
                           compiler=compiler, impl=config.attn.impl)
    prog.update(model=model_cfg.kind, num_params=int(n_params), flops_note=spec["flops_note"],
                **spec.get("shapes", {}))
    programs[spec["name"]] = prog
  if image:
    programs.update(_decoder_programs(config, setting, on, compiler))
  return {"setting": setting, "programs": programs}


# -- the command --------------------------------------------------------------------------

def num_plan_devices(config) -> int:
  """config.plan.num_devices, else the topology's, else the mesh product (no -1), else
  the local devices."""
  plan_cfg = config.get("plan", {}) if "plan" in config else {}
  n = plan_cfg.get("num_devices")
  if n is not None:
    if int(n) <= 0:
      raise ValueError(f"config.plan.num_devices={n} must be positive (or None: the "
                       f"topology's, else the mesh product)")
    return int(n)
  if plan_cfg.get("topology"):
    return resolve_topology(plan_cfg["topology"]).devices
  shape = sharding.parse_mesh_shape(config.mesh.shape)
  if -1 not in shape:
    return math.prod(shape)
  return jax.device_count()


def choose_compiler(config) -> str:
  """config.plan.compiler with "auto" resolved (see module docstring)."""
  want = config.plan.get("compiler", "auto") or "auto"
  if want not in ("auto", "tpu", "cpu-virtual"):
    raise ValueError(f"config.plan.compiler must be auto, tpu or cpu-virtual, got {want!r}")
  topology = config.plan.get("topology")
  if want == "tpu" and not topology:
    raise ValueError("config.plan.compiler=tpu needs config.plan.topology (e.g. v5e-16)")
  if want == "cpu-virtual" or not topology:
    return "cpu-virtual"
  if libtpu_available():
    return "tpu"
  if want == "tpu":
    raise ValueError("config.plan.compiler=tpu: libtpu is not importable here "
                     "(pip install -e '.[tpu]')")
  print(f"plan: libtpu is not importable: compiling for {topology} on virtual CPU devices "
        "instead (compiler=cpu-virtual: XLA:CPU estimates, dense attention)", flush=True)
  return "cpu-virtual"


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
    proc = subprocess.run([sys.executable, "-m", "pgm_jax.tools.plan", cfg_path, out_path], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
      raise ValueError(f"config.plan.num_devices={n}: compiling on {n} virtual CPU devices "
                       f"failed:\n{tail}")
    with open(out_path) as f:
      return json.load(f)


def _budget(config, topo: Topology | None, compiler: str) -> dict:
  """Device memory (GiB, source) and the fits budget in bytes."""
  fraction = float(config.plan.get("max_memory_fraction", 0.9) or 0.9)
  gib, source = config.plan.get("device_memory_gib"), "config"
  if not gib and topo is not None:
    if compiler == "tpu":
      nbytes, source = device_memory_bytes(topo)
      gib = nbytes / _GIB
    else:
      gib, source = topo.hbm_gib, "table"
  out = {"max_memory_fraction": fraction}
  if gib:
    out.update(device_memory_gib=float(gib), device_memory_source=source,
               budget_bytes=int(float(gib) * _GIB * fraction))
  return out


def _topology_fields(topo: Topology | None) -> dict:
  if topo is None:
    return {"topology": None}
  return {"topology": topo.name, "topology_string": topo.topology, "chips": topo.chips}


def plan(config) -> dict:
  """The plan of `config` (see module docstring); plan.json's content."""
  what = config.plan.get("what", "train") or "train"
  if what not in ("train", "sample"):
    raise ValueError(f"config.plan.what must be train or sample, got {what!r}")
  topo = resolve_topology(config.plan.topology) if config.plan.get("topology") else None
  compiler = choose_compiler(config)
  budget = _budget(config, topo, compiler)
  if what == "sample":
    device = topology_devices(topo)[0] if compiler == "tpu" else jax.devices()[0]
    result = {"what": "sample", "compiler": compiler, **_topology_fields(topo),
              "device_kind": device.device_kind, "model_config": config.model.kind,
              "attn_impl_config": config.attn.impl, **budget,
              **_sample_programs(config, device, compiler)}
    for prog in result["programs"].values():
      prog["fits"] = _fits(prog, budget.get("budget_bytes"))
    fits = [p["fits"] for p in result["programs"].values()]
    result["fits"] = None if None in fits else all(fits)
    return result
  if compiler == "tpu":
    devices = topology_devices(topo)
    n = config.plan.get("num_devices")
    if n is not None and int(n) != len(devices):
      raise ValueError(f"config.plan.num_devices={n} but config.plan.topology="
                       f"{config.plan.topology} has {len(devices)} devices")
    result = compile_plan(config, list(devices), compiler="tpu")
  else:
    n = num_plan_devices(config)
    if n <= 0:
      raise ValueError(f"config.plan.num_devices={n} must be positive")
    local = jax.device_count()
    if n <= local and jax.process_count() == 1:
      result = compile_plan(config, jax.devices()[:n])
    elif jax.default_backend() != "cpu" or jax.process_count() > 1:
      raise ValueError(f"config.plan.num_devices={n} exceeds the {local} devices here; "
                       f"plan larger meshes on a CPU machine (virtual devices)")
    else:
      result = _compile_in_subprocess(config, n)
  result.update(_topology_fields(topo), **budget)
  result["fits"] = _fits(result, budget.get("budget_bytes"))
  return result


def _gb(b) -> str:
  return "-" if b is None else f"{b / _GIB:9.3f} GiB"


_MEM_ROWS = (("argument_size_in_bytes", "arguments"), ("output_size_in_bytes", "outputs"),
             ("alias_size_in_bytes", "aliased (donated)"), ("temp_size_in_bytes", "temporaries"),
             ("peak_memory_in_bytes", "peak (compiler)"),
             ("peak_estimate_bytes", "args+out-alias+temp"), ("peak_bytes", "peak"))


def _fits_row(entry: dict, result: dict) -> str:
  if entry.get("fits") is None:
    return "unknown (no device memory: set config.plan.device_memory_gib)"
  where = (f"{100 * result['max_memory_fraction']:g}% of {result['device_memory_gib']:.2f} GiB"
           f" ({result['device_memory_source']})")
  oom = entry.get("resource_exhausted")
  if oom:
    return (f"NO: RESOURCE_EXHAUSTED, needs {_gb(oom.get('required_bytes')).strip()} "
            f"of {_gb(oom.get('available_bytes')).strip()} ({oom.get('what')})")
  return f"{'yes' if entry['fits'] else 'NO'} (budget {where})"


def _memory_rows(entry: dict, suffix: str = " / device") -> list:
  mem = entry.get("memory_per_device", {})
  return [(f"{label}{suffix}", _gb(mem[key])) for key, label in _MEM_ROWS if key in mem]


def _mesh_order_row(result: dict) -> str:
  """plan.json's mesh_method, dcn_shape and the first devices in mesh order."""
  text = result.get("mesh_method", "-")
  if result.get("dcn_shape"):
    text += f", dcn_shape {tuple(result['dcn_shape'])} x ici {tuple(result['ici_shape'])}"
  order = result.get("mesh_device_order") or []
  if order:
    shown = [str(d["id"]) + (str(tuple(d["coords"])).replace(" ", "") if "coords" in d else "")
             for d in order[:8]]
    text += "; devices " + " ".join(shown) + (" ..." if result["num_devices"] > 8 else "")
  return text


def format_table(result: dict) -> str:
  where = (f"{result['topology']} ({result.get('topology_string')}, {result.get('chips')} chips)"
           if result.get("topology") else "-")
  rows = [("compiler", f"{result['compiler']}  target {where}, {result.get('device_kind')}")]
  if result.get("what") == "sample":
    s = result["setting"]
    if "grid" in s:  # image samplers (config.sample.*)
      rows.append(("setting", f"B={s['batch_size']} images{' x2 (guidance)' if s['cfg'] else ''}"
                              f", grid {s['grid']}x{s['grid']} (L={s['seq_len']}), "
                              f"S={s['steps']} {s['sampler']}, bucket {s['bucket_size']}, "
                              f"V={s['vocab_size']}, one chip"))
    else:
      rows.append(("setting", f"B={s['batch_size']} L={s['seq_len']} S={s['steps']} "
                              f"V={s['vocab_size']}, one chip; PGM n_enc={s['n_enc']} "
                              f"m={s['n_query']}"))
    for name, prog in result["programs"].items():
      rows.append((name, f"{prog['num_params'] / 1e6:.1f}M params, attn={prog['attn_impl']} "
                         f"({prog['mosaic_custom_calls']} Mosaic calls), compile "
                         f"{prog['compile_seconds']:.1f} s"))
      if "n_query" in prog:
        size = (f"n_enc={prog['n_enc']} n_query={prog['n_query']}" if prog["n_enc"] else
                f"the whole canvas, L={prog['n_query']}")
        rows.append(("  shapes", f"{prog['execution']}: {size}, model batch "
                                 f"{prog['model_batch']} (the largest of the run's "
                                 f"{prog['programs_in_run']} step programs"
                                 + ("" if prog["largest_step_reached"] else
                                    "; a bound no step reaches") + ")"))
      if "decode_batch" in prog:
        rows.append(("  shapes", f"{prog['decode_batch']} images of {prog['image_size']}px "
                                 f"({prog['note']})"))
      rows += [("  " + k, v) for k, v in _memory_rows(prog, "")]
      if "flops" in prog:
        rows.append(("  FLOPs (compiled)", f"{prog['flops']:.4g}  ({prog['flops_note']})"))
      rows.append(("  fits", _fits_row(prog, result)))
  else:
    rows += [
        ("model", f"{result['model']}  {result['num_params'] / 1e6:.1f}M params, "
                  f"{result['dtype']}, attn={result['attn_impl']} (config "
                  f"{result.get('attn_impl_config')}, {result.get('mosaic_custom_calls', 0)} "
                  f"Mosaic calls)"),
        ("mesh", f"{result['mesh']}  ({result['num_devices']} devices)"),
        ("mesh order", _mesh_order_row(result)),
        ("batch", f"{result['batch_size']} x L={result['seq_len']} (microbatch "
                  f"{result['microbatch_size']}, {result['per_device_microbatch']} per device)"),
        ("state / device", _gb(result["state_bytes_per_device"]) + "  (params, Adam, EMA)"),
    ]
    rows += _memory_rows(result)
    rows.append(("compile", f"{result.get('compile_seconds', 0):.1f} s"))
    if "resource_exhausted" not in result:
      rows.append(("FLOPs / device", f"{result['flops_per_device']:.4g} per step (compiled; "
                                     f"{result.get('flops_note', 'XLA cost analysis')})"))
    if "model_flops_per_step" in result:
      rows.append(("model FLOPs", f"{result['model_flops_per_step']:.4g} per step, "
                                  f"{result['model_flops_per_device']:.4g} / device (analytic)"))
    rows.append(("fits", _fits_row(result, result)))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_plan(config, workdir: str) -> dict:
  """--mode=plan: WORKDIR/plan.json and a printed table (process 0 writes)."""
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir)
  result = plan(config)
  if jax.process_index() == 0:
    fileio.atomic_write_text(os.path.join(workdir, "plan.json"), json.dumps(result, indent=2))
    print(format_table(result))
  return result


def _main(argv):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg_path, out_path = argv[1], argv[2]
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  result = compile_plan(config, compiler="cpu-virtual")
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _main(sys.argv)
