r"""Imports the authors' PyTorch checkpoints (PartitionDIT, MDLM DiT) as Orbax checkpoints.

  python -m pgm_jax.tools.convert --from=last.ckpt --to=workdirs/owt_pgm \
      --config=configs/owt.py:pgm_6_6 [--config.key=value ...] [--ema_only | --raw_only]

Reads, in order of preference:
  * safetensors (`.safetensors`): a flat state dict; no code runs, torch not needed.
    EMA weights may be stored next to the raw ones under `ema.<name>`.
  * a Lightning `.ckpt` (or `.pt`/`.pth`/`.bin`): `state_dict` holds the raw weights
    under the prefix `backbone.`, `ema.shadow_params` the EMA weights as a list in
    the backbone's `parameters()` order; `global_step` becomes the Orbax step.
  * the authors' image checkpoints (`images_pgm_*_100epochs.ckpt`, `maskgit_100epochs.ckpt`,
    and whatever their image trainer saves): a pickle with `model_state_dict` (the network's
    state dict, no prefix) and `iter`, which becomes the Orbax step. They hold no EMA
    weights (their trainer writes the EMA as another file of the same layout).
  * a plain PyTorch state dict (`.pt`/`.pth`/`.bin`), with or without `backbone.`.

SAFETY: a pickled PyTorch file (`.ckpt`/`.pt`/`.pth`/`.bin`) can run arbitrary code
when unpickled. This tool loads it with `torch.load(weights_only=True)`, which only
builds tensors and plain containers; the non-tensor objects a Lightning checkpoint
also holds (hyper-parameters as OmegaConf objects, callbacks' state) are replaced by
inert placeholders (`pgm_jax.io.torch_files.Placeholder`, never called into), so no code from the file
runs. Only with `--unsafe_pickle` (off by default) is the file fully unpickled,
which runs whatever code it contains: use it only for files you trust. Converting to
safetensors once avoids the question (and the torch dependency) entirely.

Every name and shape is checked against the model that `--config` builds (missing and
unexpected keys are listed in one error line; a wrong shape names the key and both
shapes); a file whose names are another model's says which model it looks like (text
PGM, MDLM, image PGM, MaskGIT) and what is missing. The checkpoint is written to WORKDIR/checkpoints/<step> in the trainer's
TrainState layout (params = raw weights, ema_params = EMA weights, a freshly
initialised optimizer state), so `--mode=eval`, `--mode=sample` and training resume
all restore it. See docs/convert.md for the name mapping.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from pgm_jax.core import cli
from pgm_jax.io import hub, torch_files
from pgm_jax.io import torch_names
from pgm_jax.io.torch_names import flax_path_to_torch_name
from pgm_jax.io.torch_files import ReadError, is_tensor, read_safetensors, read_safetensors_metadata, read_torch, to_numpy

ROPE_BASE = 10000.0
# Persistent buffers of the reference modules: checked, never converted.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "pos_freqs")


class ConvertError(ReadError):
  """A checkpoint that cannot be converted (message is one line)."""


# ----------------------------------------------------------------------------
# Name mapping: Flax parameter path <-> reference state-dict name.
# ----------------------------------------------------------------------------

def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def expected_torch_params(abstract_params, name_fn=flax_path_to_torch_name
                          ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
  """{torch name: (flax path, torch shape, transpose)} for every parameter of the model;
  `name_fn` is the family's `torch_name` (default: the text models' names)."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    keys = _path_keys(path)
    name, transpose = name_fn(keys)
    shape = tuple(leaf.shape)
    out[name] = (keys, shape[::-1] if transpose else shape, transpose)
  return out


# ----------------------------------------------------------------------------
# Checkpoint structure.
# ----------------------------------------------------------------------------

class Loaded:
  """Raw and EMA weights of a checkpoint, by reference name (`backbone.` dropped)."""

  def __init__(self):
    self.raw: dict[str, np.ndarray] = {}       # insertion order = file order
    self.ema: Optional[dict[str, np.ndarray]] = None
    self.ema_list: Optional[list[np.ndarray]] = None
    self.global_step: Optional[int] = None
    self.ignored: list[str] = []               # non-backbone entries of a Lightning state_dict
    self.placeholders: list[str] = []
    self.fmt = ""
    self.source = ""                           # the file (error messages)
    # algo.time_conditioning as recorded by the training run (Lightning hyper-parameters or
    # safetensors metadata); None when the file does not say.
    self.time_conditioning: Optional[bool] = None


