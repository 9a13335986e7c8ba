"""One Orbax CheckpointManager per workdir with two items:

  * "state": the TrainState (params, optimizer state, EMA params, step), saved
    asynchronously, always restored against a sharded abstract target (so a pod
    checkpoint restores on one CPU and vice versa);
  * "data": the Grain iterator state (one JSON file per process).

Layout: WORKDIR/checkpoints/<step>/{state,data}. Resume order (see `train.py`):
latest checkpoint in the workdir, else `config.ckpt.restore_from` (full state),
else `config.ckpt.init_params_from` (params only), else a fresh init.

A latest step that fails to restore (a corrupt or truncated file) is not fatal:
`restore_latest` falls back to the previous kept step with a warning that names the
bad one. Nothing is ever deleted: when training resumes, the bad step is moved to
WORKDIR/corrupt_checkpoints/<step> (Orbax could not save that step again otherwise).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging as logging_std
import os
import shutil
import sys
import time
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from pgm_jax.core import cli, sharding


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the config (not a corruption: no fallback)."""


def absolute(path) -> str:
  """A local path made absolute against the working directory (Orbax refuses relative
  ones); URLs (gs://bucket/run) stay as they are: every host must write to the same place."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(absolute(workdir), "checkpoints")


def make_manager(directory: str, ckpt_config=None, *, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  """The one Orbax manager of a checkpoint folder (relative local paths are fine)."""
  directory = absolute(directory)
  kwargs = {}
  if ckpt_config is not None:
    kwargs = dict(max_to_keep=ckpt_config.max_to_keep,
                  keep_period=ckpt_config.get("keep_every"),
                  enable_async_checkpointing=bool(ckpt_config.async_save))
  options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only, **kwargs)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


CHECKSUMS = "checksums.json"


class ChecksumError(ValueError):
  """A saved step whose files no longer match the checksums written when it was saved."""


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _file_digests(step_dir: str) -> dict:
  """{relative path: sha256 hex} of every file of a step's items (state/, data/): the
  arrays and their indices; Orbax's own step metadata next to them is left out."""
  out = {}
  for folder, _, files in os.walk(step_dir):
    for name in sorted(files):
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, step_dir)
      if os.sep in rel:  # not _CHECKPOINT_METADATA, commit_success.txt, checksums.json
        out[rel] = _sha256(path)
  return out


def write_checksums(manager: ocp.CheckpointManager) -> None:
  """Writes STEP/checksums.json (sha256 of every file) for each finished step that has
  none. Process 0, local folders (an object store keeps its own checksums). Orbax's OCDBT
  chunks carry none, so without these a flipped or zeroed block restores as valid."""
  directory = os.fspath(manager.directory)
  if jax.process_index() != 0 or "://" in directory:
    return
  for step in manager.all_steps():
    step_dir = os.path.join(directory, str(step))
    path = os.path.join(step_dir, CHECKSUMS)
    if os.path.isdir(step_dir) and not os.path.exists(path):
      body = json.dumps({"algorithm": "sha256", "files": _file_digests(step_dir)}, indent=0)
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)


def verify_checksums(step_dir) -> bool:
  """Raises ChecksumError naming the files of `step_dir` that differ from its checksums.json
  (or are missing); False when the step has no checksums (saved before they existed, or
  stopped between the save and the checksum), True when every file matches."""
  step_dir = os.fspath(step_dir)
  path = os.path.join(step_dir, CHECKSUMS)
  if "://" in step_dir or not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      want = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ChecksumError(f"{path} is unreadable ({type(e).__name__})") from None
  # Exactly the files the checksums list: each must still be there, with the same bytes.
  bad = sorted(rel for rel, digest in want.items()
               if not os.path.isfile(os.path.join(step_dir, rel))
               or _sha256(os.path.join(step_dir, rel)) != digest)
  if bad:
    raise ChecksumError(f"{len(bad)} file(s) of {step_dir} differ from the checksums written "
                        f"when it was saved (damaged on disk or in a copy): {bad[:3]}")
  return True


class DiskFullError(OSError):
  """A save that ran out of space (or quota): one line that names the folder, what is free
  and the last complete step, instead of Orbax's tracebacks from every writer thread."""

  def __init__(self, message: str):
    super().__init__(message)
    self.errno = errno.ENOSPC


_DISK_FULL_TEXT = ("No space left on device", "os_error_code='28'", "Disk quota exceeded",
                   "os_error_code='122'")


def is_disk_full(error: BaseException) -> bool:
  """An out-of-space error, raised directly or wrapped by tensorstore/Orbax (a ValueError
  "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


class _DropDiskFullTracebacks(logging_std.Filter):
  """Drops log records that carry an out-of-space exception: every Orbax writer thread
  and every pending asyncio task logs its own traceback of the same full disk (over a
  hundred), before and after the one line `wait`/`save` raise for it."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and is_disk_full(exc))


_DISK_FULL_FILTER = _DropDiskFullTracebacks()


