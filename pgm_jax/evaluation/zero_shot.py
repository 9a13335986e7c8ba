"""Zero-shot likelihood: val PPL of a trained model on other corpora (the reference's
zero-shot sets), each with the reference's detokenizer and chunking.

    --mode=eval --config.eval.datasets=wikitext2,ptb,lambada --config.eval.datasets_dir=DIR

Nothing is downloaded. Each entry of `config.eval.datasets` is a set's name, read from
`DIR/<name>.jsonl` (or `.jsonl.gz`): one JSON record per line, as the rows of the
reference's dataset (the field below holds the text). `name=SOURCE` names the source
instead: a local `.jsonl[.gz]` file or glob, or `tfds:NAME[/CONFIG]:SPLIT` (prepared as
ArrayRecord under DIR, read through `tfds.data_source`, no TensorFlow).

Every set is processed as the reference does with `wrap=True` (its GPT-2 zero-shot
configs): detokenize each record, tokenize it without special tokens, append EOS,
concatenate, and cut into [BOS] + (L - 2) tokens + [EOS] blocks, packing each run of
`config.eval.group_docs` records (1000: the batches of `datasets.map(batched=True)`) on
its own and dropping each run's remainder. The PPL is the model's validation estimator
(PGM / MDLM ELBO, AR exact), over every block, EMA weights.
"""
from __future__ import annotations

import glob as glob_lib
import gzip
import json
import os

import grain

from pgm_jax.data import detokenizers, pipeline

# name -> (detokenizer, text field, split the reference evaluates)
ZERO_SHOT_SETS = {
    "wikitext2": ("wikitext", "text", "validation"),
    "wikitext103": ("wikitext", "text", "validation"),
    "ptb": ("ptb", "sentence", "validation"),
    "lambada": ("lambada", "text", "test"),
    "ag_news": ("none", "text", "test"),
    "scientific_papers_arxiv": ("scientific_papers", "article", "validation"),
    "scientific_papers_pubmed": ("scientific_papers", "article", "validation"),
    "lm1b": ("lm1b", "text", "test"),
}
KEY = "config.eval.datasets"


def parse_datasets(spec) -> list[tuple[str, str | None]]:
  """'wikitext2,ptb=/x/ptb.jsonl' -> [('wikitext2', None), ('ptb', '/x/ptb.jsonl')]."""
  items = spec if isinstance(spec, (list, tuple)) else str(spec or "").split(",")
  out = []
  for item in items:
    item = item.strip()
    if not item:
      continue
    name, _, source = item.partition("=")
    name = name.strip()
    if name not in ZERO_SHOT_SETS:
      raise ValueError(f"{KEY}: unknown set {name!r}; expected one of {sorted(ZERO_SHOT_SETS)}")
    out.append((name, source.strip() or None))
  if not out:
    raise ValueError(f"{KEY}: no set named")
  return out


def _read_jsonl(paths: list[str], field: str, where: str) -> list[str]:
  texts = []
  for path in paths:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError as e:
          raise ValueError(f"{where}: {path}:{n} is not JSON ({e})") from None
        if not isinstance(record, dict):
          raise ValueError(f"{where}: {path}:{n} is a JSON {type(record).__name__}, not an "
                           f"object with a {field!r} field")
        if field not in record:
          raise ValueError(f"{where}: {path}:{n} has no field {field!r} "
                           f"(fields: {sorted(record)})")
        texts.append(str(record[field]))
  return texts


def _read_tfds(source: str, data_dir: str | None, field: str, where: str) -> list[str]:
  body = source[len("tfds:"):]
  name, _, split = body.rpartition(":")
  if not name or not split:
    raise ValueError(f"{where}: expected tfds:NAME[/CONFIG]:SPLIT, got {source!r}")
  if not data_dir:
    raise ValueError(f"{where}: a tfds: source needs config.eval.datasets_dir (the TFDS "
                     f"data_dir holding the prepared {name})")
  tfds = pipeline.import_tfds(where)
  try:
    src = tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{where}: cannot open TFDS {name!r} split {split!r} in {data_dir} "
                     f"(prepare it with file_format='array_record'): {type(e).__name__}: "
                     f"{e}") from None
  texts = []
  for i in range(len(src)):
    value = src[i][field]
    texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return texts


def read_texts(name: str, source: str | None, datasets_dir: str | None) -> list[str]:
  """The set's records' text fields, in file order (never a download)."""
  _, field, _ = ZERO_SHOT_SETS[name]
  where = f"{KEY} ({name})"
  if source and source.startswith("tfds:"):
    return _read_tfds(source, datasets_dir, field, where)
  if source:
    paths = sorted(glob_lib.glob(os.path.expanduser(source)))
    if not paths:
      raise ValueError(f"{where}: no file matches {source!r}")
  else:
    if not datasets_dir:
      raise ValueError(f"{where}: set config.eval.datasets_dir (a folder with {name}.jsonl) "
                       f"or name the source: {name}=/path/to/{name}.jsonl")
    base = os.path.join(os.path.expanduser(datasets_dir), name)
    paths = [p for p in (base + ".jsonl", base + ".jsonl.gz") if os.path.isfile(p)][:1]
    if not paths:
      raise ValueError(f"{where}: {base}.jsonl not found (one JSON record per line with a "
                       f"{field!r} field; nothing is downloaded)")
  return _read_jsonl(paths, field, where)


def build_blocks(name: str, texts: list[str], tokenizer, seq_len: int, group_docs: int):
  """The reference's wrap: detokenize, tokenize, EOS per record, packed per group."""
  detok = detokenizers.get(ZERO_SHOT_SETS[name][0])
  docs = [detok(t) for t in texts]
  enc = getattr(tokenizer, "encode_batch", None)
  token_docs = enc(docs) if enc is not None else [tokenizer.encode(d) for d in docs]
  blocks = pipeline.pack_documents(token_docs, seq_len, tokenizer.bos_id, tokenizer.eos_id,
                                   group_docs=group_docs)
  if len(blocks) == 0:
    raise ValueError(f"{KEY} ({name}): {len(texts)} records give no block of "
                     f"seq_len={seq_len} (config.eval.group_docs={group_docs})")
  return blocks


def load_sets(setup) -> dict:
  """{name: (source, records, blocks)} of config.eval.datasets (read before any restore,
  so that a missing file fails fast)."""
  cfg = setup.config
  sets = {}
  for name, source in parse_datasets(cfg.eval.datasets):
    texts = read_texts(name, source, cfg.eval.get("datasets_dir"))
    sets[name] = (source, len(texts), build_blocks(
        name, texts, setup.tokenizer, cfg.data.seq_len,
        int(cfg.eval.get("group_docs", 1000) or 0)))
  return sets


def evaluate_sets(setup, params, sets: dict, run_validation, eval_fn) -> dict:
  """{name: {val_ppl, val_nll, val_tokens, val_batches, records, blocks, split}} for the
  sets of `load_sets`; `run_validation(setup, params, eval_fn, source=...)` scores them."""
  cfg = setup.config
  results = {}
  for name, (source, records, blocks) in sets.items():
    src = grain.MapDataset.source(blocks).map(pipeline.BlockToExample(cfg.data.seq_len))
    result = run_validation(setup, params, eval_fn, source=src)
    result.update(records=records, blocks=int(len(blocks)), split=ZERO_SHOT_SETS[name][2],
                  source=source or os.path.join(cfg.eval.get("datasets_dir") or "",
                                                f"{name}.jsonl"))
    results[name] = result
  return results
