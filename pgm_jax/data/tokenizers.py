"""Tokenizers for pgm_jax: GPT-2 BPE (OWT), SentencePiece (Shakespeare), BERT WordPiece (LM1B).

Every tokenizer exposes the same small interface (`Tokenizer` protocol):
  vocab_size  model vocabulary INCLUDING the MASK id (MASK is appended after the base vocab
              unless the base vocab already has one, as BERT's `[MASK]`).
  bos_id, eos_id, mask_id, pad_id, name
  encode(text) -> list[int]        no special tokens are added
  decode(ids, keep_special=False)  special ids (bos/eos/pad/mask) are skipped unless keep_special

All assets are local files (nothing is downloaded). Tokenizers are picklable: the heavy state
(tiktoken.Encoding, SentencePieceProcessor) is loaded lazily and dropped on pickling, so Grain
workers rebuild it from the path.

The CLI that trains a SentencePiece model is `python -m pgm_jax.tools.tokenizers`.
"""
from __future__ import annotations

import base64
import glob as glob_lib
import gzip
import os
import unicodedata
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import pgm_jax

REPO_ROOT = str(pgm_jax.REPO_ROOT)
DEFAULT_GPT2_PATH = "third_party/gpt2/gpt2.tiktoken"
DEFAULT_SP_PATH = "third_party/sentencepiece/shakespeare_bpe2048.model"
# GPT-2's pre-tokenisation regex (identical to tiktoken's "gpt2" encoding).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  mask_id: int
  pad_id: int
  name: str

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids, keep_special: bool = False) -> str:
    ...


def resolve_path(path: str, key: str = "config.data.tokenizer_path") -> str:
  """Resolves `path` (absolute, else against the repo root, else cwd). Raises ValueError naming key."""
  if not path:
    raise ValueError(f"{key}: empty path")
  path = os.path.expanduser(path)
  candidates = [path] if os.path.isabs(path) else [os.path.join(REPO_ROOT, path), os.path.abspath(path)]
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise ValueError(f"{key}: file not found: {path} (tried {', '.join(candidates)})")


def _to_list(ids) -> list[int]:
  if hasattr(ids, "tolist"):
    ids = ids.tolist()
  return [int(i) for i in ids]


class _Base:
  """Shared helpers; subclasses set the id attributes and implement `_decode_plain`."""
  name = "base"

  def special_ids(self) -> set[int]:
    return {self.bos_id, self.eos_id, self.pad_id, self.mask_id}

  def decode(self, ids, keep_special: bool = False) -> str:
    ids = _to_list(ids)
    if not keep_special:
      special = self.special_ids()
      ids = [i for i in ids if i not in special]
    return self._decode_plain(ids)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_impl"] = None  # lazily re-created in the worker
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)

  def __repr__(self):
    return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, mask={self.mask_id})")


# ----------------------------------------------------------------------------------------------
# GPT-2 (tiktoken)
# ----------------------------------------------------------------------------------------------
def _load_tiktoken_bpe(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  return ranks


class GPT2Tokenizer(_Base):
  """GPT-2 BPE via tiktoken from the vendored ranks file. BOS = EOS = PAD = 50256, MASK = 50257."""

  def __init__(self, path: str = DEFAULT_GPT2_PATH):
    self.path = resolve_path(path)
    self.name = "gpt2"
    self.bos_id = self.eos_id = self.pad_id = 50256
    self.mask_id = 50257
    self.vocab_size = 50258
    self._impl = None

  @property
  def encoding(self):
    if self._impl is None:
      import tiktoken  # pylint: disable=g-import-not-at-top
      ranks = _load_tiktoken_bpe(self.path)
      if len(ranks) != 50256:
        raise ValueError(f"config.data.tokenizer_path: {self.path} has {len(ranks)} ranks, expected 50256")
      self._impl = tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens={GPT2_EOT: 50256})
    return self._impl

  def encode(self, text: str) -> list[int]:
    # `<|endoftext|>` appearing in raw text is encoded as ordinary text, never as the special id.
    return self.encoding.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.encoding.encode_ordinary_batch(list(texts), num_threads=1)

  def _decode_plain(self, ids: list[int]) -> str:
    ids = [i for i in ids if i != self.mask_id]  # MASK has no bytes; only reachable with keep_special
    return self.encoding.decode(ids)


