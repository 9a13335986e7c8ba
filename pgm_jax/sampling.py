"""Full-length ("naive") samplers for PGM and MDLM, compiled as one program each.

Both run a `lax.fori_loop` over a fixed number of steps at the full sequence length,
so a sampling run compiles exactly once. The PGM sampler here is the reference's
`naive` mode in the any-order form: a random order of positions 1..L-1 per sequence,
with ceil((k+1)(L-1)/S) positions revealed after step k; revealed tokens are group 0,
the rest group 1, and group-1 predictions read only group 0, so it produces exactly
what an efficient sampler that encodes only the revealed tokens would.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pgm_jax import objectives


def gumbel_sample(rng, log_probs, temperature: float = 1.0):
  """Categorical sample along the last axis (Gumbel-max); -inf entries are never drawn."""
  if temperature <= 0:
    return jnp.argmax(log_probs, axis=-1)
  g = jax.random.gumbel(rng, log_probs.shape, jnp.float32)
  return jnp.argmax(log_probs.astype(jnp.float32) / temperature + g, axis=-1)


def random_order_ranks(rng, batch: int, length: int):
  """rank[b, p] in [0, L-2]: the step order of position p >= 1 (position 0 is BOS)."""
  keys = jax.random.uniform(rng, (batch, length - 1))
  perm = jnp.argsort(keys, axis=-1)                  # perm[b, r] = position-1 at rank r
  ranks = jnp.argsort(perm, axis=-1)                 # inverse permutation
  return jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), ranks.astype(jnp.int32)], 1)


def pgm_sample(params, rng, *, model, batch: int, length: int, steps: int, bos_id: int,
               mask_id: int, temperature: float = 1.0):
  """PGM any-order sampling in the training layout. Returns int32 tokens [B, L]."""
  order_rng, sample_rng = jax.random.split(rng)
  ranks_BxL = random_order_ranks(order_rng, batch, length)
  tokens = jnp.full((batch, length), mask_id, jnp.int32).at[:, 0].set(bos_id)

  def body(k, tokens):
    revealed = tokens != mask_id
    target = -(-(k + 1) * (length - 1) // steps)      # ceil((k+1)(L-1)/S)
    reveal_now = (ranks_BxL < target) & ~revealed
    group = (~revealed).astype(jnp.int32)
    logits = model.apply({"params": params}, tokens, group, train=False)
    logp = jax.nn.log_softmax(logits.at[..., mask_id].set(-jnp.inf), axis=-1)
    draw = gumbel_sample(jax.random.fold_in(sample_rng, k), logp, temperature)
    return jnp.where(reveal_now, draw.astype(jnp.int32), tokens)

  return jax.lax.fori_loop(0, steps, body, tokens)


def mdlm_sample(params, rng, *, model, batch: int, length: int, steps: int, bos_id: int,
                mask_id: int, eps: float = 1e-5, temperature: float = 1.0):
  """MDLM ancestral sampling (`ddpm`) with a final reveal step. Returns int32 [B, L]."""
  tokens = jnp.full((batch, length), mask_id, jnp.int32).at[:, 0].set(bos_id)
  timesteps = jnp.linspace(1.0, eps, steps + 1)

  def denoise(tokens, k):
    logits = model.apply({"params": params}, tokens, train=False)
    logp = objectives.subs_log_probs(logits, tokens, mask_id)
    return gumbel_sample(jax.random.fold_in(rng, 2 * k), logp, temperature).astype(jnp.int32)

  def body(k, tokens):
    t, s = timesteps[k], timesteps[k + 1]
    a_t, a_s = objectives.alpha(t), objectives.alpha(s)
    reveal_prob = (a_s - a_t) / (1.0 - a_t)
    x0 = denoise(tokens, k)
    u = jax.random.uniform(jax.random.fold_in(rng, 2 * k + 1), tokens.shape)
    reveal = (tokens == mask_id) & (u < reveal_prob)
    return jnp.where(reveal, x0, tokens)

  tokens = jax.lax.fori_loop(0, steps, body, tokens)
  final = denoise(tokens, steps)
  return jnp.where(tokens == mask_id, final, tokens)
