"""Tests for pgm_jax.input_pipeline and pgm_jax.tools.preprocess (packing, determinism, resume, sharding,
eval padding, error messages, ArrayRecord roundtrip, TF-free TFDS lm1b source)."""
import json
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import ml_collections  # noqa: E402

from pgm_jax.data import pipeline as ip  # noqa: E402
from pgm_jax.tools import preprocess as pp  # noqa: E402
from pgm_jax.data import tokenizers as tl  # noqa: E402


@pytest.fixture(scope="module")
def sp():
  return tl.SentencePieceTokenizer(tl.DEFAULT_SP_PATH)


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches):
  return [tuple(r) for b in batches for r in b["tokens"].tolist()]


@pytest.fixture
def text_corpus(tmp_path):
  """13 distinct small documents -> distinct blocks with the sentencepiece tokenizer."""
  tr = tmp_path / "train"
  tr.mkdir()
  for i in range(13):
    (tr / f"doc{i:02d}.txt").write_text(f"Document number {i}. " + " ".join(f"word{i}x{j}" for j in range(20)))
  (tmp_path / "val.txt").write_text("\n".join(f"validation line {i} with some words" for i in range(9)))
  return tmp_path


def _text_cfg(corpus, seq_len=32, **kw):
  return _cfg(name="text_files", seq_len=seq_len, train_files=str(corpus / "train" / "*.txt"),
              val_files=str(corpus / "val.txt"), doc_per_line=True, **kw)


# ------------------------------------------------------------------ packing
def test_pack_documents_hand_example():
  docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
  # stream: 1 2 3 E 4 5 E 6 7 8 9 E 10 E  (14 tokens) -> chunks of 3, remainder [10, E] dropped
  expected = np.array([[100, 1, 2, 3, 101],
                       [100, 101, 4, 5, 101],
                       [100, 101, 6, 7, 101],
                       [100, 8, 9, 101, 101]], np.int32)
  out = ip.pack_documents(docs, seq_len=5, bos_id=100, eos_id=101)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, expected)
  packer = ip.StreamingPacker(5, 100, 101)
  np.testing.assert_array_equal(np.concatenate([packer.add(d) for d in docs]), expected)
  assert ip.pack_documents([], 5, 0, 1).shape == (0, 5)


# ------------------------------------------------------------------ shakespeare + determinism + resume
def test_shakespeare_shapes_determinism_and_resume(sp):
  cfg = _cfg(name="shakespeare", seq_len=64)
  it = ip.build_train_iterator(cfg, sp, seed=3, batch_size=4)
  first = _take(it, 3)
  b = first[0]
  assert b["tokens"].shape == (4, 64) and b["tokens"].dtype == np.int32
  assert b["valid"].shape == (4, 64) and b["valid"].dtype == np.bool_ and b["valid"].all()
  assert (b["tokens"][:, 0] == sp.bos_id).all() and (b["tokens"][:, -1] == sp.eos_id).all()
  assert b["tokens"].max() < sp.mask_id
  again = _take(ip.build_train_iterator(cfg, sp, seed=3, batch_size=4), 3)
  assert _rows(first) == _rows(again)
  other = _take(ip.build_train_iterator(cfg, sp, seed=4, batch_size=4), 3)
  assert _rows(first) != _rows(other)

  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  expected_next = _take(it, 3)
  resumed = ip.build_train_iterator(cfg, sp, seed=3, batch_size=4)
  resumed.set_state(state)
  assert _rows(_take(resumed, 3)) == _rows(expected_next)


def test_shakespeare_val_split(sp):
  cfg = _cfg(name="shakespeare", seq_len=128)
  files = ip._shakespeare_files(cfg, "validation")
  assert [tl.file_stem(f) for f in files] == list(ip.DEFAULT_VAL_PLAYS)
  assert not set(ip.DEFAULT_VAL_PLAYS) & {tl.file_stem(f) for f in ip._shakespeare_files(cfg, "train")}
  val_blocks = ip.build_source(cfg, sp, "validation")
  ev = list(ip.build_eval_iterator(cfg, sp, batch_size=16))
  assert sum(int(b["valid"].sum()) for b in ev) == len(val_blocks) * 128
  assert "ALONSO" in sp.decode(np.concatenate([b["tokens"] for b in ev]).reshape(-1))  # The Tempest
  with pytest.raises(ValueError, match=r"config\.data\.val_plays"):
    ip.build_source(_cfg(name="shakespeare", seq_len=64, val_plays=["hamlett"]), sp, "train")