def _quiet_disk_full_logs() -> None:
  _drop_closed_loop_callbacks()
  for name in ("absl", "asyncio"):  # Orbax logs through absl; "Task exception was never..."
    logger = logging_std.getLogger(name)
    if _DISK_FULL_FILTER not in logger.filters:
      logger.addFilter(_DISK_FULL_FILTER)


def _free_mib(directory: str) -> str:
  try:
    usage = shutil.disk_usage(directory)
  except OSError:
    return "unknown"
  return f"{usage.free / 2**20:.0f} MiB"


_IN_FLIGHT: dict = {}  # id(manager) -> the step of its last save (async saves fail later)


def _saving(manager: ocp.CheckpointManager, step, fn):
  """Runs a save or a wait; an out-of-space failure becomes one DiskFullError line. A
  failure can surface one save late (an async save fails in the background; the next
  save or wait reports it): the message names the step that was being written."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  # re-raised unless out of space
    if not is_disk_full(e):
      raise
    directory = os.fspath(manager.directory)
    manager.reload()
    committed = manager.all_steps()
    failed = _IN_FLIGHT.pop(id(manager), None)
    if failed is None or failed in committed:  # the previous save went through: this one
      failed = step
    done = [s for s in committed if s != failed]
    last = f"step {max(done)}" if done else "none"
    what = f"checkpoint step {failed}" if failed is not None else "a checkpoint"
    raise DiskFullError(
        f"no space left on the device while saving {what} to {directory} "
        f"({_free_mib(directory)} free; last complete checkpoint: {last}). Free space or "
        f"lower config.ckpt.max_to_keep, then rerun the same command to resume") from None


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the in-flight save, then checksums every finished step."""
  _saving(manager, None, manager.wait_until_finished)
  _IN_FLIGHT.pop(id(manager), None)
  write_checksums(manager)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None, *,
         wait: bool = False) -> None:
  """Saves `step` (async unless `wait`); the steps finished before it get their checksums
  (a new save starts only once the previous one is committed)."""
  _quiet_disk_full_logs()
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  _saving(manager, step, lambda: manager.save(step, args=ocp.args.Composite(**items),
                                              force=True))
  _IN_FLIGHT[id(manager)] = step
  if wait:
    _saving(manager, step, manager.wait_until_finished)
    _IN_FLIGHT.pop(id(manager), None)
  write_checksums(manager)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state,
                     *, subtree: Optional[str] = None) -> None:
  """Raises ValueError naming the first parameter whose shape/presence differs."""
  directory = os.fspath(manager.directory / str(step) / "state")
  meta = manager.item_metadata(step)
  state_meta = meta["state"] if meta is not None and "state" in meta else None
  if state_meta is None:
    raise ValueError(f"checkpoint {directory}: no 'state' item found")
  tree_meta = getattr(state_meta, "tree", state_meta)
  ckpt = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree_meta)[0]}
  want = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if subtree is not None:
    ckpt = {k: v for k, v in ckpt.items() if k.startswith(subtree + "/")}
    want = {k: v for k, v in want.items() if k.startswith(subtree + "/")}
  missing = sorted(set(want) - set(ckpt))
  unexpected = sorted(set(ckpt) - set(want))
  if missing or unexpected:
    raise CheckpointMismatchError(
        f"checkpoint {directory} does not match the config: missing {missing[:5]}"
        f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        f"{'...' if len(unexpected) > 5 else ''} (check config.model.*)")
  for key, spec in want.items():
    got = tuple(getattr(ckpt[key], "shape", ()) or ())
    if got != tuple(spec.shape):
      raise CheckpointMismatchError(
          f"checkpoint {directory}: {key} has shape {got}, the config expects "
          f"{tuple(spec.shape)} (check config.model.* and the tokenizer's vocab size, "
          f"config.data.tokenizer_path)")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter=None, *,
            verify: bool = True):
  """Restores (state, data_iter) at `step` onto the shardings of `abstract_state`, after
  checking the step's files against its checksums (ChecksumError if they differ; `verify`
  False when the caller has just checked them)."""
  _drop_closed_loop_callbacks()
  if verify:
    verify_checksums(manager.directory / str(step))
  check_compatible(manager, step, abstract_state)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  has_data = (manager.directory / str(step) / "data").exists()
  if data_iter is not None and has_data:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], (restored["data"] if "data" in items else None)


class _RestoreFailed(Exception):
  """A step that does not restore on this process or on another one."""


def _is_barrier_mismatch(error: BaseException) -> bool:
  return isinstance(error, AssertionError) and "sync_global_devices name mismatch" in str(error)


