"""Noise schedule, time sampling and the MDLM / PGM objectives (method §1-2).

All functions are pure and jit-friendly. Conventions:
  * t in (0, 1]; alpha(t) = 1 - (1 - eps) t (log-linear schedule, eps = 1e-3);
    a token is masked with probability 1 - alpha(t) = (1 - eps) t.
  * ELBO weight -alpha'(t) / (1 - alpha(t)) = 1 / t.
  * Losses return sums and counts, so that callers can average over a batch,
    over accumulation steps, or over a whole validation set exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pgm_jax.ops.logits import NEG_INF_MDLM, token_log_probs



def alpha(t, eps: float = 1e-3):
  return 1.0 - (1.0 - eps) * t


def sigma(t, eps: float = 1e-3):
  """-log alpha(t): the time-conditioning input (`_sigma_from_alphat` in the reference)."""
  return -jnp.log1p(-(1.0 - eps) * t)


def mask_prob(t, eps: float = 1e-3):
  """Probability that a token is masked (in group 1) at time t."""
  return 1.0 - alpha(t, eps)


def sample_times(rng, n: int, *, sampling_eps: float = 1e-3, antithetic: bool = True):
  """t_i = (1 - eps) u_i + eps with u_i = (U_i / n + i / n) mod 1 (stratified over n)."""
  u = jax.random.uniform(rng, (n,), jnp.float32)
  if antithetic:
    u = (u / n + jnp.arange(n, dtype=jnp.float32) / n) % 1.0
  return (1.0 - sampling_eps) * u + sampling_eps


def groups_from_uniform(u_BxL, t_B, eps: float = 1e-3):
  """g_i = [u_i < 1 - alpha(t)]: 1 = masked group. int32 [B, L]."""
  return (u_BxL < mask_prob(t_B, eps)[:, None]).astype(jnp.int32)


def sample_groups(rng, t_B, length: int, eps: float = 1e-3):
  """g_i ~ Bernoulli(1 - alpha(t)) iid per token; 1 = masked group. int32 [B, L]."""
  return groups_from_uniform(jax.random.uniform(rng, (t_B.shape[0], length)), t_B, eps)


class LossTerms(NamedTuple):
  """Sums over a batch. loss = loss_sum / num_tokens; nll = nll_sum / num_tokens."""
  loss_sum: jax.Array     # training objective numerator
  nll_sum: jax.Array      # ELBO numerator (the validation NLL estimator)
  num_tokens: jax.Array   # number of valid tokens


def pgm_loss_terms(logits_BxLxV, tokens_BxL, group_BxL, t_B, valid_BxL, mask_id: int):
  """PGM complement objective.

  Group-1 tokens get the MDLM weight at t (1/t); group-0 tokens are "masked at
  the complement time" 1 - t (weight 1/(1-t)); the training loss halves the sum
  (two ELBO estimates per sequence). The NLL (eval) counts group-1 tokens only,
  which is exactly MDLM's estimator, so perplexities are comparable.
  """
  logp_BxL = token_log_probs(logits_BxLxV, tokens_BxL, mask_id, mask_logit=-jnp.inf)
  return pgm_loss_terms_from_log_probs(logp_BxL, group_BxL, t_B, valid_BxL)


def pgm_loss_terms_from_log_probs(logp_BxL, group_BxL, t_B, valid_BxL):
  """`pgm_loss_terms` from log p(x0_i) [B, L] (the model's chunked output path). `t_B` may
  also be a time per position [B, L] (the block PGM: each block at its own t)."""
  nll_BxL = -logp_BxL
  valid = valid_BxL.astype(jnp.float32)
  in_group1 = group_BxL.astype(bool)
  t_Bx1 = t_B[:, None] if t_B.ndim == 1 else t_B
  weight_BxL = jnp.where(in_group1, 1.0 / t_Bx1, 1.0 / (1.0 - t_Bx1))
  # `where` (not a product) so that an infinite NLL of the other group can't leak NaNs.
  loss_sum = jnp.sum(jnp.where(valid > 0, weight_BxL * nll_BxL, 0.0)) / 2.0
  nll_sum = jnp.sum(jnp.where(in_group1 & (valid > 0), nll_BxL / t_Bx1, 0.0))
  return LossTerms(loss_sum, nll_sum, valid.sum())


def mdlm_noise(rng, tokens_BxL, t_B, mask_id: int, eps: float = 1e-3):
  """Forward process: each token becomes MASK w.p. 1 - alpha(t). Returns (x_t, is_masked)."""
  is_masked = sample_groups(rng, t_B, tokens_BxL.shape[1], eps).astype(bool)
  return jnp.where(is_masked, mask_id, tokens_BxL), is_masked


def mdlm_loss_terms(logits_BxLxV, tokens_BxL, is_masked_BxL, t_B, valid_BxL, mask_id: int):
  """MDLM SUBS objective: (1/t) (-log p(x0)) at masked positions; 0 (carry-over) elsewhere."""
  logp_BxL = token_log_probs(logits_BxLxV, tokens_BxL, mask_id, mask_logit=NEG_INF_MDLM)
  return mdlm_loss_terms_from_log_probs(logp_BxL, is_masked_BxL, t_B, valid_BxL)


def mdlm_loss_terms_from_log_probs(logp_BxL, is_masked_BxL, t_B, valid_BxL):
  """`mdlm_loss_terms` from log p(x0_i | x_t) [B, L] at logit[MASK] = -1e6. The
  carry-over of SUBS makes unmasked positions contribute 0, so only masked ones count."""
  nll_BxL = -logp_BxL
  counted = is_masked_BxL & valid_BxL.astype(bool)
  nll_sum = jnp.sum(jnp.where(counted, nll_BxL / t_B[:, None], 0.0))
  return LossTerms(nll_sum, nll_sum, valid_BxL.astype(jnp.float32).sum())


def complement_mdlm_views(tokens_BxL, is_masked_BxL, mask_id: int):
  """Complement-MDLM inputs: x_t (MASK where `is_masked`) and its complement (MASK where
  x_t is clean), stacked as [2B, L] (the reference's `torch.cat([xt, xt_complement])`)."""
  x_t = jnp.where(is_masked_BxL, mask_id, tokens_BxL)
  x_c = jnp.where(is_masked_BxL, tokens_BxL, mask_id)
  return jnp.concatenate([x_t, x_c], axis=0)


def complement_mdlm_loss_terms_from_log_probs(logp_2BxL, is_masked_BxL, t_B, valid_BxL):
  """Complement-MDLM (the reference's `ComplementMDLM`, method §2).

  logp_2BxL: SUBS log p(x0_i | view) of the two views of `complement_mdlm_views`. A
  position masked in x_t (time t) takes its NLL from x_t with the MDLM weight 1/t; every
  other position is masked in the complement (time 1 - t) and takes its NLL from there,
  with weight 1/(1 - t). The training loss halves the sum (two ELBO estimates per
  sequence); the NLL counts the x_t view only, which is MDLM's estimator (the reference
  evaluates a complement-MDLM checkpoint as an MDLM).
  """
  batch = t_B.shape[0]
  nll_t, nll_c = -logp_2BxL[:batch], -logp_2BxL[batch:]
  t_Bx1 = t_B[:, None]
  valid = valid_BxL.astype(bool)
  per_token = jnp.where(is_masked_BxL, nll_t / t_Bx1, nll_c / (1.0 - t_Bx1))
  loss_sum = jnp.sum(jnp.where(valid, per_token, 0.0)) / 2.0
  nll_sum = jnp.sum(jnp.where(is_masked_BxL & valid, nll_t / t_Bx1, 0.0))
  return LossTerms(loss_sum, nll_sum, valid.astype(jnp.float32).sum())


def subs_log_probs(logits_BxLxV, x_t_BxL, mask_id: int):
  """MDLM SUBS parameterisation of p(x0 | x_t) (used by the MDLM sampler)."""
  logits = logits_BxLxV.astype(jnp.float32).at[..., mask_id].set(NEG_INF_MDLM)
  logp = jax.nn.log_softmax(logits, axis=-1)
  unmasked = (x_t_BxL != mask_id)[..., None]
  carry = jnp.where(jax.nn.one_hot(x_t_BxL, logits.shape[-1], dtype=bool), 0.0, NEG_INF_MDLM)
  return jnp.where(unmasked, carry, logp)


def ar_loss_terms(logits_BxLxV, tokens_BxL, valid_BxL, mask_id: int):
  """Autoregressive baseline: logits[:, i] predicts tokens[:, i+1] (BOS is not scored).

  MASK is never predicted (logit -inf). A target counts where it is valid.
  """
  logp_BxLm1 = token_log_probs(logits_BxLxV[:, :-1], tokens_BxL[:, 1:], mask_id,
                               mask_logit=-jnp.inf)
  return ar_loss_terms_from_log_probs(logp_BxLm1, valid_BxL)


def next_token_targets(tokens_BxL):
  """Targets of an AR model's positions: tokens[:, i+1] (the last one is never scored)."""
  return jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, -1:]], axis=1)


