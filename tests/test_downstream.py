"""Zero-shot likelihood (config.eval.datasets) and the lm-evaluation-harness adapter.

Everything is offline: the zero-shot sets and the harness task are small local files that
the tests write. One tiny PGM checkpoint (random weights) is written per module.
"""
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from pgm_jax import evaluation, experiment, steps
from pgm_jax.core import checkpointing
from pgm_jax.data import detokenizers, pipeline
from pgm_jax.evaluation import harness


def _noisy(params, seed):
  """Random values everywhere (zero-initialised output layers would tie every score)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _setup(arg, seed=0):
  cfg = load_config("shakespeare", arg)
  cfg.eval.batch_size = 8
  setup = experiment.make_setup(cfg)
  state = experiment.init_state(setup, jax.random.key(seed))
  return cfg, setup, state


@pytest.fixture(scope="module")
def pgm(tmp_path_factory):
  """A tiny PGM and its workdir (one checkpoint, EMA = raw = random weights)."""
  workdir = str(tmp_path_factory.mktemp("pgm_wd"))
  cfg, setup, state = _setup("tiny")
  params = _noisy(state.params, 1)
  state = state.replace(params=params, ema_params=params)
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir))
  checkpointing.save(manager, 3, state, wait=True)
  manager.close()
  return cfg, setup, params, workdir


WIKI = [" = Valkyria = \n", "", " The game 's 1 @,@ 000 @-@ unit army , ( in 2011 ) . \n",
        " It began development in 2010 , carrying over a large portion . \n"] * 6
PTB = ["the company 's N shares ca n't rise", "pierre <unk> N years old will join"] * 10


def _write_jsonl(path, field, texts):
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({field: t}) + "\n")


@pytest.mark.slow
def test_zero_shot_sets_from_local_files(pgm, tmp_path):
  cfg, setup, _, workdir = pgm
  _write_jsonl(tmp_path / "wikitext2.jsonl", "text", WIKI)
  _write_jsonl(tmp_path / "ptb_val.jsonl", "sentence", PTB)
  cfg = load_config("shakespeare", "tiny")
  cfg.eval.batch_size = 8
  cfg.eval.datasets = f"wikitext2,ptb={tmp_path / 'ptb_val.jsonl'}"
  cfg.eval.datasets_dir = str(tmp_path)
  cfg.eval.group_docs = 10
  result = evaluation.evaluate(cfg, workdir)
  assert set(result["zero_shot"]) == {"wikitext2", "ptb"} and result["step"] == 3
  tok, seq_len = setup.tokenizer, cfg.data.seq_len
  for name, texts, detok in (("wikitext2", WIKI, detokenizers.wikitext),
                             ("ptb", PTB, detokenizers.ptb)):
    r = result["zero_shot"][name]
    # The reference's wrap, written out: detokenize, encode, EOS, groups of 10 records.
    want = pipeline.pack_documents([tok.encode(detok(t)) for t in texts], seq_len,
                                   tok.bos_id, tok.eos_id, group_docs=10)
    assert r["blocks"] == len(want) > 0 and r["records"] == len(texts)
    assert r["val_tokens"] == len(want) * seq_len          # every block, every position
    assert np.isfinite(r["val_ppl"]) and r["val_ppl"] > 1.0
  saved = json.load(open(os.path.join(workdir, "eval.json")))
  assert saved["zero_shot"]["ptb"]["val_ppl"] == result["zero_shot"]["ptb"]["val_ppl"]

  cfg.eval.datasets = "wikitext2,ptb"                     # ptb.jsonl is not in the folder
  with pytest.raises(ValueError, match=r"config.eval.datasets \(ptb\):.*ptb.jsonl not found"):
    evaluation.evaluate(cfg, workdir)
  cfg.eval.datasets = "wikitext5"
  with pytest.raises(ValueError, match="config.eval.datasets: unknown set 'wikitext5'"):
    evaluation.evaluate(cfg, workdir)


def _reference_elbo(setup, params, kind, tokens, t, u):
  """The reference's rule on the unpadded sequence: mean over samples and positions of
  (1/t)(-log p) at the noised positions, via the training code's loss_terms."""
  rows = np.broadcast_to(np.asarray(tokens, np.int32), (len(t), len(tokens)))
  terms = jax.jit(lambda p, batch, t, u: steps.loss_terms(
      p, batch, t, u, None, model=setup.model, mask_id=setup.mask_id,
      train=False, sampling_eps=1e-3))(params, {"tokens": rows,
                                                "valid": np.ones(rows.shape, bool)}, t, u)
  return -float(terms.nll_sum) / rows.size