def test_shakespeare_speech_documents_end_every_speech_with_eos(sp):
  """documents="speech": one document per paragraph, so EOS separates the speeches."""
  val = _cfg(name="shakespeare", seq_len=128, documents="speech")
  blocks = np.stack([ex["tokens"] for ex in ip.build_source(val, sp, "validation")])
  inner_eos = (blocks[:, 1:-1] == sp.eos_id).sum(1)
  assert inner_eos.mean() > 1.0
  plays = np.stack([ex["tokens"] for ex in ip.build_source(_cfg(name="shakespeare", seq_len=128),
                                                         sp, "validation")])
  assert (plays[:, 1:-1] == sp.eos_id).sum() < 3  # one document per play
  assert "HAMLET" in sp.decode(blocks.reshape(-1).tolist())
  with pytest.raises(ValueError, match=r"config\.data\.documents must be one of"):
    ip.build_source(_cfg(name="shakespeare", seq_len=64, documents="scene"), sp, "train")


def test_epoch_reshuffle_and_full_coverage(sp, text_corpus):
  cfg = _text_cfg(text_corpus)
  blocks = ip.build_source(cfg, sp, "train")
  n = len(blocks)
  assert n >= 8
  all_rows = sorted(tuple(blocks[i]["tokens"].tolist()) for i in range(n))
  assert len(set(all_rows)) == n
  rows = _rows(_take(ip.build_train_iterator(cfg, sp, seed=0, batch_size=2), n))  # two epochs
  ep0, ep1 = rows[:n], rows[n:2 * n]
  assert sorted(ep0) == all_rows and sorted(ep1) == all_rows
  assert ep0 != ep1  # reshuffled with seed + epoch