def _strip(name: str) -> str:
  for prefix in ("module.", "_orig_mod."):
    if name.startswith(prefix):
      name = name[len(prefix):]
  return name


def _split_prefix(sd: dict, out: Loaded) -> dict[str, Any]:
  """Keeps the backbone's entries of a state dict, without the `backbone.` prefix."""
  names = [_strip(k) for k in sd]
  has_backbone = any(n.startswith("backbone.") for n in names)
  result = {}
  for key, name in zip(sd, names):
    if has_backbone:
      if not name.startswith("backbone."):
        out.ignored.append(key)
        continue
      name = _strip(name[len("backbone."):])
    result[name] = sd[key]
  return result


def _as_bool(value) -> Optional[bool]:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return value.strip().lower() == "true"
  return None


def find_hparam(obj, key: str, depth: int = 0):
  """The first value stored under `key` anywhere in a checkpoint's hyper-parameters.

  Walks plain containers and the placeholders that stand for OmegaConf objects (their
  pickled state: a DictConfig keeps its items in `_content`, a value node in `_val`),
  without running any code. Returns None if the key is absent.
  """
  if depth > 40:
    return None
  if isinstance(obj, torch_files.Placeholder):
    return find_hparam(obj.__dict__.get("_state"), key, depth + 1)
  if isinstance(obj, dict):
    if key in obj:
      value = obj[key]
      if isinstance(value, torch_files.Placeholder):
        value = value.__dict__.get("_state")
      if isinstance(value, dict) and "_val" in value:
        value = value["_val"]
      return value
    for value in obj.values():
      found = find_hparam(value, key, depth + 1)
      if found is not None:
        return found
    return None
  if isinstance(obj, (list, tuple)):
    for value in obj:
      found = find_hparam(value, key, depth + 1)
      if found is not None:
        return found
  return None


def interpret(obj, fmt: str) -> Loaded:
  """Finds raw weights, EMA weights and the step in a loaded checkpoint object."""
  out = Loaded()
  out.fmt = fmt
  if not isinstance(obj, dict):
    raise ConvertError(f"checkpoint: expected a dict at top level, got {type(obj).__name__}")
  if "state_dict" in obj and isinstance(obj["state_dict"], dict):
    sd = obj["state_dict"]
    ema = obj.get("ema")
    if isinstance(ema, dict) and "shadow_params" in ema:
      out.ema_list = [to_numpy(x) for x in ema["shadow_params"]]
    step = obj.get("global_step")
    if step is not None:
      out.global_step = int(step)
    out.fmt = f"{fmt}, Lightning layout"
    out.time_conditioning = _as_bool(find_hparam(obj.get("hyper_parameters"),
                                                 "time_conditioning"))
  elif "model_state_dict" in obj and isinstance(obj["model_state_dict"], dict):
    # The authors' image trainer (`save_network`): {'iter', 'global_epoch',
    # 'model_state_dict', 'optimizer_state_dict'}; the state dict has no prefix.
    sd = obj["model_state_dict"]
    step = obj.get("iter")
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step >= 0:
      out.global_step = int(step)
    out.ignored.extend(k for k in obj if k not in ("model_state_dict", "iter")
                       and obj[k] is not None)
    out.fmt = f"{fmt}, image trainer layout (model_state_dict)"
  else:
    sd = {k: v for k, v in obj.items() if is_tensor(v)}
    if not sd:
      raise ConvertError("checkpoint: no tensors found (expected a Lightning checkpoint with "
                         "'state_dict', the authors' image checkpoint with 'model_state_dict', "
                         "or a flat state dict)")
    skipped = [k for k in obj if not is_tensor(obj[k])]
    out.ignored.extend(skipped)
  bad = [k for k, v in sd.items() if not is_tensor(v)]
  sd = {k: v for k, v in sd.items() if is_tensor(v)}
  out.ignored.extend(bad)
  # A flat file may carry EMA weights as `ema.<name>` next to the raw ones.
  ema_named = {k[len("ema."):]: v for k, v in sd.items() if k.startswith("ema.")}
  sd = {k: v for k, v in sd.items() if not k.startswith("ema.")}
  out.raw = {k: to_numpy(v) for k, v in _split_prefix(sd, out).items()}
  if ema_named:
    out.ema = {k: to_numpy(v) for k, v in _split_prefix(ema_named, Loaded()).items()}
  return out


