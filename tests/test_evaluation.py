"""AR baseline (KV-cached sampler), generative perplexity with the AR judge, entropy."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, tiny_gpt2_state
from pgm_jax import evaluation, samplers, train
from pgm_jax.data import pipeline as input_pipeline
from pgm_jax.models import DiT, ModelConfig


def test_entropy_of_constant_and_uniform_sequences():
  assert evaluation.unigram_entropy([7] * 100) == 0.0
  rng = np.random.default_rng(0)
  v = 50
  ids = rng.integers(0, v, 200_000)
  assert abs(evaluation.unigram_entropy(ids) - np.log(v)) < 1e-3
  assert evaluation.mean_entropy([[1, 2], [3, 3]]) == pytest.approx(np.log(2) / 2)


@pytest.mark.slow
def test_ar_kv_cache_sampler_equals_full_forward():
  """Each cached step's draw equals the draw from a full causal forward pass."""
  cfg = ModelConfig("ar", 30, 29, hidden=32, num_heads=2, cond_dim=16, num_layers=2,
                    dropout=0.0, dtype="float32")
  model, length = DiT(cfg), 12
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  leaves, treedef = jax.tree.flatten(params)
  params = treedef.unflatten([0.2 * jax.random.normal(jax.random.key(i), x.shape)
                              for i, x in enumerate(leaves)])
  prompt = samplers.unconditional_prompt(2, length, 0)
  prompt.tokens[:, 3], prompt.known[:, 3] = 5, True  # a known token is kept
  res = samplers.ar_sample(params, prompt, model=model, seed=3, mask_id=29)
  assert res.compiles == 1 and np.all(res.tokens[:, 3] == 5) and not np.any(res.tokens == 29)
  logits = model.apply({"params": params}, jnp.asarray(res.tokens))
  logp = samplers.filtered_log_probs(logits, 29)
  positions = jnp.broadcast_to(jnp.arange(1, length)[None], (2, length - 1))
  draws = np.asarray(samplers.keyed_gumbel_argmax(jax.random.key(3), logp[:, :-1],
                                                  jnp.arange(2), positions))
  free = np.ones(length - 1, bool)
  free[2] = False  # position 3 was given
  np.testing.assert_array_equal(draws[:, free], res.tokens[:, 1:][:, free])
  assert len(np.unique(res.tokens)) > 3


@pytest.fixture(scope="module")
def judge_workdir(tmp_path_factory):
  """A small AR judge trained for a few hundred steps on the training plays."""
  cfg = load_config("shakespeare", "tiny,ar")
  cfg.train.num_steps = 200
  cfg.train.batch_size = 16
  cfg.train.eval_every = 1000
  cfg.train.num_final_samples = 0
  cfg.opt.lr = 3e-3
  cfg.opt.warmup_steps = 20
  cfg.ckpt.every_steps = 1000
  workdir = str(tmp_path_factory.mktemp("judge"))
  train.train_and_evaluate(cfg, workdir)
  return workdir


@pytest.mark.slow
def test_judge_prefers_real_text_over_shuffled_tokens(judge_workdir):
  judge = evaluation.load_judge(judge_workdir)
  cfg = load_config("shakespeare", "tiny")
  blocks = list(input_pipeline.build_eval_iterator(cfg.data, judge.tokenizer, batch_size=16,
                                                   max_batches=2))
  rows = [row[valid] for b in blocks for row, valid in zip(b["tokens"], b["valid"])
          if valid.any()]
  rng = np.random.default_rng(0)
  shuffled = [np.concatenate([r[:1], rng.permutation(r[1:])]) for r in rows]
  real = judge.score_tokens(rows)["gen_ppl_raw"]
  fake = judge.score_tokens(shuffled)["gen_ppl_raw"]
  assert real < 0.8 * fake, (real, fake)
  # Re-tokenised scoring of the decoded text agrees in direction.
  texts = [judge.tokenizer.decode(r.tolist()) for r in rows]
  fake_texts = [judge.tokenizer.decode(r.tolist()) for r in shuffled]
  assert judge.score_texts(texts)["gen_ppl"] < judge.score_texts(fake_texts)["gen_ppl"]