# ----------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------
class SentencePieceTokenizer(_Base):
  """SentencePiece model; MASK is appended: mask_id = sp.vocab_size(), vocab_size = that + 1."""

  def __init__(self, model_path: str = DEFAULT_SP_PATH):
    self.path = resolve_path(model_path)
    self.name = "sentencepiece:" + os.path.basename(self.path)
    self._impl = None
    sp = self.processor
    self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"config.data.tokenizer_path: SentencePiece model {self.path} has no bos/eos piece "
                       f"(bos_id={self.bos_id}, eos_id={self.eos_id}); train it with --bos_id/--eos_id >= 0")
    if self.pad_id < 0:  # no pad piece: pad with EOS (its positions are masked out by `valid` anyway)
      self.pad_id = self.eos_id
    self.mask_id = sp.vocab_size()
    self.vocab_size = sp.vocab_size() + 1
    # Newline-aware mode: models trained by `train_sentencepiece` have a user-defined "\n" piece.
    # Text is then encoded line by line (each line gets SentencePiece's dummy "▁" prefix, as in
    # training) with the "\n" id between lines, so line breaks survive a roundtrip.
    nl = sp.piece_to_id("\n")
    self.newline_id = nl if (nl != sp.unk_id() and sp.id_to_piece(nl) == "\n") else None

  @property
  def processor(self):
    if self._impl is None:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      self._impl = spm.SentencePieceProcessor(model_file=self.path)
    return self._impl

  def encode(self, text: str) -> list[int]:
    if self.newline_id is None:
      return self.processor.encode(text, out_type=int)
    out = []
    for i, line_ids in enumerate(self.processor.encode(text.split("\n"), out_type=int)):
      if i:
        out.append(self.newline_id)
      out.extend(line_ids)
    return out

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self.newline_id is None:
      return self.processor.encode(list(texts), out_type=int)
    return [self.encode(t) for t in texts]

  def _decode_plain(self, ids: list[int]) -> str:
    ids = [i for i in ids if i != self.mask_id]
    if self.newline_id is None:
      return self.processor.decode(ids)
    lines, cur = [], []
    for i in ids:
      if i == self.newline_id:
        lines.append(cur)
        cur = []
      else:
        cur.append(i)
    lines.append(cur)
    return "\n".join(self.processor.decode(lines))


# ----------------------------------------------------------------------------------------------
# BERT WordPiece (bert-base-uncased, LM1B)
# ----------------------------------------------------------------------------------------------
def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or
          0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or
          0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class BertWordPieceTokenizer(_Base):
  """BERT uncased tokenizer (BasicTokenizer + greedy longest-match WordPiece) from a local vocab.txt.

  Matches HF `BertTokenizer(do_lower_case=True)`: clean control chars, split CJK chars, lower-case,
  strip accents (NFD, drop Mn), split on whitespace and punctuation, then WordPiece with '##'
  continuation pieces; words longer than 100 chars or with no match become [UNK].
  """

  def __init__(self, vocab_path: str, lower_case: bool = True, max_chars_per_word: int = 100):
    self.path = resolve_path(vocab_path)
    self.name = "bert_wordpiece:" + os.path.basename(self.path)
    self.lower_case = lower_case
    self.max_chars_per_word = max_chars_per_word
    with open(self.path, encoding="utf-8") as f:
      self.id_to_token = [line.rstrip("\n").rstrip("\r") for line in f]
    while self.id_to_token and not self.id_to_token[-1]:
      self.id_to_token.pop()
    self.vocab = {t: i for i, t in enumerate(self.id_to_token)}
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]") if t not in self.vocab]
    if missing:
      raise ValueError(f"config.data.tokenizer_path: vocab {self.path} lacks special tokens {missing}")
    self.bos_id = self.vocab["[CLS]"]
    self.eos_id = self.vocab["[SEP]"]
    self.pad_id = self.vocab["[PAD]"]
    self.mask_id = self.vocab["[MASK]"]
    self.unk_id = self.vocab["[UNK]"]
    self.vocab_size = len(self.id_to_token)
    self._impl = None

  def _basic_tokenize(self, text: str) -> list[str]:
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
        continue
      if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
        chars.append(" ")
      elif _is_cjk(cp):
        chars.append(f" {ch} ")
      else:
        chars.append(ch)
    words = []
    for word in "".join(chars).split():
      if self.lower_case:
        word = word.lower()
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
      cur = []
      for ch in word:
        if _is_punctuation(ch):
          if cur:
            words.append("".join(cur))
            cur = []
          words.append(ch)
        else:
          cur.append(ch)
      if cur:
        words.append("".join(cur))
    return words

  def _wordpiece(self, word: str) -> list[int]:
    if len(word) > self.max_chars_per_word:
      return [self.unk_id]
    out, start = [], 0
    while start < len(word):
      end, piece = len(word), None
      while start < end:
        sub = word[start:end]
        if start > 0:
          sub = "##" + sub
        if sub in self.vocab:
          piece = self.vocab[sub]
          break
        end -= 1
      if piece is None:
        return [self.unk_id]
      out.append(piece)
      start = end
    return out

  def encode(self, text: str) -> list[int]:
    ids = []
    for word in self._basic_tokenize(text):
      ids.extend(self._wordpiece(word))
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def _decode_plain(self, ids: list[int]) -> str:
    text = " ".join(self.id_to_token[i] for i in ids)
    return text.replace(" ##", "").replace("##", "")


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------
TOKENIZERS = ("sentencepiece", "gpt2", "bert_wordpiece")