def test_per_host_sharding_disjoint_and_covering(sp, text_corpus):
  cfg = _text_cfg(text_corpus)
  n = len(ip.build_source(cfg, sp, "train"))
  all_rows = {tuple(ip.build_source(cfg, sp, "train")[i]["tokens"].tolist()) for i in range(n)}
  per_host = []
  for p in range(3):
    shard_len = len(range(p, n, 3))
    it = ip.build_train_iterator(cfg, sp, seed=0, batch_size=6, process_index=p, process_count=3)
    batches = _take(it, -(-shard_len // 2))
    assert batches[0]["tokens"].shape == (2, 32)  # host-local batch
    per_host.append(set(_rows(batches)[:shard_len]))  # first epoch of this host
    assert len(per_host[-1]) == shard_len
  assert not (per_host[0] & per_host[1]) and not (per_host[0] & per_host[2]) and not (per_host[1] & per_host[2])
  assert per_host[0] | per_host[1] | per_host[2] == all_rows
  with pytest.raises(ValueError, match=r"config\.train\.batch_size"):
    ip.build_train_iterator(cfg, sp, seed=0, batch_size=7, process_index=0, process_count=3)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_padding_counts_every_token_once(sp, text_corpus, process_count):
  cfg = _text_cfg(text_corpus, seq_len=16)
  src = ip.build_source(cfg, sp, "validation")
  n = len(src)
  assert n % 4 != 0
  expected = sorted(tuple(src[i]["tokens"].tolist()) for i in range(n))
  got, counts = [], []
  for p in range(process_count):
    batches = list(ip.build_eval_iterator(cfg, sp, batch_size=2 * process_count, process_index=p,
                                          process_count=process_count))
    counts.append(len(batches))
    for b in batches:
      assert b["tokens"].shape == (2, 16)
      for row, valid in zip(b["tokens"].tolist(), b["valid"]):
        assert valid.all() or not valid.any()
        if valid.all():
          got.append(tuple(row))
  assert len(set(counts)) == 1  # same number of steps on every host
  assert sorted(got) == expected  # every real block exactly once
  # deterministic and restartable
  a = list(ip.build_eval_iterator(cfg, sp, batch_size=2))
  assert _rows(a) == _rows(list(ip.build_eval_iterator(cfg, sp, batch_size=2)))
  assert len(list(ip.build_eval_iterator(cfg, sp, batch_size=2, max_batches=2))) == 2


# ------------------------------------------------------------------ errors
def test_error_messages(sp, text_corpus, tmp_path):
  with pytest.raises(ValueError, match=r"config\.data\.name"):
    ip.build_source(_cfg(name="owt", seq_len=32), sp, "train")
  with pytest.raises(ValueError, match=r"config\.data\.data_dir: /no/such/dir does not exist"):
    ip.build_train_iterator(_cfg(name="array_record", seq_len=32, data_dir="/no/such/dir"), sp, seed=0,
                            batch_size=2)
  with pytest.raises(ValueError, match=r"config\.data\.train_files: no files match"):
    ip.build_train_iterator(_cfg(name="text_files", seq_len=32, train_files=str(tmp_path / "*.nope")), sp,
                            seed=0, batch_size=2)
  with pytest.raises(ValueError, match=r"corpus produced 0 blocks of seq_len=100000"):
    ip.build_train_iterator(_text_cfg(text_corpus, seq_len=100000), sp, seed=0, batch_size=2)
  with pytest.raises(ValueError, match=r"config\.data\.data_dir"):
    ip.build_eval_iterator(_cfg(name="lm1b", seq_len=32, data_dir=str(tmp_path)), sp, batch_size=2)


# ------------------------------------------------------------------ preprocess -> array_record
def test_preprocess_array_record_roundtrip(tmp_path, sp):
  docs = [f"Document {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(60)]
  with open(tmp_path / "corpus.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "id": 1}) + "\n")
  out = tmp_path / "out"
  pp.main([f"--source=jsonl:{tmp_path}/*.jsonl", "--tokenizer=sentencepiece",
           f"--tokenizer_path={tl.DEFAULT_SP_PATH}", "--seq_len=24", "--val_last_docs=15", f"--out={out}"])
  meta = json.loads((out / "meta.json").read_text())
  assert meta["seq_len"] == 24 and meta["vocab_size"] == sp.vocab_size
  assert meta["train"]["docs"] == 45 and meta["validation"]["docs"] == 15
  want_train = ip.pack_documents([sp.encode(d) for d in docs[:45]], 24, sp.bos_id, sp.eos_id)
  want_val = ip.pack_documents([sp.encode(d) for d in docs[45:]], 24, sp.bos_id, sp.eos_id)
  assert meta["train"]["blocks"] == len(want_train) and meta["validation"]["blocks"] == len(want_val)

  cfg = _cfg(name="array_record", seq_len=24, data_dir=str(out))
  n = len(want_train)
  it = ip.build_train_iterator(cfg, sp, seed=0, batch_size=1)
  got = _rows(_take(it, n))
  assert sorted(got) == sorted(tuple(r) for r in want_train.tolist())
  state = it.get_state()
  nxt = _take(it, 2)
  it2 = ip.build_train_iterator(cfg, sp, seed=0, batch_size=1)
  it2.set_state(state)
  assert _rows(_take(it2, 2)) == _rows(nxt)
  ev = list(ip.build_eval_iterator(cfg, sp, batch_size=4))
  valid_rows = [tuple(r) for b in ev for r, v in zip(b["tokens"].tolist(), b["valid"]) if v.all()]
  assert valid_rows == [tuple(r) for r in want_val.tolist()]  # file order, no shuffle

  with pytest.raises(ValueError, match=r"config\.data\.seq_len: 32 but .*seq_len=24"):
    ip.build_train_iterator(_cfg(name="array_record", seq_len=32, data_dir=str(out)), sp, seed=0, batch_size=1)
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer"):
    ip.build_train_iterator(cfg, tl.GPT2Tokenizer(), seed=0, batch_size=1)


# ------------------------------------------------------------------ lm1b via TF-free TFDS
def _build_tiny_lm1b(data_dir, train_lines, test_lines):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  real_cls = tfds.builder_cls("lm1b")
  with tfds.core.registered.skip_registration():

    class TinyLm1b(real_cls):  # same name/version/features as the real lm1b, tiny generated data
      name = "lm1b"

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._gen(train_lines), "test": self._gen(test_lines)}

      def _gen(self, lines):
        for i, line in enumerate(lines):
          yield i, {"text": line}

  TinyLm1b(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_lm1b_tfds_source(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", ".", "a", "dog", "ran", "##s"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tok = tl.BertWordPieceTokenizer(str(tmp_path / "vocab.txt"))
  train = ["The cat sat.", "A dog ran.", "the cats ran", "a a a a a a a a a a a a", "dog"]
  test = ["The dog sat.", "cat", "a cat ran."]
  _build_tiny_lm1b(tmp_path / "tfds", train, test)
  assert "tensorflow" not in sys.modules
  cfg = _cfg(name="lm1b", seq_len=8, data_dir=str(tmp_path / "tfds"))
  ev = list(ip.build_eval_iterator(cfg, tok, batch_size=2))
  assert len(ev) == 2 and ev[0]["tokens"].shape == (2, 8)
  rows = {tuple(r[v].tolist()) for b in ev for r, v in zip(b["tokens"], b["valid"]) if v.any()}
  v = {t: i for i, t in enumerate(vocab)}
  assert rows == {(2, v["the"], v["dog"], v["sat"], v["."], 3), (2, v["cat"], 3), (2, v["a"], v["cat"], v["ran"], v["."], 3)}
  assert sum(int(b["valid"].sum()) for b in ev) == 6 + 3 + 6
  for b in ev:  # pads are pad_id and invalid
    assert (b["tokens"][~b["valid"]] == tok.pad_id).all()
  it = ip.build_train_iterator(cfg, tok, seed=0, batch_size=5)
  b = next(it)
  lens = sorted(b["valid"].sum(1).tolist())
  assert lens == [3, 6, 6, 6, 8]  # "a a ... a" (12 words) truncated to [CLS] + 6 + [SEP]
  assert (b["tokens"][:, 0] == tok.bos_id).all()
  longest = b["tokens"][b["valid"].sum(1) == 8][0]
  assert longest.tolist() == [2] + [v["a"]] * 6 + [3]  # truncation keeps the final [SEP] (HF)