@pytest.mark.slow
def test_eval_mode_writes_generation_metrics(judge_workdir, tmp_path):
  cfg = load_config("shakespeare", "tiny")
  cfg.train.num_steps = 2
  cfg.train.num_final_samples = 0
  workdir = str(tmp_path / "pgm")
  train.train_and_evaluate(cfg, workdir)
  cfg.eval.gen_ppl = True
  cfg.eval.judge_workdir = judge_workdir
  cfg.eval.gen_num_samples = 4
  cfg.sample.batch_size = 4
  result = evaluation.evaluate(cfg, workdir)
  saved = json.load(open(os.path.join(workdir, "eval.json")))
  for key in ("val_ppl", "gen_ppl", "gen_ppl_raw", "entropy", "steps", "sampler", "throughput"):
    assert key in saved, key
  assert saved["sampler"] == "efficient-uniform" and saved["steps"] == cfg.sample.steps
  assert result["gen_ppl"] > 1.0 and 0.0 < result["entropy"] < np.log(2049)


def test_gen_ppl_needs_a_judge(tmp_path):
  cfg = load_config("shakespeare", "tiny")
  cfg.eval.gen_ppl = True
  with pytest.raises(ValueError, match="config.eval.judge_workdir"):
    evaluation.evaluate(cfg, str(tmp_path))


def _np_gpt2_logits(state, tokens, n_head):
  """Independent NumPy GPT-2 forward (float64) from the HF state dict."""
  def ln(x, w, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  s = {k: v.astype(np.float64) for k, v in state.items()}
  length = tokens.shape[1]
  x = s["transformer.wte.weight"][tokens] + s["transformer.wpe.weight"][:length]
  layers = len({k.split(".")[2] for k in s if k.startswith("transformer.h.")})
  e = x.shape[-1]
  d = e // n_head
  causal = np.tril(np.ones((length, length), bool))
  for i in range(layers):
    p = lambda n: s[f"transformer.h.{i}.{n}"]
    h = ln(x, p("ln_1.weight"), p("ln_1.bias"))
    qkv = h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
    q, k, v = (t.reshape(t.shape[0], length, n_head, d) for t in np.split(qkv, 3, -1))
    sc = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    sc = np.where(causal, sc, -np.inf)
    w = np.exp(sc - sc.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape)
    x = x + att @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
    h = ln(x, p("ln_2.weight"), p("ln_2.bias"))
    x = x + gelu(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") \
        + p("mlp.c_proj.bias")
  x = ln(x, s["transformer.ln_f.weight"], s["transformer.ln_f.bias"])
  return x @ s["transformer.wte.weight"].T


@pytest.mark.slow
def test_gpt2_judge_conversion_matches_numpy_forward(tmp_path):
  from safetensors.numpy import save_file
  from pgm_jax.models import gpt2
  rng = np.random.default_rng(0)
  e, layers, heads, vocab, positions = 32, 2, 2, 50257, 64
  state = tiny_gpt2_state(rng, vocab=vocab, e=e, layers=layers, positions=positions)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  save_file({k: v.copy() for k, v in state.items()}, str(hf_dir / "model.safetensors"))
  (hf_dir / "config.json").write_text(json.dumps({"n_head": heads}))
  out = tmp_path / "judge"
  from pgm_jax.tools.eval_assets import main as evaluation_cli
  evaluation_cli(["convert_gpt2", f"--from={hf_dir}", f"--to={out}"])
  judge = evaluation.load_judge(str(out))
  assert isinstance(judge, evaluation.GPT2Judge)
  tokens = rng.integers(0, vocab, (2, 10))
  model = gpt2.GPT2(gpt2.GPT2Config(vocab, positions, e, layers, heads))
  ours = np.asarray(model.apply({"params": judge.params}, jnp.asarray(tokens)))
  ref = _np_gpt2_logits(state, tokens, heads)
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5
  # GPT-2 ids: "Hello world" -> [15496, 995]; scoring runs end to end.
  result = judge.score_texts(["Hello world", "To be, or not to be"])
  assert result["gen_tokens"] == 2 + len(judge.tokenizer.encode("To be, or not to be"))
  with pytest.raises(ValueError, match="missing keys"):
    from pgm_jax.models.gpt2 import hf_to_flax, config_from_state
    broken = dict(state)
    del broken["transformer.h.1.ln_2.bias"]
    hf_to_flax(broken, config_from_state(state, heads))
