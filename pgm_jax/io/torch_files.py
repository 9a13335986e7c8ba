"""Readers of PyTorch and safetensors checkpoint files, below every model.

    read_safetensors(path) -> {name: np.ndarray}   (the `safetensors` library; bf16 kept)
    read_safetensors_metadata(path) -> {str: str}
    read_torch(path, unsafe_pickle=False) -> (object, placeholder names)   (torch.load, safely)
    to_numpy(x), is_tensor(x)

Used by the converter (`pgm_jax.tools.convert`), the VQ-8 and Inception weight loaders
(`pgm_jax.models.vq`, `pgm_jax.models.inception`) and the GPT-2 judge. Errors are
`ReadError` (a ValueError whose message is one line naming the file).
"""
from __future__ import annotations

from typing import Any

# safetensors' numpy reader asks numpy for the dtype "bfloat16", which exists only once
# ml_dtypes (a jax dependency) has registered it: without this import BF16 is a TypeError.
import ml_dtypes  # pylint: disable=unused-import
import numpy as np
import safetensors


class ReadError(ValueError):
  """A file that cannot be read as a checkpoint (message is one line)."""



# The dtypes read_safetensors accepts (the file's codes). safetensors reads a few more
# (unsigned 16-64 bit, the float8 family) that no checkpoint we convert holds; they stay
# refused with the same one-line error as before.
_ST_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})
_ST_HEADER_ERROR = "Error while deserializing header: "


def _not_safetensors(path: str, error: Exception) -> ReadError:
  """The library's error (SafetensorError, or OSError for a folder) as our one line."""
  detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
  detail = detail[len(_ST_HEADER_ERROR):] if detail.startswith(_ST_HEADER_ERROR) else detail
  return ReadError(f"--from={path}: not a safetensors file ({detail})")


def _safe_open(path: str):
  """`safetensors.safe_open(path, framework="numpy")`, errors as ReadError (a missing file
  stays FileNotFoundError, as os.path.getsize raised it before)."""
  try:
    return safetensors.safe_open(path, framework="numpy")
  except FileNotFoundError:
    raise
  except (safetensors.SafetensorError, OSError) as e:
    raise _not_safetensors(path, e) from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file as {name: numpy array}, read by the `safetensors` library (no torch).

  Arrays keep the file's dtype: F32 -> float32, BF16 -> ml_dtypes.bfloat16, ... The library
  validates the whole header (JSON, dtypes, offsets that tile the data exactly) before any
  tensor is read. Names come in data-offset order (`offset_keys`, not the sorted `keys`):
  the order of the header itself for every writer we know (the library's own included), as
  the hand-written reader this replaced returned them.
  """
  out = {}
  with _safe_open(path) as f:
    for name in f.offset_keys():
      code = f.get_slice(name).get_dtype()
      if code not in _ST_DTYPES:
        raise ReadError(f"--from={path}: tensor {name} has unsupported dtype {code}")
      try:
        out[name] = f.get_tensor(name)
      except (safetensors.SafetensorError, OSError, TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReadError(f"--from={path}: tensor {name!r} ({code}) cannot be read: {first}") \
            from None
  return out


def read_safetensors_metadata(path: str) -> dict:
  """The `__metadata__` strings of a safetensors file ({} if none)."""
  with _safe_open(path) as f:
    return dict(f.metadata() or {})


class Placeholder:
  """Stands in for any non-tensor object of a pickled checkpoint (never runs its code)."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.__dict__["_state"] = state

  def __repr__(self):
    return f"<placeholder for {self.qualname}>"


def _placeholder_class(qualname: str):
  return type("Placeholder", (Placeholder,), {"qualname": qualname})


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ReadError(
        f"--from={path}: reading a pickled PyTorch checkpoint needs torch: `pip install torch` "
        f"(CPU wheel is enough), or convert it to .safetensors elsewhere") from None
  return torch


def read_torch(path: str, *, unsafe_pickle: bool = False) -> tuple[Any, list[str]]:
  """torch.load with weights_only=True (non-tensor globals become placeholders).

  Returns (object, names of the globals replaced by placeholders).
  """
  torch = _import_torch(path)
  if unsafe_pickle:
    return torch.load(path, map_location="cpu", weights_only=False), []
  serialization = torch.serialization
  unsafe: list[str] = []
  if hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
    try:
      unsafe = sorted(serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # pylint: disable=broad-except  # legacy (non-zip) format
      unsafe = []
  stubs = [(_placeholder_class(name), name) for name in unsafe]
  try:
    if stubs:
      with serialization.safe_globals(stubs):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ReadError(
        f"--from={path}: the safe loader (torch.load weights_only=True) refused the file "
        f"({first}); if you trust the file, rerun with --unsafe_pickle (runs code from it), "
        f"or convert it to safetensors") from None
  return obj, unsafe


def to_numpy(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, "detach"):  # torch.Tensor: bf16/fp16 go through float32
    t = x.detach().cpu()
    if t.dtype.is_floating_point and t.element_size() < 4:
      t = t.float()
    return t.numpy()
  return np.asarray(x)


def is_tensor(x) -> bool:
  return isinstance(x, np.ndarray) or hasattr(x, "detach")
