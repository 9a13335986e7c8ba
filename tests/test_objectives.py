"""Objectives against direct NumPy computations of the formulas of docs/method.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_jax import objectives

MASK = 5


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _case(seed=0, b=3, l=7, v=6):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, l, v)).astype(np.float32)
  tokens = rng.integers(0, MASK, (b, l))              # never MASK
  group = rng.integers(0, 2, (b, l))
  t = np.array([0.2, 0.55, 0.9], np.float32)[:b]
  valid = np.ones((b, l), bool)
  valid[1, -2:] = False
  return logits, tokens, group, t, valid


def test_pgm_loss_matches_numpy():
  logits, tokens, group, t, valid = _case()
  terms = objectives.pgm_loss_terms(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(group),
                                    jnp.asarray(t), jnp.asarray(valid), MASK)
  masked = logits.astype(np.float64).copy()
  masked[..., MASK] = -np.inf
  logp = _log_softmax(masked)
  loss, nll = 0.0, 0.0
  for b in range(logits.shape[0]):
    for i in range(logits.shape[1]):
      if not valid[b, i]:
        continue
      ce = -logp[b, i, tokens[b, i]]
      if group[b, i] == 1:
        loss += ce / t[b]
        nll += ce / t[b]
      else:
        loss += ce / (1 - t[b])
  n = valid.sum()
  np.testing.assert_allclose(float(terms.loss_sum) / float(terms.num_tokens), loss / 2 / n,
                             rtol=1e-5)
  np.testing.assert_allclose(float(terms.nll_sum) / float(terms.num_tokens), nll / n, rtol=1e-5)
  assert float(terms.num_tokens) == n


def test_mdlm_loss_matches_numpy():
  logits, tokens, is_masked, t, valid = _case(1)
  terms = objectives.mdlm_loss_terms(jnp.asarray(logits), jnp.asarray(tokens),
                                     jnp.asarray(is_masked.astype(bool)), jnp.asarray(t),
                                     jnp.asarray(valid), MASK)
  sub = logits.astype(np.float64).copy()
  sub[..., MASK] = -1e6
  logp = _log_softmax(sub)
  total = sum(-logp[b, i, tokens[b, i]] / t[b]
              for b in range(3) for i in range(7) if valid[b, i] and is_masked[b, i])
  np.testing.assert_allclose(float(terms.nll_sum), total, rtol=1e-5)
  np.testing.assert_allclose(float(terms.loss_sum), total, rtol=1e-5)


def test_subs_carry_over():
  logits, tokens, _, _, _ = _case(2)
  x_t = tokens.copy()
  x_t[:, ::2] = MASK
  logp = np.asarray(objectives.subs_log_probs(jnp.asarray(logits), jnp.asarray(x_t), MASK))
  unmasked = x_t != MASK
  # Unmasked positions: all mass on the observed token.
  np.testing.assert_array_equal(np.take_along_axis(logp, x_t[..., None], -1)[unmasked], 0.0)
  # Masked positions: MASK is never predicted and the rest is normalised.
  assert np.all(np.exp(logp[~unmasked][:, MASK]) < 1e-30)
  np.testing.assert_allclose(np.exp(logp[~unmasked]).sum(-1), 1.0, rtol=1e-5)


def test_antithetic_times_are_stratified():
  n = 64
  t = np.asarray(objectives.sample_times(jax.random.key(0), n, sampling_eps=1e-3))
  u = (t - 1e-3) / (1 - 1e-3)
  # Exactly one u in each stratum [i/n, (i+1)/n).
  np.testing.assert_array_equal(np.sort(np.floor(u * n)), np.arange(n))
  assert t.min() >= 1e-3 and t.max() <= 1.0


def test_group_rate_follows_schedule():
  t = jnp.full((4000,), 0.3)
  g = np.asarray(objectives.sample_groups(jax.random.key(1), t, 50))
  assert abs(g.mean() - (1 - 1e-3) * 0.3) < 0.01


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_mdlm_noise_rate(t):
  tokens = jnp.zeros((2000, 64), jnp.int32)
  x_t, is_masked = objectives.mdlm_noise(jax.random.key(2), tokens, jnp.full((2000,), t), MASK)
  assert np.array_equal(np.asarray(x_t) == MASK, np.asarray(is_masked))
  assert abs(float(is_masked.mean()) - (1 - 1e-3) * t) < 0.01
