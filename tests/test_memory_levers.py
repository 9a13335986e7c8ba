"""The memory levers change memory, not the function.

  * `config.model.loss_chunk_len`: log p(target) computed chunk by chunk (never the
    float32 [B, L, V] logits) equals the log-softmax of the full logits;
  * `config.model.remat`: every policy gives the same loss and gradients;
  * the sorted layout permutes targets (not logits) and gives the same log-probs;
  * activation sharding constraints are stated under a mesh and a no-op without one.
Everything is float32 so that the comparisons can be tight.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_jax import objectives, steps
from pgm_jax.core import sharding
from pgm_jax.families import model_config_from
from pgm_jax.models import DiT, ModelConfig, PartitionDiT
from pgm_jax.models.layers import remat_policy

B, L, V = 3, 20, 37
MASK = V - 1
RULES = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None))


def _cfg(kind, **kw):
  base = dict(hidden=32, num_heads=2, cond_dim=16, num_layers=2, enc_layers=2, dec_layers=2,
              dropout=0.0, dtype="float32", logical_axis_rules=RULES)
  base.update(kw)
  return ModelConfig(kind, V, MASK, **base)


def _model(cfg):
  return PartitionDiT(cfg) if cfg.kind == "pgm" else DiT(cfg)


def _params(cfg, seed=0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  args = (tokens, tokens) if cfg.kind == "pgm" else (tokens,)
  params = _model(cfg).init(jax.random.key(seed), *args)["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  # Random values everywhere: the zero-initialised output layer would hide everything.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, V - 1, (B, L)), jnp.int32)
  group = jnp.asarray(rng.integers(0, 2, (B, L)), jnp.int32)
  valid = jnp.asarray(rng.random((B, L)) < 0.9)
  return tokens, group, valid


@pytest.mark.parametrize("kind", ["pgm", "mdlm", "ar"])
@pytest.mark.parametrize("chunk", [6, 10])  # with and without a padded last chunk
@pytest.mark.slow
def test_chunked_target_log_probs_equal_full_logits(kind, chunk):
  tokens, group, valid = _batch()
  cfg = _cfg(kind)
  params = _params(cfg)
  full, chunked = _model(cfg), _model(dataclasses.replace(cfg, loss_chunk_len=chunk))
  args = (tokens, group, valid) if kind == "pgm" else (tokens, valid)
  mask_logit = -jnp.inf if kind != "mdlm" else objectives.NEG_INF_MDLM
  logits = jax.jit(lambda p: full.apply({"params": p}, *args))(params)
  want = objectives.token_log_probs(logits, tokens, MASK, mask_logit=mask_logit)
  got = jax.jit(lambda p: chunked.apply({"params": p}, *args, targets_BxL=tokens,
                                        mask_logit=mask_logit))(params)
  assert got.shape == (B, L)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def _loss_and_grads(cfg, kind):
  tokens, _, valid = _batch(1)
  model = _model(cfg)
  t_B = jnp.asarray([0.2, 0.5, 0.9])
  u = jax.random.uniform(jax.random.key(3), (B, L))

  def loss(p):
    terms = steps.loss_terms(p, {"tokens": tokens, "valid": valid}, t_B, u,
                             jax.random.key(4),
                             model=model, mask_id=MASK, train=True,
                             sampling_eps=1e-3)
    return terms.loss_sum / terms.num_tokens

  return jax.jit(jax.value_and_grad(loss))(_params(cfg))


@functools.lru_cache(maxsize=None)
def _reference(kind):
  """Loss and gradients without remat or chunking (compiled once per kind)."""
  return _loss_and_grads(_cfg(kind), kind)


@pytest.mark.parametrize("kind,remat", [("pgm", "full"),
                                        ("pgm", "dots_with_no_batch_dims_saveable"),
                                        ("mdlm", "dots_with_no_batch_dims_saveable")])
@pytest.mark.slow
def test_remat_and_chunking_keep_loss_and_gradients(kind, remat):
  ref_loss, ref_grads = _reference(kind)
  loss, grads = _loss_and_grads(_cfg(kind, remat=remat, loss_chunk_len=8), kind)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  # Recomputation fuses and orders float32 sums differently: measured max |diff| /
  # max |leaf| is about 3e-5 for remat and 3e-6 for chunking alone; a wrong term would
  # be O(1).
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 2e-4 * max(np.max(np.abs(b)), 1e-6)


@pytest.mark.slow
def test_sorted_layout_permutes_targets_not_logits():
  tokens, group, valid = _batch(2)
  cfg = _cfg("pgm", loss_chunk_len=8)
  params = _params(cfg)
  plain, srt = PartitionDiT(cfg), PartitionDiT(dataclasses.replace(cfg, sorted_layout=True))
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, tokens, group, valid,
                                            targets_BxL=tokens))(params)
  np.testing.assert_allclose(np.asarray(run(srt)), np.asarray(run(plain)), rtol=1e-5,
                             atol=1e-5)
  # ...and no [B, L, V] array is ever built: the largest vocabulary-sized intermediate of
  # the sorted, chunked program is one [B, chunk = 8, V] block.
  jaxpr = jax.make_jaxpr(lambda p: srt.apply({"params": p}, tokens, group, valid,
                                             targets_BxL=tokens))(params)
  vocab_sized = [s for s in _intermediate_shapes(jaxpr.jaxpr) if s and s[-1] == V]
  assert vocab_sized and max(int(np.prod(s)) for s in vocab_sized) <= B * 8 * V


def _intermediate_shapes(jaxpr):
  """Shapes of every value a jaxpr (and its sub-jaxprs) computes."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes += _intermediate_shapes(inner)
  return shapes


def test_unknown_remat_policy_names_the_key():
  with pytest.raises(ValueError, match="config.model.remat"):
    remat_policy("everything_but_the_kitchen_sink")
  assert remat_policy("none") is None
  assert remat_policy("full") is jax.checkpoint_policies.nothing_saveable


def test_model_config_from_carries_the_levers():
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("shakespeare", "tiny")
  config.model.remat = "dots_saveable"
  config.model.loss_chunk_len = 16
  cfg = model_config_from(config, vocab_size=V, mask_id=MASK)
  assert cfg.remat == "dots_saveable" and cfg.loss_chunk_len == 16
  assert dict(cfg.logical_axis_rules)["batch"] == ("data", "fsdp")
  config.model.loss_chunk_len = -1
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="config.model.loss_chunk_len"):
    experiment.validate(config)


def test_activation_constraint_follows_the_rules():
  x = jnp.zeros((8, 4, 6))
  assert sharding.with_logical_constraint(x, ("batch", "length", "act_embed"), RULES) is x
  mesh = jax.sharding.AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"))
  with jax.sharding.use_abstract_mesh(mesh):
    jaxpr = jax.make_jaxpr(lambda y: sharding.with_logical_constraint(
        y, ("batch", "length", "act_embed"), RULES))(x)
  assert "sharding_constraint" in str(jaxpr)
  assert "data" in str(jaxpr) and "fsdp" in str(jaxpr)
