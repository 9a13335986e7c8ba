"""The block PGM (`pgm_block`): b = L is the PGM, no information reaches a block's prediction
from its own clean stream, its own group or a later block, the cached sampler equals the
full recomputation token for token, and it stops at EOS."""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_jax import families, objectives
from pgm_jax.families import pgm_block as block_family
from pgm_jax.models.layers import ModelConfig
from pgm_jax.models.pgm import PartitionDiT
from pgm_jax.models.pgm_block import BlockPartitionDiT
from pgm_jax.samplers import pgm_block as block_samplers
from pgm_jax.samplers.common import Prompt, unconditional_prompt

V, L = 37, 16
MASK = V - 1


def _cfg(block_len, **kw):
  base = dict(kind="pgm_block", vocab_size=V, mask_id=MASK, hidden=32, num_heads=2,
              cond_dim=16, enc_layers=2, dec_layers=2, dropout=0.0, dtype="float32",
              block_len=block_len)
  base.update(kw)
  return ModelConfig(**base)


@pytest.fixture(scope="module")
def pgm_params():
  model = PartitionDiT(dataclasses.replace(_cfg(L), kind="pgm"))
  tokens = jnp.zeros((1, L), jnp.int32)
  params = families.get("pgm").init_params(model, jax.random.key(0), 1, L)
  # Non-zero output layer (it is zero-initialised), so that logits depend on the inputs.
  return jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape),
                      params)


def _batch(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MASK, size=(batch, L)).astype(np.int32)
  group = rng.integers(0, 2, size=(batch, L)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(group)


def test_parameter_tree_is_the_pgm_one(pgm_params):
  params = families.get("pgm_block").init_params(BlockPartitionDiT(_cfg(4)), jax.random.key(0),
                                                  1, L)
  shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
  assert shapes(params) == shapes(pgm_params)


def test_one_block_is_exactly_the_pgm(pgm_params):
  """b = L: same logits and same loss as the PGM (same params, partition and t)."""
  tokens, group = _batch()
  pgm = PartitionDiT(dataclasses.replace(_cfg(L), kind="pgm"))
  block = BlockPartitionDiT(_cfg(L))
  want = pgm.apply({"params": pgm_params}, tokens, group, sorted_layout=False)
  got = block.apply({"params": pgm_params}, tokens, group)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
  # The loss through both families, same rng, same noise: t and groups identical.
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      model=dict(block_len=L), data=dict(seq_len=L),
      train=dict(sampling_eps=1e-3, antithetic=True)))
  rng = jax.random.key(3)
  t_pgm, _ = families.get("pgm").train_times(rng, {"tokens": tokens}, config)
  t_blk, _ = families.get("pgm_block").train_times(rng, {"tokens": tokens}, config)
  np.testing.assert_array_equal(np.asarray(t_blk[:, 0]), np.asarray(t_pgm))
  u = jax.random.uniform(jax.random.key(4), tokens.shape)
  kw = dict(rngs={}, mask_id=MASK, train=False, sampling_eps=1e-3)
  terms_pgm = families.get("pgm").loss_terms(pgm_params, {"tokens": tokens}, t_pgm, u, model=pgm,
                                             **kw)
  terms_blk = families.get("pgm_block").loss_terms(pgm_params, {"tokens": tokens}, t_blk, u,
                                                   model=block, **kw)
  for a, b in zip(terms_blk, terms_pgm):
    np.testing.assert_allclose(float(a), float(b), rtol=2e-6)