def load_checkpoint(path: str, *, unsafe_pickle: bool = False) -> Loaded:
  if not os.path.exists(path):
    raise ConvertError(f"--from={path}: no such file")
  if path.endswith(".safetensors"):
    loaded = interpret(read_safetensors(path), "safetensors")
    loaded.time_conditioning = _as_bool(
        read_safetensors_metadata(path).get("time_conditioning"))
    loaded.source = path
    return loaded
  obj, placeholders = read_torch(path, unsafe_pickle=unsafe_pickle)
  loaded = interpret(obj, "pickle, unsafe" if unsafe_pickle else "pickle, weights_only")
  loaded.placeholders = placeholders
  loaded.source = path
  return loaded


# ----------------------------------------------------------------------------
# Validation and conversion.
# ----------------------------------------------------------------------------

def _is_buffer(name: str) -> bool:
  return name.endswith(BUFFER_SUFFIXES)


def check_buffers(raw: dict[str, np.ndarray], head_dim: int) -> list[str]:
  """Checks known buffers (RoPE inv_freq) against the config; returns their names."""
  names = [n for n in raw if _is_buffer(n)]
  want = 1.0 / (ROPE_BASE ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  for name in names:
    if not name.endswith("inv_freq"):
      continue                      # GroupSwap pos_freqs: recomputed by the model
    got = np.asarray(raw[name], np.float64)
    if got.shape != want.shape:
      raise ConvertError(
          f"{name} has shape {got.shape}, the config expects {want.shape} "
          f"(head_dim = hidden / num_heads = {head_dim}; check config.model.num_heads)")
    if not np.allclose(got, want, rtol=1e-5, atol=0):
      raise ConvertError(
          f"{name} differs from 1/10000^(arange(0,{head_dim},2)/{head_dim}) "
          f"(max abs diff {np.abs(got - want).max():.3g}): a RoPE base or head_dim this model "
          f"does not support")
  return names


def _fmt_list(names: list[str], limit: int = 20) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def known_references() -> list:
  """The reference models of the registered families (each once)."""
  from pgm_jax import families  # pylint: disable=g-import-not-at-top
  refs = []
  for family in families.REGISTRY.values():
    if family.torch_reference is not None and family.torch_reference not in refs:
      refs.append(family.torch_reference)
  return refs


def _mismatch_message(what: str, names, missing: list[str], unexpected: list[str],
                      expected: dict, family=None, source: str = "") -> str:
  """One line for a state dict whose names are not the config's model: which reference model
  the names look like (guessed from marker names), and what is missing."""
  parts = []
  if missing:
    parts.append(f"missing keys [{_fmt_list(missing)}]")
  if unexpected:
    parts.append(f"unexpected keys [{_fmt_list(unexpected)}]")
  check = "(check config.model.kind/enc_layers/dec_layers/num_layers/register/query_mode)"
  src = f"--from={source}" if source else "the checkpoint"
  refs = known_references()
  best = torch_names.best_references(names, refs)
  ours = None if family is None else family.torch_reference
  if not best:
    kinds = "; ".join(r.description for r in refs)
    return (f"{what} does not match the config: {'; '.join(parts)}; {src} has the names of no "
            f"known reference model ({kinds})")
  if family is None or ours in best:
    return (f"{src} looks like {(ours or best[0]).description} but does not match the config: "
            f"{'; '.join(parts)} {check}")
  guess = best[0]
  return (f"{src} looks like {guess.description}, but --config builds "
          f"config.model.kind={family.name!r}: pass "
          f"{guess.config_hint} ({len(missing)} of the config's {len(expected)} names are "
          f"missing: {_fmt_list(missing, 4)})")


def match_names(weights: dict[str, np.ndarray], expected: dict, what: str, *, family=None,
                source: str = "") -> None:
  missing = [n for n in expected if n not in weights]
  unexpected = [n for n in weights if n not in expected]
  if missing or unexpected:
    raise ConvertError(_mismatch_message(what, list(weights), missing, unexpected, expected,
                                         family, source))
  for name, (_, shape, _) in expected.items():
    got = tuple(weights[name].shape)
    if got != shape:
      raise ConvertError(
          f"{what}: {name} has shape {got}, the config expects {shape} "
          f"(check config.model.hidden/num_heads/cond_dim/mlp_ratio and the tokenizer's "
          f"vocab size)")


def ema_by_name(loaded: Loaded, param_names: list[str], expected: dict) -> Optional[dict]:
  """EMA weights by name: `ema.shadow_params` follow the state dict's parameter order."""
  if loaded.ema is not None:
    return loaded.ema
  if loaded.ema_list is None:
    return None
  if len(loaded.ema_list) != len(param_names):
    raise ConvertError(
        f"ema.shadow_params has {len(loaded.ema_list)} tensors, the state dict has "
        f"{len(param_names)} parameters (buffers excluded): cannot pair them")
  ema = dict(zip(param_names, loaded.ema_list))
  for name, value in ema.items():
    want = expected.get(name, (None, None, None))[1]
    if want is not None and tuple(value.shape) != want:
      raise ConvertError(
          f"ema.shadow_params: the entry paired with {name} has shape {tuple(value.shape)}, "
          f"the config expects {want} (is the state dict in parameters() order?)")
  return ema


def to_flax_tree(weights: dict[str, np.ndarray], abstract_params, expected: dict):
  """numpy float32 tree with the structure of `abstract_params`."""
  import jax  # pylint: disable=g-import-not-at-top
  by_path = {}
  for name, (keys, _, transpose) in expected.items():
    arr = np.asarray(weights[name], dtype=np.float32)
    by_path[keys] = np.ascontiguousarray(arr.T if transpose else arr)
  return jax.tree_util.tree_map_with_path(lambda p, _: by_path[_path_keys(p)], abstract_params)


def drop_tied(weights: dict[str, np.ndarray], tied, what: str) -> tuple[dict, list[str]]:
  """Removes the entries that repeat another parameter (`ReferenceModel.tied`: MaskGIT's
  head.weight is tok_emb.weight) after checking that they do; returns (rest, dropped)."""
  dropped = []
  for alias, target in tied:
    if alias not in weights:
      continue
    if target in weights:
      a, b = np.asarray(weights[alias]), np.asarray(weights[target])
      if a.shape != b.shape or not np.array_equal(a, b):
        raise ConvertError(
            f"{what}: {alias} should be tied to {target} (the same tensor) but differs from it "
            f"(shapes {a.shape} and {b.shape}): not a checkpoint of this model")
    dropped.append(alias)
  return {k: v for k, v in weights.items() if k not in dropped}, dropped


def convert_weights(loaded: Loaded, abstract_params, head_dim: int, *,
                    ema_only: bool = False, raw_only: bool = False,
                    name_fn=None, family=None):
  """(params, ema_params, info) as numpy trees shaped like `abstract_params`.

  `family`: the config's model family: its `torch_name` (Flax path -> reference name) and
  `torch_reference` (tied entries; what a mismatching file looks like). `name_fn` overrides
  its `torch_name` (default without a family: the text models' names)."""
  if ema_only and raw_only:
    raise ConvertError("--ema_only and --raw_only are mutually exclusive")
  if name_fn is None:
    name_fn = family.torch_name if family is not None else flax_path_to_torch_name
  tied = family.torch_reference.tied if family is not None and family.torch_reference else ()
  expected = expected_torch_params(abstract_params, name_fn)
  buffers = check_buffers(loaded.raw, head_dim)
  raw = {k: v for k, v in loaded.raw.items() if k not in buffers}
  raw, tied_found = drop_tied(raw, tied, "state_dict")
  match_names(raw, expected, "state_dict", family=family, source=loaded.source)
  ema = ema_by_name(loaded, list(raw), expected)
  if ema is not None:
    ema = {k: v for k, v in ema.items() if not _is_buffer(k)}
    ema, _ = drop_tied(ema, tied, "EMA weights")
    match_names(ema, expected, "EMA weights", family=family, source=loaded.source)
  if ema_only and ema is None:
    raise ConvertError("--ema_only: the checkpoint has no EMA weights")
  raw_tree = to_flax_tree(raw, abstract_params, expected)
  ema_tree = to_flax_tree(ema, abstract_params, expected) if ema is not None else None
  if ema_only:
    params, ema_params, where = ema_tree, ema_tree, "params <- EMA, ema_params <- EMA"
  elif raw_only or ema_tree is None:
    params, ema_params = raw_tree, raw_tree
    where = ("params <- raw, ema_params <- raw" +
             ("" if raw_only else " (the checkpoint has no EMA weights)"))
  else:
    params, ema_params, where = raw_tree, ema_tree, "params <- raw, ema_params <- EMA"
  info = dict(num_params=int(sum(int(np.prod(s)) for _, s, _ in expected.values())),
              num_tensors=len(expected), buffers=buffers, tied=tied_found, where=where)
  return params, ema_params, info


def check_time_conditioning(loaded: Loaded, config) -> str:
  """Refuses a checkpoint whose recorded time conditioning differs from the config's:
  the conditioning input would silently be wrong. Returns a line for the summary."""
  want = bool(config.model.get("time_conditioning", False))
  got = loaded.time_conditioning
  if got is None:
    return (f"time conditioning: not recorded in the checkpoint; using "
            f"config.model.time_conditioning={want}")
  if got != want:
    raise ConvertError(
        f"the checkpoint was trained with time_conditioning={got} (its hyper-parameters "
        f"say so) but config.model.time_conditioning={want}: rerun with "
        f"--config.model.time_conditioning={got}" +
        (" (MDLM only)" if got else ""))
  return f"time conditioning: {got} (checkpoint and config agree)"


def build_state(setup, params, ema_params, step: int):
  """A sharded TrainState like the trainer's, with a fresh optimizer state."""
  import jax  # pylint: disable=g-import-not-at-top
  from pgm_jax import steps  # pylint: disable=g-import-not-at-top
  sh = setup.state_shardings
  put = lambda tree, shardings: jax.tree.map(jax.device_put, tree, shardings)
  params = put(params, sh.params)
  ema_params = put(ema_params, sh.ema_params)
  opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(params)
  step_arr = jax.device_put(np.asarray(step, dtype=setup.abstract_state.step.dtype), sh.step)
  return steps.TrainState(step=step_arr, params=params, opt_state=opt_state,
                          ema_params=ema_params)


def convert(config, src: str, workdir: str, *, ema_only: bool = False, raw_only: bool = False,
            unsafe_pickle: bool = False, step: Optional[int] = None, log=print) -> dict:
  """Reads `src`, checks it against `config`, writes WORKDIR/checkpoints/<step> and
  WORKDIR/config.json (the config that rebuilds the model: eval, sample, the notebook).

  Everything is checked before anything is written, and nothing is overwritten.
  """
  from pgm_jax import experiment
  from pgm_jax.core import fileio  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import checkpointing
  if ema_only and raw_only:
    raise ConvertError("--ema_only and --raw_only are mutually exclusive")
  if step is not None and step < 0:
    raise ConvertError(f"--step={step}: must be >= 0")
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConvertError(f"--to={workdir} is a file, not a folder")
  existing = checkpointing.latest_step(ckpt_dir)
  if existing is not None:
    raise ConvertError(f"--to={workdir}: {ckpt_dir} already holds checkpoint {existing}; "
                       f"convert into an empty workdir")
  fileio.check_writable_dir(workdir, "--to", create=False)
  src = hub.resolve(src, "--from", log)  # hf:OWNER/REPO/FILE[@REV] -> its file in the HF cache
  if not os.path.isfile(src):
    raise ConvertError(f"--from={src}: no such file")
  setup = experiment.make_setup(config)
  loaded = load_checkpoint(src, unsafe_pickle=unsafe_pickle)
  time_line = check_time_conditioning(loaded, config)
  params, ema_params, info = convert_weights(
      loaded, setup.abstract_state.params, setup.model_cfg.head_dim, ema_only=ema_only,
      raw_only=raw_only, family=setup.family)
  if step is None:
    step = loaded.global_step if loaded.global_step is not None else 0
  if step < 0:
    raise ConvertError(f"--from={src}: global_step={step} is negative; pass --step")
  state = build_state(setup, params, ema_params, step)
  manager = checkpointing.make_manager(ckpt_dir)
  try:
    checkpointing.save(manager, step, state, wait=True)
  finally:
    manager.close()
  fileio.atomic_write_text(os.path.join(workdir, "config.json"),
                           config.to_json_best_effort(indent=2))
  info.update(step=step, source=src, format=loaded.fmt, checkpoint=os.path.join(ckpt_dir, str(step)),
              model=config.model.kind, ignored=loaded.ignored, placeholders=loaded.placeholders)
  log(f"read {src} [{loaded.fmt}]")
  if loaded.placeholders:
    log(f"  non-tensor objects not loaded (placeholders): {_fmt_list(loaded.placeholders, 8)}")
  if loaded.ignored:
    log(f"  ignored {len(loaded.ignored)} entries (not the network's weights): "
        f"{_fmt_list(loaded.ignored, 8)}")
  if info["buffers"]:
    log(f"  buffers checked, not converted: {', '.join(info['buffers'])}")
  if info["tied"]:
    log(f"  tied entries checked equal to their parameter, not converted: "
        f"{', '.join(info['tied'])}")
  log(f"  {config.model.kind}: {info['num_tensors']} tensors, {info['num_params']:,} parameters "
      f"matched the config")
  log(f"  {info['where']}; opt_state freshly initialised; step {step}")
  log(f"  {time_line}")
  log(f"wrote {info['checkpoint']} and {os.path.join(workdir, 'config.json')}")
  return info


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

def define_flags(flag_values=None, sys_argv=None):
  """The converter's flags on `flag_values` (default: absl's global FLAGS); `sys_argv`:
  where config_flags finds the --config.* overrides (default: sys.argv)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  config_flags.DEFINE_config_file(
      "config", None, "Config file (with presets) describing the model: configs/x.py:preset. "
      "Overrides: --config.model.hidden=... etc.", lock_config=True, flag_values=fv,
      sys_argv=sys_argv)
  flags.DEFINE_string(
      "from", None, "Checkpoint to read: .safetensors (preferred: no code runs), or a pickled "
      "PyTorch .ckpt/.pt/.pth/.bin. WARNING: unpickling a file can run code from it; it is "
      "loaded with torch.load(weights_only=True) and non-tensor objects become inert "
      "placeholders unless --unsafe_pickle is given.", flag_values=fv)
  fv["from"].help += (" A local path, or hf:OWNER/REPO/FILE[@REVISION]: downloaded into the "
                      "Hugging Face cache (pip install 'pgm_jax[hub]'; docs/released_checkpoints.md).")
  flags.DEFINE_string("to", None, "Workdir to write: WORKDIR/checkpoints/<step> and "
                      "WORKDIR/config.json (must not hold a checkpoint yet).", flag_values=fv)
  flags.DEFINE_bool("ema_only", False, "Use the EMA weights for both params and ema_params.",
                    flag_values=fv)
  flags.DEFINE_bool("raw_only", False, "Use the raw weights for both params and ema_params.",
                    flag_values=fv)
  flags.DEFINE_bool("unsafe_pickle", False, "Fully unpickle the file (torch.load "
                    "weights_only=False). THIS RUNS CODE FROM THE FILE: trusted files only.",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "Step to save under (default: the checkpoint's "
                       "global_step, else 0).", flag_values=fv)
  flags.mark_flags_as_required(["config", "from", "to"], flag_values=fv)


PROG = "pgm_jax.tools.convert"


def main(argv, flag_values=None):
  """The body of `python -m pgm_jax.tools.convert` once flags are parsed (absl `app.run`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.error_exit(PROG, f"unexpected arguments {argv[1:]} (flags are --name=value)", 2)
  f = flags.FLAGS if flag_values is None else flag_values

  def load_config():
    try:
      config = f["config"].value
      config.get("model")  # config files load lazily: surface a bad path here
      return config
    except Exception as e:  # pylint: disable=broad-except  # any error inside the file
      raise ValueError(f"--config: {cli.one_line(e)}") from None

  config = cli.guarded(PROG, load_config)
  cli.guarded(PROG, convert, config, f["from"].value, f["to"].value,
              ema_only=f["ema_only"].value, raw_only=f["raw_only"].value,
              unsafe_pickle=f["unsafe_pickle"].value, step=f["step"].value)


def run(argv) -> None:
  """`python -m pgm_jax.tools.convert ARGV...` in this process, on a fresh set of flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = [PROG, *argv]
  fv = flags.FlagValues()
  define_flags(fv, sys_argv=argv)
  main(cli.flags_parser(PROG, fv)(argv), fv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main, flags_parser=cli.flags_parser(PROG))
