"""pgm_jax.io.torch_files.read_safetensors (the `safetensors` library, framework="numpy")
against the hand-written reader it replaced, kept here as the oracle: same names, dtypes
(bf16 as ml_dtypes.bfloat16) and bytes; metadata; malformed files as one-line ReadErrors;
no torch needed. No JAX compiles."""
import json
import os
import struct
import sys

import ml_dtypes
import numpy as np
import pytest

from pgm_jax.io import torch_files
from pgm_jax.io.torch_files import ReadError

_ORACLE_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                  "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
                  "BF16": ml_dtypes.bfloat16}


def _oracle_read(path):
  """The former read_safetensors, without its error checks (good files only)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], np.dtype(_ORACLE_DTYPES[info["dtype"]])
                              ).reshape(info["shape"])
  return out, dict(header.get("__metadata__") or {})


def _write(path, tensors, metadata=None, extra=None):
  """A file laid out as our tests' hand-written writers do (header in insertion order)."""
  header, blobs, offset = {}, [], 0
  if metadata is not None:
    header["__metadata__"] = metadata
  for name, (code, value) in tensors.items():
    data = np.ascontiguousarray(value).tobytes()
    header[name] = {"dtype": code, "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  header.update(extra or {})
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
  return str(path)


def _all_dtypes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  return {
      "w.f32": ("F32", x), "w.f64": ("F64", x.astype(np.float64)),
      "w.f16": ("F16", x.astype(np.float16)), "a.bf16": ("BF16", x.astype(ml_dtypes.bfloat16)),
      "i64": ("I64", rng.integers(-9, 9, (4,))), "i32": ("I32", np.arange(6, dtype=np.int32)),
      "i16": ("I16", np.arange(3, dtype=np.int16)), "i8": ("I8", -np.arange(5, dtype=np.int8)),
      "u8": ("U8", np.arange(7, dtype=np.uint8)), "mask": ("BOOL", x > 0),
      "scalar": ("F32", np.array(2.5, np.float32)), "empty": ("F32", np.zeros((0, 4), np.float32)),
  }


def test_matches_the_hand_written_reader(tmp_path):
  tensors = _all_dtypes()
  path = _write(tmp_path / "all.safetensors", tensors, metadata={"time_conditioning": "true"})
  got = torch_files.read_safetensors(path)
  want, want_meta = _oracle_read(path)
  assert list(got) == list(want) == list(tensors)  # the header's order
  for name, array in want.items():
    assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
    assert got[name].tobytes() == array.tobytes(), name
  assert got["a.bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
  assert got["w.f32"].dtype == np.float32 and got["mask"].dtype == np.bool_
  assert torch_files.read_safetensors_metadata(path) == want_meta == {"time_conditioning": "true"}
  no_meta = _write(tmp_path / "plain.safetensors", {"w": ("F32", np.ones(2, np.float32))})
  assert torch_files.read_safetensors_metadata(no_meta) == {}


def test_files_written_by_the_library(tmp_path):
  """What HF / torch users hand us: the library's own writer (sorted header, aligned)."""
  from safetensors.numpy import save_file
  tensors = {name: value for name, (_, value) in _all_dtypes().items()}
  path = str(tmp_path / "lib.safetensors")
  save_file(tensors, path, metadata={"k": "v"})
  got = torch_files.read_safetensors(path)
  want, _ = _oracle_read(path)
  assert list(got) == list(want)  # the header's order (by alignment, then name)
  assert list(got) != sorted(got)
  for name, array in want.items():
    assert got[name].dtype == array.dtype and got[name].tobytes() == array.tobytes(), name
  assert torch_files.read_safetensors_metadata(path) == {"k": "v"}


def test_reads_without_torch(tmp_path, monkeypatch):
  path = _write(tmp_path / "a.safetensors", {"a": ("BF16", np.ones(3, ml_dtypes.bfloat16))})
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  got = torch_files.read_safetensors(path)
  assert got["a"].dtype == np.dtype(ml_dtypes.bfloat16)


def _bad_files(tmp_path):
  ones = ("F32", np.ones(4, np.float32))
  root = tmp_path
  (root / "garbage.safetensors").write_bytes(b"garbage bytes, not a header" * 3)
  (root / "empty.safetensors").write_bytes(b"")
  (root / "short.safetensors").write_bytes(b"\x01\x02")
  (root / "list.safetensors").write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")
  (root / "json.safetensors").write_bytes(struct.pack("<Q", 8) + b"{not js}")
  _write(root / "offsets.safetensors", {"w": ones},
         extra={"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
  _write(root / "entry.safetensors", {}, extra={"w": {"dtype": "F32", "shape": "x",
                                                       "data_offsets": [0, 0]}})
  _write(root / "dtype.safetensors", {}, extra={"w": {"dtype": "Q7", "shape": [0],
                                                       "data_offsets": [0, 0]}})
  _write(root / "shape.safetensors", {}, extra={"w": {"dtype": "F32", "shape": [3],
                                                       "data_offsets": [0, 0]}})
  path = _write(root / "truncated.safetensors", {"w": ones})
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 4)
  return {p.name: str(p) for p in root.iterdir()}


def test_malformed_files_are_one_line_read_errors(tmp_path):
  for name, path in _bad_files(tmp_path).items():
    for read in (torch_files.read_safetensors, torch_files.read_safetensors_metadata):
      with pytest.raises(ReadError) as e:
        read(path)
      message = str(e.value)
      assert "\n" not in message, (name, message)
      assert message.startswith(f"--from={path}: not a safetensors file ("), (name, message)
      assert "Error while deserializing" not in message, message
  assert isinstance(ReadError("x"), ValueError)


def test_unsupported_dtype_names_the_tensor(tmp_path):
  """The library reads unsigned 16-64 bit and float8 too; we still refuse them, as before."""
  path = _write(tmp_path / "u16.safetensors", {"ok": ("F32", np.ones(2, np.float32)),
                                               "w": ("U16", np.ones(2, np.uint16))})
  with pytest.raises(ReadError, match=r"tensor w has unsupported dtype U16$"):
    torch_files.read_safetensors(path)
  path = _write(tmp_path / "f8.safetensors", {"w": ("F8_E4M3", np.ones(2, np.uint8))})
  with pytest.raises(ReadError, match=r"tensor w has unsupported dtype F8_E4M3$"):
    torch_files.read_safetensors(path)


def test_missing_file_stays_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    torch_files.read_safetensors(str(tmp_path / "nope.safetensors"))