def make_tokenizer(kind: str, path: str | None = None, key: str = "config.data",
                   path_key: str | None = None) -> Tokenizer:
  """The tokenizer `kind` from `path`, loaded now: a missing, unreadable or corrupt file is
  a one-line ValueError naming `path_key` (default `{key}.tokenizer_path`)."""
  path_key = path_key or f"{key}.tokenizer_path"
  if kind not in TOKENIZERS:
    raise ValueError(f"{key}.tokenizer: unknown tokenizer {kind!r}; expected one of {TOKENIZERS}")
  try:
    if kind == "gpt2":
      tok = GPT2Tokenizer(path or DEFAULT_GPT2_PATH)
      tok.encoding  # pylint: disable=pointless-statement  # load (and check) the ranks now
      return tok
    if kind == "sentencepiece":
      return SentencePieceTokenizer(path or DEFAULT_SP_PATH)
    if not path:
      raise ValueError(f"{path_key}: bert_wordpiece needs a local bert-base-uncased vocab.txt "
                       "(it is never downloaded)")
    return BertWordPieceTokenizer(path)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path_key}={path}: not a {kind} tokenizer file ({e.reason})") from None
  except ValueError as e:
    message = str(e)
    if path_key != "config.data.tokenizer_path":
      message = message.replace("config.data.tokenizer_path", path_key)
    if path_key not in message:
      message = f"{path_key}={path}: not a {kind} tokenizer file ({message})"
    raise ValueError(message) from None
  except (OSError, RuntimeError, TypeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{path_key}={path}: cannot load a {kind} tokenizer from it "
                     f"({first})") from None


def get_tokenizer(data_config) -> Tokenizer:
  """Builds the tokenizer named by `data_config.tokenizer` from `data_config.tokenizer_path`."""
  get = data_config.get if hasattr(data_config, "get") else (lambda k, d=None: getattr(data_config, k, d))
  kind = get("tokenizer", None)
  if kind is None:
    raise ValueError(f"config.data.tokenizer: missing; expected one of {TOKENIZERS}")
  if kind == "image_codes":  # images: codes + MASK + BOS (config.data.num_codes, grid)
    from pgm_jax.data import images  # pylint: disable=g-import-not-at-top
    return images.image_vocab(data_config)
  return make_tokenizer(kind, get("tokenizer_path", None))


# ----------------------------------------------------------------------------------------------
# SentencePiece training
# ----------------------------------------------------------------------------------------------
def read_text_file(path: str) -> str:
  """Reads a UTF-8 text file, transparently gunzipping `*.gz`."""
  if path.endswith(".gz"):
    with gzip.open(path, "rt", encoding="utf-8") as f:
      return f.read()
  with open(path, encoding="utf-8") as f:
    return f.read()


def file_stem(path: str) -> str:
  base = os.path.basename(path)
  for suffix in (".gz", ".txt", ".jsonl", ".json"):
    if base.endswith(suffix):
      base = base[:-len(suffix)]
  return base


def expand_inputs(patterns: Iterable[str] | str, exclude: Iterable[str] = (), key: str = "--input") -> list[str]:
  """Sorted files matching glob(s) (relative globs resolve against the repo root, then cwd),
  minus files whose stem (name without .txt/.gz) is in `exclude`."""
  if isinstance(patterns, str):
    patterns = [patterns]
  exclude = set(exclude)
  files = []
  for pat in patterns:
    pat = os.path.expanduser(pat)
    matches = glob_lib.glob(pat) if os.path.isabs(pat) else (
        glob_lib.glob(os.path.join(REPO_ROOT, pat)) or glob_lib.glob(pat))
    if not matches:
      raise ValueError(f"{key}: no files match {pat!r}")
    files.extend(os.path.abspath(m) for m in matches)
  files = sorted(set(f for f in files if os.path.isfile(f)))
  unknown = exclude - {file_stem(f) for f in files}
  if unknown:
    raise ValueError(f"{key}: excluded names {sorted(unknown)} match no input file")
  return [f for f in files if file_stem(f) not in exclude]


def _training_lines(files: Sequence[str]) -> Iterator[str]:
  for path in files:
    for line in read_text_file(path).split("\n"):
      line = line.rstrip()
      if line.strip():
        yield line


def train_sentencepiece(input_files: Sequence[str], model_prefix: str, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 1.0,
                        num_threads: int = 1, newline_piece: bool = True,
                        extra_options: dict | None = None) -> str:
  """Trains a SentencePiece model (pad=0, unk=1, bos=2, eos=3) on the non-empty lines of the files.

  Deterministic: every line is used in file order (input_sentence_size=0, no shuffling), one thread.
  With `newline_piece`, "\n" is a user-defined piece (id 4) and whitespace is kept verbatim
  (remove_extra_whitespaces=False), so `SentencePieceTokenizer` roundtrips text exactly.
  Returns the path of the written `.model` file.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not input_files:
    raise ValueError("train_sentencepiece: no input files")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)) or ".", exist_ok=True)
  options = dict(
      model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads,
      max_sentence_length=16384, minloglevel=1)
  if newline_piece:
    options.update(user_defined_symbols=["\n"], remove_extra_whitespaces=False)
  options.update(extra_options or {})
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(input_files), **options)
  except RuntimeError as e:  # e.g. "Vocabulary size too high (5000). Please set it to a value <= 4120."
    raise ValueError(f"sentencepiece training failed: {str(e).strip().splitlines()[-1]} "
                     f"(check --vocab_size and --input)") from None
  return model_prefix + ".model"
