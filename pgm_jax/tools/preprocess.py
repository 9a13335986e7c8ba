"""One-time conversion of a text corpus into pre-packed ArrayRecord blocks (config.data.name="array_record").

Examples:
  # OpenWebText from a TFDS ArrayRecord build; the last 100k documents are validation (MDLM rule).
  python -m pgm_jax.tools.preprocess --source=tfds:openwebtext --data_dir=~/tensorflow_datasets \
      --tokenizer=gpt2 --seq_len=1024 --val_last_docs=100000 --out=/data/owt_gpt2_1024
  # jsonl / plain-text files (one document per file for text:, per line for jsonl:).
  python -m pgm_jax.tools.preprocess --source='jsonl:/data/corpus/*.jsonl' --val_source='jsonl:/data/val.jsonl' \
      --tokenizer=sentencepiece --tokenizer_path=third_party/sentencepiece/shakespeare_bpe2048.model \
      --seq_len=512 --out=/data/corpus_sp512

  # ImageNet images -> VQ-8 codes (config.data.name="imagenet_codes"; see pgm_jax/data/imagenet.py)
  python -m pgm_jax.tools.preprocess --tokenizer=vq_ds8 --tokenizer_path=vq_ds8_c2i.npz \
      --source=imagefolder:/data/imagenet/train --val_source=imagefolder:/data/imagenet/val \
      --out=/data/imagenet256_codes

Writes OUT/train.array_record, OUT/validation.array_record (one record = one block, int32
little-endian bytes of length seq_len, packed with the OWT rule of
`pipeline.pack_documents`) and OUT/meta.json. Streams: documents are tokenized in chunks and
packed incrementally; with --val_last_docs the last N documents are held back in a bounded queue.

Nothing that exists is destroyed: every flag, the sources (syntax, matching files, their first
document) and --out are checked before any writing; the three files are written under temporary
names in OUT and renamed over the old ones only when the whole corpus has been converted (meta.json
last). A failure midway (a bad line, a full disk, Ctrl-C) leaves OUT as it was.
"""
from __future__ import annotations

import argparse
import collections
import glob as glob_lib
import gzip
import itertools
import json
import os
import sys
import time
from typing import Iterator


from pgm_jax.data import detokenizers
from pgm_jax.data import pipeline as ip
from pgm_jax.data import tokenizers as tok_lib


def _source_files(source: str, key: str) -> tuple[str, list[str]]:
  """(kind, sorted files) of a jsonl:/text: source; ValueError naming `key` if none match."""
  kind, _, arg = source.partition(":")
  if kind not in ("jsonl", "text", "tfds") or not arg:
    raise ValueError(f"{key}: expected tfds:<name>, jsonl:<glob> or text:<glob>, got {source!r}")
  if kind == "tfds":
    return kind, []
  files = sorted(f for f in glob_lib.glob(os.path.expanduser(arg)) if os.path.isfile(f))
  if not files:
    raise ValueError(f"{key}: no files match {arg!r}")
  return kind, files