def _restore_on_every_process(manager, step, abstract_state, data_iter):
  """restore() where all processes learn whether every process restored `step`.

  Orbax ends a restore with a barrier (a device collective). A process whose read fails
  never reaches it, and the others would wait there forever: the failed process joins it
  with a barrier of another name, which fails it on every process (a name mismatch is an
  error everywhere), so everyone leaves. Then one collective tells all who failed."""
  result, error = None, None
  try:
    result = restore(manager, step, abstract_state, data_iter, verify=False)
  except CheckpointMismatchError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a damaged step: decided below
    error = e
    if jax.process_count() > 1 and not _is_barrier_mismatch(e):
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        multihost_utils.sync_global_devices(f"pgm_jax: step {step} failed to restore")
      except AssertionError:
        pass
  if sharding.any_process([error is not None])[0]:
    here = error is not None and not _is_barrier_mismatch(error)
    raise _RestoreFailed(f"{type(error).__name__}: {cli.one_line(error)}" if here
                         else "does not restore on another process")
  return result


def _is_closed_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_callbacks() -> None:
  """After a failed Orbax save or restore, tensorstore callbacks still pending for it hit
  the closed event loop and report "RuntimeError: Event loop is closed" through
  sys.unraisablehook or sys.excepthook (hundreds of tracebacks, harmless). Drop those,
  keep the rest."""
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
  if getattr(previous_unraisable, "_pgm_jax", False):
    return

  def unraisable_hook(unraisable):
    if not _is_closed_loop(unraisable.exc_value):
      previous_unraisable(unraisable)

  def except_hook(exc_type, exc, tb):
    if not _is_closed_loop(exc):
      previous_except(exc_type, exc, tb)

  unraisable_hook._pgm_jax = True  # pylint: disable=protected-access
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def quarantine(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves step `step` out of the manager's folder (never deletes it); returns where."""
  src = manager.directory / str(step)
  dest_dir = manager.directory.parent / "corrupt_checkpoints"
  dest = dest_dir / str(step)
  if dest.exists():
    dest = dest_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    dest_dir.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"pgm_jax quarantine {step}")
  manager.reload()
  return os.fspath(dest)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iter=None, *,
                   key: str = "--workdir", move_bad: bool = False):
  """(step, state, data_iter) of the newest kept step that restores, or None if none exist.

  A step that fails to restore (anything but a config mismatch, which is raised) logs a
  warning naming it, and the previous kept step is tried. With `move_bad` (training, which
  will save those steps again) the bad steps are moved to corrupt_checkpoints/, not deleted.
  If no step restores: a one-line ValueError naming `key` and the newest step's error.

  With several processes every decision is collective, so all restore the same step or all
  fail: each process checks every step's checksums (a host may read a damaged copy) and a
  step is tried only if it verifies on all; a step whose restore fails on any process is
  given up by all (`_restore_on_every_process`).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  damaged_here = {}
  for step in steps:
    try:
      verify_checksums(manager.directory / str(step))
    except ChecksumError as e:
      damaged_here[step] = f"ChecksumError: {cli.one_line(e)}"
  damaged = sharding.any_process([s in damaged_here for s in steps])
  failed = []
  for step, is_damaged in zip(steps, damaged):
    try:
      if is_damaged:
        raise _RestoreFailed(damaged_here.get(step, "damaged as another process reads it"))
      state, data = _restore_on_every_process(manager, step, abstract_state, data_iter)
    except _RestoreFailed as e:
      failed.append((step, str(e)))
      logging.warning("Checkpoint %s/%d does not restore (%s)%s", manager.directory, step,
                      str(e)[:300], "; trying the previous kept step" if step != steps[-1]
                      else "")
      continue
    for bad, _ in failed:
      where = quarantine(manager, bad) if move_bad else None
      logging.warning(
          "Checkpoint step %d in %s is bad; restored step %d instead. The bad checkpoint was "
          "not deleted%s.", bad, manager.directory, step,
          f": it was moved to {where}" if where else "")
    return step, state, data
  details = "; ".join(f"step {s}: {m[:200]}" for s, m in failed)
  raise ValueError(f"{key}: no checkpoint in {manager.directory} restores ({details}); "
                   f"nothing was deleted")


def restore_params(directory: str, abstract_params, *, key: str = "ema_params",
                   step: Optional[int] = None, flag: str = "config.ckpt.init_params_from"):
  """One parameter tree (`key`: "ema_params" or "params") of a checkpoint's state.

  `directory` is a workdir, its `checkpoints/` folder, or a step folder (relative local
  paths are fine); the latest step is used unless `step` is given. Optimizer state is not
  read. Errors name `flag`, the config key or flag that gave `directory`.
  """
  _drop_closed_loop_callbacks()
  path = epath.Path(absolute(directory))
  if (path / "checkpoints").exists():
    path = path / "checkpoints"
  if (path / "state").exists():
    step_dir = path
  else:
    manager = make_manager(os.fspath(path), read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{flag}: no checkpoint found in {directory}")
    step_dir = path / str(step)
  try:
    verify_checksums(step_dir)
  except ChecksumError as e:
    raise ValueError(f"{flag}: {e}") from None
  target = {key: abstract_params}
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None)), target)
  restored = ocp.PyTreeCheckpointer().restore(
      os.fspath(step_dir / "state"),
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  return restored[key]


def latest_step(directory: str) -> Optional[int]:
  directory = absolute(directory)
  if not epath.Path(directory).is_dir():
    return None
  return make_manager(directory, read_only=True).latest_step()

