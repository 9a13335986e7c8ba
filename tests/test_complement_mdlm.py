"""Complement-MDLM and time conditioning (the reference's ComplementMDLM, algo.time_conditioning).

The complement loss is checked against a NumPy transcription of the reference's
`ComplementMDLM.nll` (SUBS post-processing in float64, weights from the log-linear
schedule's dalpha / (1 - alpha), `where(xt != x0, nll_orig, nll_complement) / 2`), fed
with the logits of the same tiny network on both views. One tiny MDLM is built per module.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pgm_jax import experiment, objectives, steps
from pgm_jax import sample as generate

EPS = 1e-3
B, L = 3, 16


@pytest.fixture(scope="module")
def mdlm():
  cfg = load_config("shakespeare", "tiny,mdlm")
  cfg.train.objective = "complement-mdlm"
  cfg.data.attend_to_padding = True           # the reference's rule (pads are fed)
  setup = experiment.make_setup(cfg)
  params = experiment.init_state(setup, jax.random.key(0)).params
  # Zero-initialised adaLN / output layers would make every logit 0: randomise them.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return cfg, setup, params


def _batch(vocab, mask_id, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab - 1, (B, L)).astype(np.int32)
  tokens[tokens == mask_id] = 0
  valid = np.ones((B, L), bool)
  valid[1, -5:] = False                        # a padded row
  t = np.array([0.05, 0.5, 0.97], np.float32)
  u = rng.random((B, L)).astype(np.float32)
  return tokens, valid, t, u


def _subs_log_probs(logits, x_t, mask_id):
  """The reference's MDLM._process_model_output_orig in float64."""
  out = np.asarray(logits, np.float64).copy()
  out[..., mask_id] += -1e6
  out = out - out.max(-1, keepdims=True)
  out = out - np.log(np.exp(out).sum(-1, keepdims=True))
  unmasked = x_t != mask_id
  out[unmasked] = -1e6
  b, i = np.nonzero(unmasked)
  out[b, i, x_t[b, i]] = 0.0
  return out


@pytest.mark.slow
def test_complement_loss_matches_numpy_reference(mdlm):
  cfg, setup, params = mdlm
  mask_id = setup.mask_id
  tokens, valid, t, u = _batch(setup.tokenizer.vocab_size, mask_id)
  loss = jax.jit(lambda p, batch, t, u, train: steps.loss_terms(
      p, batch, t, u, jax.random.key(3) if train else None, model=setup.model,
      mask_id=mask_id, train=train, sampling_eps=EPS,
      **steps.objective_options(cfg)), static_argnums=4)
  batch = {"tokens": tokens, "valid": valid}
  terms = loss(params, batch, jnp.asarray(t), jnp.asarray(u), True)

  # NumPy transcription of ComplementMDLM.nll (train_mode) + TrainerBase._loss.
  alpha = lambda s: 1.0 - (1.0 - EPS) * s
  dalpha = -(1.0 - EPS)
  x_t = np.where(u < 1.0 - alpha(t)[:, None], mask_id, tokens)
  x_c = np.where(x_t == tokens, mask_id, tokens)
  assert (x_t != tokens).any() and (x_c != tokens).any()
  apply = jax.jit(lambda x: setup.model.apply({"params": params}, x, None))
  logits = lambda x: np.asarray(apply(jnp.asarray(x)))
  logp_t = _subs_log_probs(logits(x_t), x_t, mask_id)
  logp_c = _subs_log_probs(logits(x_c), x_c, mask_id)
  gather = lambda lp: np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  nll_orig = dalpha / (1.0 - alpha(t))[:, None] * gather(logp_t)
  nll_comp = dalpha / (1.0 - alpha(1.0 - t))[:, None] * gather(logp_c)
  nll_full = np.where(x_t != tokens, nll_orig, nll_comp) / 2.0
  want_loss = (nll_full * valid).sum() / valid.sum()
  got_loss = float(terms.loss_sum) / float(terms.num_tokens)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert float(terms.num_tokens) == valid.sum()
  # The reported NLL is MDLM's estimator on x_t alone.
  want_nll = (np.where(x_t != tokens, nll_orig, 0.0) * valid).sum() / valid.sum()
  np.testing.assert_allclose(float(terms.nll_sum) / float(terms.num_tokens), want_nll,
                             rtol=1e-5)
  # Eval (train=False) scores the model as the MDLM it is: no complement view.
  ev = loss(params, batch, jnp.asarray(t), jnp.asarray(u), False)
  np.testing.assert_allclose(float(ev.loss_sum), float(terms.nll_sum), rtol=1e-5)


def test_complement_presets_and_validation():
  for name in ("lm1b", "owt"):
    cfg = load_config(name, "mdlm_complement")
    assert cfg.model.kind == "mdlm" and cfg.train.objective == "complement-mdlm"
  cfg = load_config("shakespeare", "tiny")
  cfg.train.objective = "complement-mdlm"       # a PGM
  with pytest.raises(ValueError, match="config.train.objective=complement-mdlm"):
    experiment.make_setup(cfg)
  cfg.model.kind = "mdlm"
  cfg.train.objective = "complement"
  with pytest.raises(ValueError, match="config.train.objective must be"):
    experiment.make_setup(cfg)


@pytest.mark.slow
def test_time_conditioning(mdlm):
  _, _, params = mdlm            # the same parameters: sigma_map exists either way
  tc = load_config("shakespeare", "tiny,mdlm")
  tc.model.time_conditioning = True
  setup = experiment.make_setup(tc)
  x = jnp.zeros((2, 8), jnp.int32)
  apply = jax.jit(lambda sigma: setup.model.apply({"params": params}, x, sigma_B=sigma))
  a, b = apply(jnp.array([0.1, 0.1])), apply(jnp.array([2.0, 2.0]))
  assert float(jnp.abs(a - b).max()) > 1e-3           # sigma is read...
  with pytest.raises(ValueError, match="needs sigma_B"):
    apply(None)                                        # ...and required
  # Without time conditioning the same sigma is ignored (sigma = 0, the released configs).
  off = experiment.make_setup(load_config("shakespeare", "tiny,mdlm"))
  f = jax.jit(lambda s: off.model.apply({"params": params}, x, sigma_B=s))
  np.testing.assert_array_equal(f(jnp.array([0.1, 0.1])), f(jnp.array([2.0, 2.0])))
  # Training and sampling feed sigma(t) = -log alpha(t).
  np.testing.assert_allclose(objectives.sigma(jnp.float32(0.5)), -np.log(1 - 0.999 * 0.5),
                             rtol=1e-6)
  samples = generate.generate_samples(setup, params, num_samples=1, num_steps=2, seed=0)
  assert len(samples[0]["tokens"]) == tc.data.seq_len
  # Only an MDLM can be time conditioned (the reference asserts it for PGM and AR).
  bad = load_config("shakespeare", "tiny")
  bad.model.time_conditioning = True
  with pytest.raises(ValueError, match="config.model.time_conditioning"):
    experiment.make_setup(bad)
