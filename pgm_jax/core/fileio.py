"""Output files that are never left half-written, and output folders checked before work.

  atomic_write_text(path, text)  tmp file in the same folder, fsync, rename over `path`
  atomic_write_bytes(path, data) (the same for bytes):
                                 a crash or a full disk leaves the old file or the new one,
                                 never a truncated mix; the file's mode follows the umask
  check_writable_dir(path, flag) one-line ValueError naming `flag` when `path` is a file,
                                 cannot be created, or cannot be written; called before any
                                 work starts, so that nothing is computed and then lost

URLs (gs://...) are left to the object store: an object upload is already all-or-nothing,
and its permissions cannot be probed without writing, so they are not checked here.
"""
from __future__ import annotations

import os
import tempfile

from etils import epath


def is_url(path: str) -> bool:
  return "://" in str(path)


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (local: tmp + fsync + rename; URL: one upload)."""
  atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
  """The process's umask, read without changing it (Linux: /proc/self/status), else by
  the os.umask round trip."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically, as `atomic_write_text` (PNG grids, .npz files).
  The file gets the mode a plain `open(path, "w")` would give it (0o666 less the umask),
  not the temporary file's private 0o600."""
  path = os.fspath(path)
  if is_url(path):
    epath.Path(path).write_bytes(data)
    return
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~current_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def check_writable_dir(path: str, flag: str = "--workdir", *, create: bool = True) -> None:
  """Raises ValueError (naming `flag`) unless `path` is, or can become, a writable folder.

  create=True makes the folder (and its parents) when it is missing; create=False only
  checks that the nearest existing parent could hold it.
  """
  path = os.fspath(path)
  if not path:
    raise ValueError(f"{flag}: empty path")
  if is_url(path):
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag}={path} is a file, not a folder")
  probe_dir = path
  if not os.path.isdir(path):
    if create:
      try:
        os.makedirs(path, exist_ok=True)
      except OSError as e:
        raise ValueError(f"{flag}={path}: cannot create it ({e.strerror or e})") from None
    else:
      probe_dir = os.path.dirname(os.path.abspath(path))
      while probe_dir and not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
      if not os.path.isdir(probe_dir):
        raise ValueError(f"{flag}={path}: {probe_dir} is a file, not a folder")
  try:
    fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".pgm_jax_write_probe.")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{flag}={path} is not writable ({e.strerror or e})") from None


LOCK_NAME = ".pgm_jax.lock"


class WorkdirLock:
  """One writer per workdir: `WORKDIR/.pgm_jax.lock`, held with `fcntl.flock` by the one
  process that writes the workdir's shared files (process 0 of a training job).

  The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a
  crashed job never blocks the next one; the file's content (host, pid, since when) only
  names the holder in the refusal. Read-only modes (eval, sample) do not take it.
  """

  def __init__(self, workdir: str, flag: str = "--workdir"):
    import fcntl  # pylint: disable=g-import-not-at-top  # POSIX
    import json  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
      except ValueError:
        holder = {}
      os.close(fd)
      raise ValueError(
          f"{flag}={workdir} is in use by another job (host {holder.get('host', '?')}, pid "
          f"{holder.get('pid', '?')}, since {holder.get('since', '?')}; {self.path}): stop it "
          f"or choose another {flag}") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
