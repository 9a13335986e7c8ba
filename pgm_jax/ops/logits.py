"""Log-probabilities of target tokens from logits, with the MASK logit pinned (shared by
every model's output layer and by the objectives).

NEG_INF_MDLM  the reference's `neg_infinity` for SUBS (-1e6: finite, so 0 * it is 0)
"""
import jax
import jax.numpy as jnp

NEG_INF_MDLM = -1e6


def token_log_probs(logits_BxLxV, targets_BxL, mask_id: int, *, mask_logit: float):
  """log p(target) after setting logit[MASK] to `mask_logit`; float32 log-softmax."""
  logits = logits_BxLxV.astype(jnp.float32)
  logits = logits.at[..., mask_id].set(mask_logit)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