@pytest.mark.parametrize("block_len", [pytest.param(1, marks=pytest.mark.slow), 4, 8])
def test_no_information_from_own_group_own_clean_block_or_later_blocks(pgm_params, block_len):
  """d logit(i) / d embedding(j) is exactly 0 unless j is in the other group of i's block
  (partition stream) or in an earlier block (clean stream); and non-zero for some such j."""
  model = BlockPartitionDiT(_cfg(block_len))
  tokens, group = _batch(seed=block_len, batch=1)

  def logits(offsets_part, offsets_clean):
    """Logits with per-position offsets added to each stream's input embeddings."""
    def add_offsets(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if type(context.module).__name__ == "VocabEmbedding":
        out = out + jnp.concatenate([offsets_part, offsets_clean], axis=1)
      return out
    with flax.linen.intercept_methods(add_offsets):
      return model.apply({"params": pgm_params}, tokens, group)

  zeros = jnp.zeros((1, L, 32))
  # Jacobians of every position's summed logits w.r.t. both streams' offsets: [L, 1, L, H].
  jac_part, jac_clean = jax.jacrev(lambda a, c: logits(a, c)[0].sum(-1), argnums=(0, 1))(
      zeros, zeros)
  for i in range(L):
    reach_part = np.abs(np.asarray(jac_part[i, 0])).sum(-1) > 0
    reach_clean = np.abs(np.asarray(jac_clean[i, 0])).sum(-1) > 0
    blk = np.arange(L) // block_len
    allowed_part = (blk == blk[i]) & (np.asarray(group[0]) != int(group[0, i]))
    allowed_clean = blk < blk[i]
    assert not (reach_part & ~allowed_part).any(), (i, np.flatnonzero(reach_part & ~allowed_part))
    assert not (reach_clean & ~allowed_clean).any(), (i, np.flatnonzero(reach_clean))
    if allowed_clean.any():
      assert reach_clean[allowed_clean].any()
    if allowed_part.any():
      assert reach_part[allowed_part].any()


def _prompt_with_infill(batch, length, bos):
  prompt = unconditional_prompt(batch, length, bos)
  tokens, known = prompt.tokens.copy(), prompt.known.copy()
  tokens[0, 1:3], known[0, 1:3] = [5, 6], True          # a prefix inside block 0
  tokens[1, 9], known[1, 9] = 7, True                    # a known token in a later block
  tokens[2, 4:12], known[2, 4:12] = 8, True              # a whole known block (b = 4)
  return Prompt(tokens, known)


@pytest.mark.parametrize("block_len,steps", [(4, 8), pytest.param(16, 4, marks=pytest.mark.slow),
                                             pytest.param(1, 16, marks=pytest.mark.slow)])
def test_cached_sampler_equals_full_recomputation(pgm_params, block_len, steps):
  model = BlockPartitionDiT(_cfg(block_len))
  prompt = _prompt_with_infill(3, L, bos=0)
  kw = dict(model=model, steps=steps, seed=5, mask_id=MASK, top_p=1.0, temperature=1.0,
            bucket_size=8)
  cached = block_samplers.block_sample(pgm_params, prompt, sampler="block-efficient", **kw)
  naive = block_samplers.block_sample(pgm_params, prompt, sampler="block-naive", **kw)
  np.testing.assert_array_equal(cached.tokens, naive.tokens)
  assert (cached.tokens != MASK).all()
  np.testing.assert_array_equal(cached.tokens[prompt.known], prompt.tokens[prompt.known])
  assert cached.passes == naive.passes


@pytest.mark.parametrize("threshold", [pytest.param(0.0, marks=pytest.mark.slow), 0.05,
                                       pytest.param(1.0, marks=pytest.mark.slow)])
def test_confidence_threshold_cached_equals_full_recomputation(pgm_params, threshold):
  """confidence-threshold inside each block: cached == naive token for token; threshold 0
  takes one pass per block, 1.0 one reveal per step (capped by the block's step budget)."""
  model = BlockPartitionDiT(_cfg(4))
  prompt = _prompt_with_infill(3, L, bos=0)
  kw = dict(model=model, sampler="confidence-threshold", steps=8, seed=2, mask_id=MASK,
            bucket_size=8, threshold=threshold)
  cached = block_samplers.block_sample(pgm_params, prompt, **kw)
  naive = block_samplers.block_sample(pgm_params, prompt, execution="naive", **kw)
  np.testing.assert_array_equal(cached.tokens, naive.tokens)
  np.testing.assert_array_equal(cached.seq_passes, naive.seq_passes)
  assert (cached.tokens != MASK).all()
  np.testing.assert_array_equal(cached.tokens[prompt.known], prompt.tokens[prompt.known])
  unknown = (~prompt.known).reshape(3, 4, 4).sum(-1)  # [row, block]
  if threshold == 0.0:  # one pass per block with something to fill
    np.testing.assert_array_equal(cached.seq_passes, (unknown > 0).sum(1))
  if threshold == 1.0:  # 2 steps per block (8 steps / 4 blocks): 1 reveal, then the rest
    np.testing.assert_array_equal(cached.seq_passes, np.minimum(unknown, 2).sum(1))


def test_generation_stops_at_the_first_block_holding_eos(pgm_params):
  """A model that puts all its mass on EOS after block 0: every sample is cut there, and
  the run stops after block 1 instead of running all blocks."""
  eos = 3
  params = pgm_params
  bias = params["output_layer"]["linear"]["bias"]
  params = dict(params, output_layer=dict(params["output_layer"],
                                          linear=dict(params["output_layer"]["linear"],
                                                      bias=bias.at[eos].set(1e4))))
  model = BlockPartitionDiT(_cfg(4))
  prompt = unconditional_prompt(2, L, 0)
  prompt.tokens[:, 1:4], prompt.known[:, 1:4] = 9, True   # block 0 known, no EOS
  result = block_samplers.block_sample(params, prompt, model=model, sampler="block-efficient",
                                       steps=8, seed=0, mask_id=MASK, eos_id=eos)
  np.testing.assert_array_equal(result.lengths, [5, 5])   # BOS 9 9 9 EOS
  assert result.passes == 2                                # block 1 only (2 steps per block)
  np.testing.assert_array_equal(result.tokens[:, 4], [eos, eos])


def test_block_times_are_stratified_per_block():
  t = block_family.block_times(jax.random.key(0), 8, 3, groups=1, sampling_eps=1e-3,
                               antithetic=True)
  assert t.shape == (8, 3)
  for j in range(3):
    u = (np.sort(np.asarray(t[:, j])) - 1e-3) / (1 - 1e-3)
    assert ((u >= np.arange(8) / 8 - 1e-6) & (u < np.arange(1, 9) / 8 + 1e-6)).all()
  assert not np.allclose(np.asarray(t[:, 0]), np.asarray(t[:, 1]))


def test_position_times_repeat_each_block():
  t = jnp.asarray([[0.1, 0.9]])
  np.testing.assert_allclose(np.asarray(block_family.position_times(t, 4)),
                             [[0.1, 0.1, 0.9, 0.9]])
  loss = objectives.pgm_loss_terms_from_log_probs(-jnp.ones((1, 4)), jnp.asarray([[1, 0, 1, 0]]),
                                                  block_family.position_times(t, 4),
                                                  jnp.ones((1, 4), bool))
  np.testing.assert_allclose(float(loss.nll_sum), 1 / 0.1 + 1 / 0.9, rtol=1e-6)