def iter_documents(source: str, data_dir: str | None = None, text_key: str = "text",
                   split: str = "train", key: str = "--source") -> Iterator[str]:
  """Yields documents from `tfds:<name>[/split]`, `jsonl:<glob>` or `text:<glob>` (files in sorted
  order). A bad file or line is a ValueError naming `key`, the file and the line."""
  kind, files = _source_files(source, key)
  if kind == "tfds":
    tfds = ip.import_tfds(key)
    name, _, sp = source.partition(":")[2].partition("/")
    try:
      src = tfds.data_source(name, split=sp or split, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except  # unknown/unprepared dataset, bad split
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{key}={source}: cannot open the TFDS data source (split "
                       f"{sp or split!r}, --data_dir={data_dir}): {first}") from None
    for i in range(len(src)):
      record = src[i]
      if text_key not in record:
        raise ValueError(f"--text_key={text_key}: {source} records have no such field "
                         f"(fields: {sorted(record)})")
      text = record[text_key]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return
  for path in files:
    try:
      if kind == "text":
        yield tok_lib.read_text_file(path)
        continue
      with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else
            open(path, encoding="utf-8")) as f:
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except ValueError as e:
            raise ValueError(f"{key}: {path} line {n} is not JSON ({e})") from None
          if not isinstance(record, dict) or text_key not in record:
            raise ValueError(f"--text_key={text_key}: {path} line {n} has no such field")
          if not isinstance(record[text_key], str):
            raise ValueError(f"--text_key={text_key}: {path} line {n}: the field is a "
                             f"{type(record[text_key]).__name__}, not text")
          yield record[text_key]
    except UnicodeDecodeError as e:
      raise ValueError(f"{key}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
      raise ValueError(f"{key}: cannot read {path} ({type(e).__name__}: {e})") from None


class _Writer:
  """Packs documents incrementally and writes blocks to one ArrayRecord file."""

  def __init__(self, path: str, tokenizer, seq_len: int, detokenizer: str = "none",
               group_docs: int = 0):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.path = path
    self.writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    self.packer = ip.StreamingPacker(seq_len, tokenizer.bos_id, tokenizer.eos_id, group_docs)
    self.tokenizer = tokenizer
    self.detokenize = detokenizers.get(detokenizer, key="--detokenizer")
    self.docs = self.blocks = self.tokens = 0

  def add_docs(self, docs: list[str]):
    if not docs:
      return
    docs = [self.detokenize(d) for d in docs]
    enc = getattr(self.tokenizer, "encode_batch", None)
    for ids in (enc(docs) if enc else [self.tokenizer.encode(d) for d in docs]):
      self.docs += 1
      self.tokens += len(ids)
      for block in self.packer.add(ids):
        self.writer.write(block.astype("<i4").tobytes())
        self.blocks += 1

  def close(self):
    self.writer.close()


def _chunks(it, n):
  it = iter(it)
  while True:
    chunk = list(itertools.islice(it, n))
    if not chunk:
      return
    yield chunk


def validate(source: str, out: str, tokenizer, seq_len: int, val_last_docs: int = 0,
             val_source: str | None = None, data_dir: str | None = None,
             text_key: str = "text", chunk_docs: int = 1024) -> None:
  """Every check that can run before writing: flags, sources (and their first document), --out."""
  from pgm_jax.core import fileio  # pylint: disable=g-import-not-at-top
  if seq_len < 3:
    raise ValueError(f"--seq_len={seq_len} must be >= 3 (BOS + a token + EOS)")
  if val_last_docs < 0:
    raise ValueError(f"--val_last_docs={val_last_docs} must be >= 0")
  if bool(val_last_docs) == bool(val_source):
    raise ValueError("give exactly one of --val_last_docs (>0) or --val_source")
  if chunk_docs < 1:
    raise ValueError(f"--chunk_docs={chunk_docs} must be >= 1")
  if not text_key:
    raise ValueError("--text_key: empty")
  for key, src in (("--source", source), ("--val_source", val_source)):
    if src is None:
      continue
    for _ in iter_documents(src, data_dir, text_key, split="validation" if key == "--val_source"
                            else "train", key=key):
      break  # the first document parses
    else:
      raise ValueError(f"{key}={src}: no documents")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, not a folder")
  fileio.check_writable_dir(out, "--out", create=False)
  del tokenizer


def preprocess(source: str, out: str, tokenizer, seq_len: int, val_last_docs: int = 0,
               val_source: str | None = None, data_dir: str | None = None, text_key: str = "text",
               chunk_docs: int = 1024, log_every_s: float = 10.0, detokenizer: str = "none",
               group_docs: int = 0) -> dict:
  """Runs the conversion; returns the meta dict (also written to OUT/meta.json).

  Validates first (`validate`), writes OUT/.<name>.tmp-<pid> files, and renames them over
  OUT/train.array_record, OUT/validation.array_record and OUT/meta.json only at the end.
  detokenizer: `pgm_jax.data.detokenizers` rule set applied to every document first.
  group_docs > 0: each run of that many documents is packed on its own (remainder dropped),
  the reference's chunking (1000 = `datasets.map(batched=True)`'s batch).
  """
  validate(source, out, tokenizer, seq_len, val_last_docs, val_source, data_dir, text_key,
           chunk_docs)
  if detokenizer not in detokenizers.DETOKENIZERS:
    raise ValueError(f"--detokenizer={detokenizer!r}: use one of "
                     f"{sorted(detokenizers.DETOKENIZERS)}")
  if group_docs < 0:
    raise ValueError(f"--group_docs={group_docs}: must be >= 0")
  os.makedirs(out, exist_ok=True)
  names = ("train.array_record", "validation.array_record", "meta.json")
  tmp = {n: os.path.join(out, f".{n}.tmp-{os.getpid()}") for n in names}
  try:
    meta = _convert(source, tmp, tokenizer, seq_len, val_last_docs, val_source, data_dir,
                    text_key, chunk_docs, log_every_s, detokenizer, group_docs)
    with open(tmp["meta.json"], "w") as f:
      json.dump(meta, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    for name in names:  # meta.json last: it describes the two files before it
      os.replace(tmp[name], os.path.join(out, name))
  finally:
    for path in tmp.values():
      if os.path.exists(path):
        os.remove(path)
  return meta


def _convert(source, tmp, tokenizer, seq_len, val_last_docs, val_source, data_dir, text_key,
             chunk_docs, log_every_s, detokenizer="none", group_docs=0) -> dict:
  train = _Writer(tmp["train.array_record"], tokenizer, seq_len, detokenizer, group_docs)
  val = _Writer(tmp["validation.array_record"], tokenizer, seq_len, detokenizer, group_docs)
  t0 = last = time.time()

  def progress(force=False):
    nonlocal last
    now = time.time()
    if force or now - last >= log_every_s:
      last = now
      n = train.docs + val.docs + len(held)
      print(f"[preprocess] {n} docs ({n / max(now - t0, 1e-9):.0f} docs/s), train blocks {train.blocks}, "
            f"val blocks {val.blocks}", file=sys.stderr, flush=True)

  held: collections.deque = collections.deque()  # last `val_last_docs` docs, not yet assigned
  try:
    for chunk in _chunks(iter_documents(source, data_dir, text_key), chunk_docs):
      if val_last_docs:
        held.extend(chunk)
        spill = max(0, len(held) - val_last_docs)
        train.add_docs([held.popleft() for _ in range(spill)])
      else:
        train.add_docs(chunk)
      progress()
    if val_last_docs:
      for chunk in _chunks(list(held), chunk_docs):
        val.add_docs(chunk)
      held.clear()
    else:
      for chunk in _chunks(iter_documents(val_source, data_dir, text_key, split="validation",
                                          key="--val_source"), chunk_docs):
        val.add_docs(chunk)
        progress()
  finally:
    train.close()
    val.close()
  progress(force=True)
  if val_last_docs and train.docs == 0:
    raise ValueError(f"--val_last_docs={val_last_docs}: the corpus has only {val.docs} "
                     f"documents, none is left for training; nothing was written")
  if train.blocks == 0 or val.blocks == 0:
    hint = (f" (--val_last_docs={val_last_docs} of {train.docs + val.docs} documents)"
            if val_last_docs else "")
    raise ValueError(f"--seq_len: corpus produced {train.blocks} train / {val.blocks} validation "
                     f"blocks of seq_len={seq_len}{hint}; nothing was written")
  return dict(seq_len=seq_len, tokenizer=tokenizer.name, tokenizer_path=getattr(tokenizer, "path", None),
              vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
              pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id, source=source, val_source=val_source,
              val_last_docs=val_last_docs, detokenizer=detokenizer, group_docs=group_docs,
              packing="owt: doc+EOS concatenated, [BOS]+(seq_len-2)+[EOS]",
              record_format="int32 little-endian, seq_len values per record",
              train=dict(docs=train.docs, tokens=train.tokens, blocks=train.blocks),
              validation=dict(docs=val.docs, tokens=val.tokens, blocks=val.blocks))


def main(argv=None):
  from pgm_jax.core import cli  # pylint: disable=g-import-not-at-top
  p = cli.ArgumentParser(prog="python -m pgm_jax.tools.preprocess", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True, help="tfds:<name>[/split] | jsonl:<glob> | text:<glob>")
  p.add_argument("--data_dir", default=None, help="TFDS data_dir for tfds: sources")
  p.add_argument("--text_key", default="text")
  p.add_argument("--tokenizer", default="gpt2", choices=tok_lib.TOKENIZERS + ("vq_ds8",),
                 help="vq_ds8: images -> LlamaGen VQ-8 codes, --tokenizer_path = its weights")
  p.add_argument("--tokenizer_path", default=None)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--val_last_docs", type=int, default=None,
                 help="last N documents are validation (default 100000 unless --val_source)")
  p.add_argument("--val_source", default=None, help="separate validation source (same syntax as --source)")
  p.add_argument("--out", required=True)
  p.add_argument("--chunk_docs", type=int, default=1024)
  p.add_argument("--detokenizer", default="none", choices=sorted(detokenizers.DETOKENIZERS),
                 help="clean each document first (lm1b for the reference's lm1b-wrap)")
  p.add_argument("--group_docs", type=int, default=0,
                 help="pack each run of N documents on its own, dropping its remainder "
                      "(1000 = the reference's datasets.map batches); 0 = one stream")
  p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
  images = p.add_argument_group("images (--tokenizer=vq_ds8; sources imagefolder:<dir> or "
                                "tfds:imagenet2012)")
  images.add_argument("--image_size", type=int, default=256)
  images.add_argument("--batch_size", type=int, default=64, help="images per VQ encode call")
  images.add_argument("--num_workers", type=int, default=8, help="image-decoding threads")
  images.add_argument("--hflip", default="none", choices=("none", "copy"),
                      help="copy: also write each train image's mirror (the reference: none)")
  images.add_argument("--limit", type=int, default=None, help="at most this many images per split")
  images.add_argument("--unsafe_pickle", action="store_true",
                      help="fully unpickle a .pt VQ file (runs code from it; trusted files only)")
  args = p.parse_args(argv)
  if args.tokenizer == "vq_ds8":
    from pgm_jax.tools import imagenet_codes  # pylint: disable=g-import-not-at-top
    if not args.tokenizer_path:
      p.error("--tokenizer_path: the VQ weights (vq_ds8_c2i.pt or its .npz conversion) are needed")
    meta = cli.guarded(
        "pgm_jax.tools.preprocess", imagenet_codes.preprocess_images, args.source, args.out,
        args.tokenizer_path, val_source=args.val_source, data_dir=args.data_dir,
        image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers,
        hflip=args.hflip, limit=args.limit, unsafe_pickle=args.unsafe_pickle,
        verbose=args.verbose)
    print(json.dumps({k: v for k, v in meta.items() if k != "classes"}, indent=2))
    return
  val_last = args.val_last_docs if args.val_last_docs is not None else (0 if args.val_source else 100000)

  def run():
    tokenizer = tok_lib.make_tokenizer(args.tokenizer, args.tokenizer_path, key="--tokenizer",
                                       path_key="--tokenizer_path")
    return preprocess(args.source, args.out, tokenizer, args.seq_len, val_last, args.val_source,
                      args.data_dir, args.text_key, args.chunk_docs,
                      detokenizer=args.detokenizer, group_docs=args.group_docs)

  meta = cli.guarded("pgm_jax.tools.preprocess", run, verbose=args.verbose)
  print(json.dumps(meta, indent=2))


if __name__ == "__main__":
  main()