def ar_loss_terms_from_log_probs(logp_BxLm1, valid_BxL):
  """`ar_loss_terms` from log p(tokens[:, i+1] | tokens[:, :i+1]) [B, L-1]."""
  nll_BxLm1 = -logp_BxLm1
  counted = valid_BxL[:, 1:].astype(bool)
  nll_sum = jnp.sum(jnp.where(counted, nll_BxLm1, 0.0))
  return LossTerms(nll_sum, nll_sum, counted.astype(jnp.float32).sum())


# ----------------------------------------------------------------------------
# Images (method §7): arccos masking, plain cross-entropy, label dropout.
# ----------------------------------------------------------------------------

def arccos_rate(r_B):
  """Share of an image's codes that go to group 1 (are masked) at r ~ U(0, 1):
  arccos(r) / (pi / 2), MaskGIT's arccos schedule."""
  return jnp.arccos(jnp.clip(r_B, 0.0, 1.0)) / (jnp.pi / 2)


def image_groups(u_BxL, r_B):
  """Group 1 (masked) iff u_i < arccos(r)/(pi/2), over [BOS] + codes; BOS (position 0) is
  always in group 0. int32 [B, L]."""
  group = (u_BxL < arccos_rate(r_B)[:, None]).astype(jnp.int32)
  return group.at[:, 0].set(0)


def drop_labels(labels_B, u_B, rate: float, null_class: int):
  """Classifier-free guidance training: each label becomes the null class w.p. `rate`."""
  return jnp.where(u_B < rate, null_class, labels_B).astype(jnp.int32)


def image_loss_terms_from_log_probs(logp_BxN, counted_BxN):
  """Plain mean cross-entropy over the counted positions (no ELBO weight, no 1/2):
  PGM counts every code of both groups, MaskGIT the masked codes."""
  counted = counted_BxN.astype(bool)
  nll_sum = jnp.sum(jnp.where(counted, -logp_BxN, 0.0))
  return LossTerms(nll_sum, nll_sum, counted.astype(jnp.float32).sum())
