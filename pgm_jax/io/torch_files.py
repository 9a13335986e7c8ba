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

import json
import os
import struct
from typing import Any

import numpy as np


class ReadError(ValueError):
  """A file that cannot be read as a checkpoint (message is one line)."""



_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file as {name: numpy array} (no torch; bf16 via ml_dtypes)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ReadError(f"--from={path}: not a safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 * 2 ** 20:
      raise ReadError(f"--from={path}: not a safetensors file (header length {n} does not "
                         f"fit the {size}-byte file)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ReadError(f"--from={path}: not a safetensors file ({e})") from None
  if not isinstance(header, dict):
    raise ReadError(f"--from={path}: not a safetensors file (the header is not a JSON object)")
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else b""
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      code = info["dtype"]
      start, end = (int(x) for x in info["data_offsets"])
      shape = tuple(int(d) for d in info["shape"])
    except (TypeError, KeyError, ValueError):
      raise ReadError(f"--from={path}: tensor {name!r} has a malformed header entry "
                         f"{info!r}") from None
    if code == "BF16":
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      dtype = np.dtype(ml_dtypes.bfloat16)
    elif code in _ST_DTYPES:
      dtype = np.dtype(_ST_DTYPES[code])
    else:
      raise ReadError(f"--from={path}: tensor {name} has unsupported dtype {code}")
    if not 0 <= start <= end <= size - 8 - n or (end - start) != dtype.itemsize * int(
        np.prod(shape)):
      raise ReadError(f"--from={path}: tensor {name!r} (shape {shape}, {code}) does not "
                         f"fit its data_offsets [{start}, {end}] in the {size}-byte file")
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
  return out


def read_safetensors_metadata(path: str) -> dict:
  """The `__metadata__` strings of a safetensors file ({} if none)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  return dict(header.get("__metadata__") or {})


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
