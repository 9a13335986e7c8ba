"""Samplers: naive == efficient, non-uniform == uniform when forced, conditioning is kept,
bounded compilation and MDLM cache exactness (the sample / bench CLI modes: test_train.py);
confidence-threshold: its reveal rule, efficient == naive, its extremes and step cap, and
--mode=sample with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from pgm_jax import samplers
from pgm_jax.samplers import common, pgm as pgm_samplers
from pgm_jax.models import DiT, ModelConfig, PartitionDiT

L, V = 24, 30
MASK, BOS = V - 1, 0


def _cfg(kind):
  return ModelConfig(kind, V, MASK, hidden=32, num_heads=2, cond_dim=16, num_layers=2,
                     enc_layers=2, dec_layers=2, dropout=0.0, dtype="float32")


def _random_params(model, kind, seed=0):
  tokens = jnp.zeros((1, L), jnp.int32)
  return random_params(model, *((tokens, tokens) if kind == "pgm" else (tokens,)), seed=seed,
                       scale=0.2)


@pytest.fixture(scope="module")
def pgm():
  model = PartitionDiT(_cfg("pgm"))
  return model, _random_params(model, "pgm")


@pytest.fixture(scope="module")
def mdlm():
  model = DiT(_cfg("mdlm"))
  return model, _random_params(model, "mdlm", seed=3)


def _infill_prompt(batch=2):
  prompt = samplers.unconditional_prompt(batch, L, BOS)
  prompt.tokens[:, 5:8] = [[3, 4, 5]] * batch
  prompt.known[:, 5:8] = True
  prompt.tokens[1, 20] = 7  # a different number of known tokens per sequence
  prompt.known[1, 20] = True
  return prompt


def _plan(prompt, steps, seed=0):
  rng = np.random.default_rng(seed)
  order = samplers.random_orders(rng, prompt.known)
  counts = samplers.make_schedule("uniform", (~prompt.known).sum(1), steps, rng, L)
  return order, counts


@pytest.mark.parametrize("steps", [5, 23])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.slow
def test_efficient_uniform_equals_naive(pgm, steps, conditional):
  model, params = pgm
  prompt = _infill_prompt() if conditional else samplers.unconditional_prompt(2, L, BOS)
  order, counts = _plan(prompt, steps)
  kw = dict(model=model, steps=steps, seed=11, mask_id=MASK, order=order, schedule=counts)
  eff = samplers.pgm_sample(params, prompt, sampler="efficient-uniform", bucket_size=8, **kw)
  naive = samplers.pgm_sample(params, prompt, sampler="naive", **kw)
  np.testing.assert_array_equal(eff.tokens, naive.tokens)
  assert eff.passes == naive.passes == int((counts.max(1) > 0).sum())
  # Not a trivially constant output: the model is random and peaked.
  assert len(np.unique(eff.tokens[:, 1:])) > 3


@pytest.mark.slow
def test_non_uniform_forced_to_uniform_schedule_equals_uniform(pgm):
  model, params = pgm
  prompt = _infill_prompt()
  order, counts = _plan(prompt, 6)
  kw = dict(model=model, steps=6, seed=5, mask_id=MASK, order=order, schedule=counts,
            bucket_size=8)
  uni = samplers.pgm_sample(params, prompt, sampler="efficient-uniform", **kw)
  non = samplers.pgm_sample(params, prompt, sampler="efficient-non-uniform", **kw)
  np.testing.assert_array_equal(uni.tokens, non.tokens)


@pytest.mark.parametrize("family,sampler", [("pgm", s) for s in samplers.PGM_SAMPLERS]
                         + [("mdlm", s) for s in samplers.MDLM_SAMPLERS])
@pytest.mark.slow
def test_known_tokens_kept_and_no_mask_in_output(pgm, mdlm, family, sampler):
  prompt = _infill_prompt()
  if family == "pgm":
    model, params = pgm
    res = samplers.pgm_sample(params, prompt, model=model, sampler=sampler, steps=7, seed=2,
                              mask_id=MASK, bucket_size=8)
  else:
    model, params = mdlm
    res = samplers.mdlm_sample(params, prompt, model=model, sampler=sampler, steps=7, seed=2,
                               mask_id=MASK)
  np.testing.assert_array_equal(res.tokens[prompt.known], prompt.tokens[prompt.known])
  assert not np.any(res.tokens == MASK)
  assert res.tokens.min() >= 0 and res.tokens.max() < V


def test_non_uniform_schedule_counts():
  rng = np.random.default_rng(0)
  remaining = np.array([L - 1, L - 4])
  for kind in samplers.SCHEDULES:
    counts = samplers.make_schedule(kind, remaining, 8, rng, L)
    np.testing.assert_array_equal(counts.sum(0), remaining)
    assert counts.min() >= 0
  uni = samplers.make_schedule("uniform", np.array([1023]), 128, rng, 1024)
  assert list(uni[:, 0][:3]) == [8, 8, 8] and uni[-1, 0] == 7 and len(uni) == 128


@pytest.mark.slow
def test_compilations_are_bounded_and_do_not_grow_with_steps(pgm):
  model, params = pgm
  prompt = samplers.unconditional_prompt(2, L, BOS)
  compiles = {}
  for steps, temp in ((3, 0.9), (23, 0.8)):  # a new temperature forces fresh traces
    res = samplers.pgm_sample(params, prompt, model=model, sampler="efficient-uniform",
                              steps=steps, seed=0, mask_id=MASK, bucket_size=8,
                              temperature=temp)
    compiles[steps] = res.compiles
  buckets = -(-L // 8)
  assert compiles[23] <= 2 * buckets  # <= (#encoder buckets) x (m, last m)
  assert compiles[3] <= 2 * buckets
  # A second run of the same sampler compiles nothing new.
  again = samplers.pgm_sample(params, prompt, model=model, sampler="efficient-uniform",
                              steps=23, seed=1, mask_id=MASK, bucket_size=8, temperature=0.8)
  assert again.compiles == 0


@pytest.mark.slow
def test_mdlm_compiles_once_for_any_steps(mdlm):
  model, params = mdlm
  prompt = samplers.unconditional_prompt(2, L, BOS)
  for steps in (4, 40):
    res = samplers.mdlm_sample(params, prompt, model=model, sampler="ddpm", steps=steps,
                               seed=0, mask_id=MASK)
    assert res.compiles == 1


@pytest.mark.slow
def test_ddpm_cache_equals_ddpm_with_fewer_passes(mdlm):
  model, params = mdlm
  prompt = samplers.unconditional_prompt(2, L, BOS)
  kw = dict(model=model, steps=64, seed=4, mask_id=MASK)
  plain = samplers.mdlm_sample(params, prompt, sampler="ddpm", **kw)
  cached = samplers.mdlm_sample(params, prompt, sampler="ddpm_cache", **kw)
  np.testing.assert_array_equal(plain.tokens, cached.tokens)
  assert plain.passes == 65
  assert cached.passes < plain.passes  # 23 tokens over 64 steps: many steps change nothing
  assert samplers.mdlm_passes(prompt.known, 64, 0, cache=False) == 65


def test_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05, 0.0]]) + 1e-20)
  logp = samplers.filtered_log_probs(logits, mask_id=4, top_p=0.7)
  np.testing.assert_allclose(np.exp(np.asarray(logp))[0, :2], [0.625, 0.375], rtol=1e-5)
  assert np.all(np.exp(np.asarray(logp))[0, 2:] == 0)
  greedy = samplers.filtered_log_probs(logits, mask_id=4, top_p=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(greedy))[0, 0], 1.0)
  cold = np.exp(np.asarray(samplers.filtered_log_probs(logits, mask_id=4, temperature=0.5)))
  assert cold[0, 0] > 0.5


@pytest.mark.slow
def test_exact_flops_quadratic_fit_matches_direct_lowering(pgm):
  model, params = pgm
  prompt = samplers.unconditional_prompt(2, L, BOS)
  order, counts = _plan(prompt, 23)
  st = pgm_samplers._initial_state(prompt, order, MASK)
  static = dict(model=model, n_query=1, mask_id=MASK, top_p=1.0, temperature=1.0)
  args = (params, st, jnp.asarray(counts[0]), jax.random.key(0))
  lower_at = lambda n: common.lowered_flops(pgm_samplers._pgm_efficient_step_jit, *args, n_enc=n,
                                       **static)
  fit = pgm_samplers._QuadraticCost(lower_at, L)
  for n in (1, 7, 13):
    assert abs(fit(n) - lower_at(n)) <= 1e-6 * lower_at(n)


def test_prompt_parsing():
  from pgm_jax.data.tokenizers import get_tokenizer
  from conftest import load_config
  tok = get_tokenizer(load_config("shakespeare").data)
  tokens, known = samplers.parse_prompt("To be[[5]]the question", tok, 32)
  n_head = len(tok.encode("To be"))
  assert known[0] and known[1:1 + n_head].all() and not known[1 + n_head:6 + n_head].any()
  assert known[6 + n_head] and not known[-1]
  with pytest.raises(ValueError, match="config.sample.prompt"):
    samplers.parse_prompt("x[[40]]", tok, 32)


# ----------------------------------------------------------------------------
# confidence-threshold (Fast-dLLM's threshold parallel decoding), PGM and MDLM.
# ----------------------------------------------------------------------------

THRESHOLD = common.THRESHOLD_SAMPLER


class _CharTokenizer:
  """Just enough of a tokenizer for `make_prompt`: one id in [1, 20] per character."""
  bos_id = BOS

  def encode(self, text):
    return [1 + ord(c) % 20 for c in text]


def _gap_prompt():
  """Two different `[[N]]` infill prompts (different known counts per sequence)."""
  return samplers.make_prompt(["ab[[5]]cde[[3]]f", "x[[9]]yz"], 2, _CharTokenizer(), L)


def test_threshold_reveal_rule():
  """The shared rule: >= threshold, at least the most confident (ties: lowest position),
  force_all, never off the candidates; the draw is keyed by (row, position) only."""
  # Draws are token 0 (probability 1 under logp); confidences are read from conf_logp.
  logp = np.full((2, 4, 3), -np.inf, np.float32)
  logp[..., 0] = 0.0
  conf_logp = logp.copy()
  conf_logp[..., 0] = np.log([[0.5, 0.7, 0.7, 0.2]] * 2)
  candidate = np.array([[True, True, True, True], [True, False, True, False]])
  positions = np.array([[3, 9, 5, 1]] * 2, np.int32)
  key, rows = jax.random.key(0), np.arange(2, dtype=np.int32)
  rule = jax.jit(common.threshold_reveal)  # one program: force_all is always [B]
  reveal_at = lambda thr, force=(False, False), cand=candidate: np.asarray(rule(
      logp, cand, key, rows, positions, np.float32(thr), np.array(force), conf_logp)[1])
  # Above every confidence: one each, the most confident (0.7 twice: position 5 < 9).
  np.testing.assert_array_equal(reveal_at(0.95), [[0, 0, 1, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(reveal_at(0.5), [[1, 1, 1, 0], [1, 0, 1, 0]])
  np.testing.assert_array_equal(reveal_at(0.0), candidate)
  np.testing.assert_array_equal(reveal_at(0.95, (True, True)), candidate)
  np.testing.assert_array_equal(reveal_at(0.95, (False, True)), [[0, 0, 1, 0], [1, 0, 1, 0]])
  assert not reveal_at(0.0, (True, True), np.zeros((2, 4), bool)).any()
  # The same (row, position) gets the same draw wherever its slot is.
  logp_r = np.log(np.random.default_rng(0).dirichlet(np.ones(3), (2, 4))).astype(np.float32)
  draw = lambda perm: np.asarray(rule(logp_r[:, perm], candidate[:, perm], key, rows,
                                      positions[:, perm], np.float32(0.5),
                                      np.array((False, False)), logp_r[:, perm])[0])
  np.testing.assert_array_equal(draw([0, 1, 2, 3]), draw([3, 2, 1, 0])[:, ::-1])


def test_threshold_greedy_confidence_is_the_temperature_one_probability():
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1, 0.0]]) + 1e-20)
  logp, conf = common.threshold_log_probs(logits, mask_id=3, temperature=0.0)
  np.testing.assert_allclose(np.exp(np.asarray(logp))[0], [1, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(conf))[0, 0], 0.6, rtol=1e-5)
  logp, conf = common.threshold_log_probs(logits, mask_id=3, temperature=0.5)
  assert conf is logp


@pytest.mark.slow
def test_pgm_threshold_efficient_equals_naive(pgm):
  """The efficient execution (packed encoder, every unknown position queried, padded) gives
  the naive full-length execution's tokens, token for token, for the same seed."""
  model, params = pgm
  prompt = _gap_prompt()
  kw = dict(model=model, sampler=THRESHOLD, steps=L, seed=7, mask_id=MASK, threshold=0.15,
            top_p=0.95)
  eff = samplers.pgm_sample(params, prompt, bucket_size=8, **kw)
  naive = samplers.pgm_sample(params, prompt, execution="naive", **kw)
  np.testing.assert_array_equal(eff.tokens, naive.tokens)
  assert eff.passes == naive.passes and eff.passes == eff.seq_passes.max()
  np.testing.assert_array_equal(eff.seq_passes, naive.seq_passes)
  unknown = (~prompt.known).sum(1)
  assert (eff.seq_passes < unknown).all()  # several positions revealed in some steps
  np.testing.assert_array_equal(eff.tokens[prompt.known], prompt.tokens[prompt.known])
  assert not np.any(eff.tokens == MASK) and len(np.unique(eff.tokens[~prompt.known])) > 1
  # Compilation: the encoder length only grows and the query count only shrinks.
  assert eff.compiles <= 2 * -(-L // 8)
  again = samplers.pgm_sample(params, prompt, bucket_size=8, **kw)
  assert again.compiles == 0
  np.testing.assert_array_equal(again.tokens, eff.tokens)


@pytest.mark.slow
def test_pgm_threshold_zero_one_and_steps_cap(pgm):
  """threshold 0: everything in one pass; threshold 1 (above every probability): one
  position per step per sequence; `steps` caps the passes, the last one reveals the rest."""
  model, params = pgm
  prompt = _gap_prompt()
  unknown = (~prompt.known).sum(1)
  assert unknown[0] != unknown[1]
  # bucket_size = L: one program for the whole test.
  run = lambda thr, steps: samplers.pgm_sample(params, prompt, model=model, sampler=THRESHOLD,
                                               steps=steps, seed=3, mask_id=MASK,
                                               bucket_size=L, threshold=thr)
  results = {(thr, steps): run(thr, steps) for thr, steps in ((0.0, L), (1.0, L), (1.0, 5))}
  for res in results.values():
    np.testing.assert_array_equal(res.tokens[prompt.known], prompt.tokens[prompt.known])
    assert not np.any(res.tokens == MASK)
  assert results[0.0, L].passes == 1 and list(results[0.0, L].seq_passes) == [1, 1]
  one = results[1.0, L]
  np.testing.assert_array_equal(one.seq_passes, unknown)
  assert one.passes == unknown.max()
  capped = results[1.0, 5]
  assert capped.passes == 5 and list(capped.seq_passes) == [5, 5]
  # Threshold and cap are not compile-time constants: one program serves every run.
  assert [r.compiles for r in list(results.values())[1:]] == [0, 0]


def _mdlm_threshold_trace(model, params, prompt, *, threshold, steps, seed):
  """The canvases of an MDLM confidence-threshold run, one step at a time."""
  from pgm_jax.samplers import mdlm as mdlm_samplers
  x = jnp.asarray(np.where(prompt.known, prompt.tokens, MASK).astype(np.int32))
  key, canvases = jax.random.key(seed), [np.asarray(x)]
  for k in range(steps):
    if not (canvases[-1] == MASK).any():
      break
    x = mdlm_samplers._mdlm_threshold_step_jit(params, x, key, k, threshold, k + 1 >= steps,
                                               model=model, mask_id=MASK, top_p=1.0,
                                               temperature=1.0)
    canvases.append(np.asarray(x))
  return canvases


@pytest.mark.slow
def test_mdlm_threshold_keeps_known_and_revealed_tokens(mdlm):
  """MDLM confidence-threshold: every step reveals at least one position per unfinished
  sequence and never changes a known or revealed token; the one-program run gives the
  step-by-step canvas and counts its passes."""
  model, params = mdlm
  prompt = _gap_prompt()
  steps = 12
  res = samplers.mdlm_sample(params, prompt, model=model, sampler=THRESHOLD, steps=steps,
                             seed=5, mask_id=MASK, threshold=0.06)
  canvases = _mdlm_threshold_trace(model, params, prompt, threshold=0.06, steps=steps, seed=5)
  np.testing.assert_array_equal(res.tokens, canvases[-1])
  assert res.passes == len(canvases) - 1 <= steps
  np.testing.assert_array_equal(
      res.seq_passes, [sum((c[b] == MASK).any() for c in canvases[:-1]) for b in range(2)])
  for before, after in zip(canvases, canvases[1:]):
    kept = before != MASK
    np.testing.assert_array_equal(after[kept], before[kept])
    for b in range(2):
      if (before[b] == MASK).any():
        assert ((before[b] == MASK) & (after[b] != MASK)).sum() >= 1
  assert any(((b == MASK) & (a != MASK)).sum(1).max() > 1 for b, a in zip(canvases, canvases[1:]))
  np.testing.assert_array_equal(res.tokens[prompt.known], prompt.tokens[prompt.known])
  assert not np.any(res.tokens == MASK)
  # A cap of 2 passes: the second reveals everything left.
  capped = samplers.mdlm_sample(params, prompt, model=model, sampler=THRESHOLD, steps=2,
                                seed=5, mask_id=MASK, threshold=1.0)
  assert capped.passes == 2 and not np.any(capped.tokens == MASK) and capped.compiles == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny,mdlm"])
def test_threshold_config_validation(preset):
  from conftest import load_config
  from pgm_jax import experiment
  config = load_config("shakespeare", preset)
  assert config.sample.threshold == 0.9
  config.sample.sampler = THRESHOLD
  experiment.validate(config)
  for bad in (1.5, -0.1, float("nan"), float("inf")):
    config.sample.threshold = bad
    with pytest.raises(ValueError, match=r"config\.sample\.threshold") as e:
      experiment.validate(config)
    assert "\n" not in str(e.value)
  config.sample.threshold = 0.5
  config.sample.sampler = "bogus"
  with pytest.raises(ValueError, match=f"config.sample.sampler.*'{THRESHOLD}'"):
    experiment.validate(config)
  ar = load_config("shakespeare", "tiny,ar")
  ar.sample.sampler = THRESHOLD
  with pytest.raises(ValueError, match="is not a ar sampler"):
    experiment.validate(ar)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny,mdlm"])
def test_threshold_mode_sample_end_to_end(tmp_path, preset):
  """`--mode=sample --config.sample.sampler=confidence-threshold` from a 1-step checkpoint:
  samples.jsonl records each sequence's passes and the threshold."""
  import json
  import os
  from conftest import REPO_ROOT
  from pgm_jax import main
  workdir = str(tmp_path / "wd")
  common_args = [f"--config={REPO_ROOT}/configs/shakespeare.py:{preset}", f"--workdir={workdir}"]
  main.run(common_args + ["--config.train.num_steps=1", "--config.train.num_final_samples=0",
                          "--config.train.eval_every=1000"])
  main.run(common_args + ["--mode=sample", f"--config.sample.sampler={THRESHOLD}",
                          "--config.sample.threshold=0.5", "--config.sample.num_samples=2",
                          "--config.sample.steps=6", "--config.sample.prompt=ROMEO.[[6]]love"])
  rows = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
  assert len(rows) == 2
  for row in rows:
    assert row["sampler"] == THRESHOLD and row["threshold"] == 0.5 and row["steps"] == 6
    assert 1 <= row["passes"] <= 6
    assert {"text", "tokens", "seed", "index", "prompt", "known", "checkpoint_step"} <= set(row)
