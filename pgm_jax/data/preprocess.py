"""One-time conversion of a text corpus into pre-packed ArrayRecord blocks (config.data.name="array_record").

Examples:
  # OpenWebText from a TFDS ArrayRecord build; the last 100k documents are validation (MDLM rule).
  python -m pgm_jax.preprocess --source=tfds:openwebtext --data_dir=~/tensorflow_datasets \
      --tokenizer=gpt2 --seq_len=1024 --val_last_docs=100000 --out=/data/owt_gpt2_1024
  # jsonl / plain-text files (one document per file for text:, per line for jsonl:).
  python -m pgm_jax.preprocess --source='jsonl:/data/corpus/*.jsonl' --val_source='jsonl:/data/val.jsonl' \
      --tokenizer=sentencepiece --tokenizer_path=third_party/sentencepiece/shakespeare_bpe2048.model \
      --seq_len=512 --out=/data/corpus_sp512

  # ImageNet images -> VQ-8 codes (config.data.name="imagenet_codes"; see pgm_jax/data/imagenet.py)
  python -m pgm_jax.preprocess --tokenizer=vq_ds8 --tokenizer_path=vq_ds8_c2i.npz \
      --source=imagefolder:/data/imagenet/train --val_source=imagefolder:/data/imagenet/val \
      --out=/data/imagenet256_codes

Writes OUT/train.array_record, OUT/validation.array_record (one record = one block, int32
little-endian bytes of length seq_len, packed with the OWT rule of
`pipeline.pack_documents`) and OUT/meta.json. Streams: documents are tokenized in chunks and
packed incrementally; with --val_last_docs the last N documents are held back in a bounded queue.
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


from pgm_jax.data import pipeline as ip
from pgm_jax.data import tokenizers as tok_lib


def iter_documents(source: str, data_dir: str | None = None, text_key: str = "text",
                   split: str = "train") -> Iterator[str]:
  """Yields documents from `tfds:<name>[/split]`, `jsonl:<glob>` or `text:<glob>` (files in sorted order)."""
  kind, _, arg = source.partition(":")
  if kind == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, _, sp = arg.partition("/")
    src = tfds.data_source(name, split=sp or split, data_dir=data_dir)
    for i in range(len(src)):
      text = src[i][text_key]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return
  if kind not in ("jsonl", "text"):
    raise ValueError(f"--source: expected tfds:<name>, jsonl:<glob> or text:<glob>, got {source!r}")
  files = sorted(glob_lib.glob(os.path.expanduser(arg)))
  if not files:
    raise ValueError(f"--source: no files match {arg!r}")
  for path in files:
    if kind == "text":
      yield tok_lib.read_text_file(path)
    else:
      with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else
            open(path, encoding="utf-8")) as f:
        for line in f:
          if line.strip():
            yield json.loads(line)[text_key]


class _Writer:
  """Packs documents incrementally and writes blocks to one ArrayRecord file."""

  def __init__(self, path: str, tokenizer, seq_len: int):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self.path = path
    self.writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    self.packer = ip.StreamingPacker(seq_len, tokenizer.bos_id, tokenizer.eos_id)
    self.tokenizer = tokenizer
    self.docs = self.blocks = self.tokens = 0

  def add_docs(self, docs: list[str]):
    if not docs:
      return
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


def preprocess(source: str, out: str, tokenizer, seq_len: int, val_last_docs: int = 0,
               val_source: str | None = None, data_dir: str | None = None, text_key: str = "text",
               chunk_docs: int = 1024, log_every_s: float = 10.0) -> dict:
  """Runs the conversion; returns the meta dict (also written to OUT/meta.json)."""
  if bool(val_last_docs) == bool(val_source):
    raise ValueError("give exactly one of --val_last_docs (>0) or --val_source")
  os.makedirs(out, exist_ok=True)
  train = _Writer(os.path.join(out, "train.array_record"), tokenizer, seq_len)
  val = _Writer(os.path.join(out, "validation.array_record"), tokenizer, seq_len)
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
    for chunk in _chunks(iter_documents(val_source, data_dir, text_key, split="validation"), chunk_docs):
      val.add_docs(chunk)
      progress()
  train.close()
  val.close()
  progress(force=True)
  if train.blocks == 0 or val.blocks == 0:
    raise ValueError(f"--seq_len: corpus produced {train.blocks} train / {val.blocks} validation blocks of "
                     f"seq_len={seq_len}")
  meta = dict(seq_len=seq_len, tokenizer=tokenizer.name, tokenizer_path=getattr(tokenizer, "path", None),
              vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
              pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id, source=source, val_source=val_source,
              val_last_docs=val_last_docs, packing="owt: doc+EOS concatenated, [BOS]+(seq_len-2)+[EOS]",
              record_format="int32 little-endian, seq_len values per record",
              train=dict(docs=train.docs, tokens=train.tokens, blocks=train.blocks),
              validation=dict(docs=val.docs, tokens=val.tokens, blocks=val.blocks))
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m pgm_jax.preprocess", description=__doc__,
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
    from pgm_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    if not args.tokenizer_path:
      p.error("--tokenizer_path: the VQ weights (vq_ds8_c2i.pt or its .npz conversion) are needed")
    try:
      meta = imagenet.preprocess_images(
          args.source, args.out, args.tokenizer_path, val_source=args.val_source,
          data_dir=args.data_dir, image_size=args.image_size, batch_size=args.batch_size,
          num_workers=args.num_workers, hflip=args.hflip, limit=args.limit,
          unsafe_pickle=args.unsafe_pickle)
    except ValueError as e:
      p.error(str(e))
    print(json.dumps({k: v for k, v in meta.items() if k != "classes"}, indent=2))
    return
  val_last = args.val_last_docs if args.val_last_docs is not None else (0 if args.val_source else 100000)
  tokenizer = tok_lib.make_tokenizer(args.tokenizer, args.tokenizer_path, key="--tokenizer")
  meta = preprocess(args.source, args.out, tokenizer, args.seq_len, val_last, args.val_source,
                    args.data_dir, args.text_key, args.chunk_docs)
  print(json.dumps(meta, indent=2))


if __name__ == "__main__":
  main()