@pytest.mark.parametrize("arg", ["tiny", "tiny,mdlm"])
@pytest.mark.slow
def test_harness_elbo_is_the_reference_rule(pgm, arg):
  if arg == "tiny":
    _, setup, params, _ = pgm
  else:
    _, setup, state = _setup(arg, seed=2)
    params = _noisy(state.params, 3)
  kind = setup.model_cfg.kind
  scorer = harness.Scorer(setup, params, num_mc_samples=8, batch_size=4, bucket_size=16)
  requests = [("To be, or not", " to be"), ("Friends, Romans,", " countrymen, lend")]
  got = scorer.loglikelihood(requests)
  for i, (context, continuation) in enumerate(requests):
    prefix, target = scorer.encode(context, continuation)
    assert prefix[0] == setup.tokenizer.bos_id and target[-1] == setup.tokenizer.eos_id
    tokens = prefix + target
    assert len(tokens) % 16 != 0                          # the scorer padded this one
    t, u = scorer.draws(scorer.request_key(i), -(-len(tokens) // 16) * 16)
    want = _reference_elbo(setup, params, kind, tokens, t, np.asarray(u)[:, :len(tokens)])
    assert abs(got[i][0] - want) < 1e-5 * abs(want), (got[i][0], want)
    assert isinstance(got[i][1], bool)
  # Greedy prediction, recomputed on the unpadded sequence.
  prefix, target = scorer.encode(*requests[0])
  tokens = np.asarray([prefix + target], np.int32)
  query = np.zeros(tokens.shape, bool)
  query[0, len(prefix):len(prefix) + len(target) - 1] = True
  if kind == "pgm":
    logits = jax.jit(setup.model.apply)({"params": params}, tokens, query.astype(np.int32))
  else:
    logits = jax.jit(setup.model.apply)({"params": params},
                                        np.where(query, setup.mask_id, tokens))
  logits = np.asarray(logits).copy()
  logits[..., setup.mask_id] = -np.inf
  assert got[0][1] == bool(np.all(logits.argmax(-1)[query] == tokens[query]))
  # Longer than the model's context: (0.0, False), as the reference.
  assert scorer.loglikelihood([("word " * 200, " end")]) == [(0.0, False)]
  if kind == "pgm":  # conditional: the context is never noised
    cond = harness.Scorer(setup, params, num_mc_samples=8, batch_size=4, likelihood="conditional")
    assert cond.loglikelihood(requests[:1])[0][0] < 0.0
  with pytest.raises(ValueError, match="config.harness.num_mc_samples=6"):
    harness.Scorer(setup, params, num_mc_samples=6, batch_size=4)


def test_harness_ar_is_exact():
  cfg, setup, state = _setup("tiny,ar", seed=4)
  params = _noisy(state.params, 5)
  scorer = harness.Scorer(setup, params, bucket_size=16)
  (ll, greedy), = scorer.loglikelihood([("To be, or not", " to be")])
  prefix, target = scorer.encode("To be, or not", " to be")
  assert target[-1] != setup.tokenizer.eos_id              # no EOS for the AR score
  tokens = np.asarray([prefix + target], np.int32)
  logits = np.asarray(jax.jit(setup.model.apply)({"params": params}, tokens), np.float64)[0]
  logits[:, setup.mask_id] = -np.inf
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  pos = np.arange(len(prefix) - 1, len(prefix) + len(target) - 1)
  want = sum(logp[p, tokens[0, p + 1]] for p in pos)
  np.testing.assert_allclose(ll, want, rtol=1e-5)
  assert greedy == bool(all(logits[p].argmax() == tokens[0, p + 1] for p in pos))


TASK = """task: pgmjax_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_runs_a_local_task(pgm, tmp_path, monkeypatch):
  pytest.importorskip("lm_eval")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  cfg, setup, params, workdir = pgm
  docs = [{"question": "Who loves Juliet?", "choices": ["Romeo", "Hamlet", "a king"],
           "label": 0},
          {"question": "The sea is", "choices": ["wet and salt", "dry"], "label": 0},
          {"question": "Lend me your", "choices": ["ears", "horse", "sword"], "label": 2}]
  data = tmp_path / "toy.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  (tasks / "pgmjax_toy.yaml").write_text(TASK.format(data=data))
  cfg = load_config("shakespeare", "tiny")
  cfg.harness.tasks = "pgmjax_toy"
  cfg.harness.include_path = str(tasks)
  cfg.harness.num_mc_samples = 4
  cfg.harness.batch_size = 4
  cfg.harness.bucket_size = 16
  summary = harness.run_harness(cfg, workdir)
  acc = summary["results"]["pgmjax_toy"]["acc,none"]
  saved = json.load(open(os.path.join(workdir, "harness.json")))
  assert saved["results"]["pgmjax_toy"]["acc,none"] == acc
  # lm_eval's answer = the choice our scorer ranks first (same requests, same order).
  scorer = harness.Scorer(setup, params, num_mc_samples=4, batch_size=4, bucket_size=16)
  requests = [(d["question"], " " + c) for d in docs for c in d["choices"]]
  lls = [ll for ll, _ in scorer.loglikelihood(requests)]
  hits, first = [], 0
  for d in docs:
    n = len(d["choices"])
    hits.append(int(np.argmax(lls[first:first + n])) == d["label"])
    first += n
  np.testing.assert_allclose(acc, np.mean(hits))
