"""The MDLM diffusion transformer (`DIT` in kuleshov-group/mdlm), the MDLM baseline.

Parameter tree (Flax) <-> reference state dict:
  vocab_embed/embedding            <- vocab_embed.embedding
  sigma_map/mlp_{0,2}/{kernel,bias} <- sigma_map.mlp.{0,2}.{weight,bias}
  blocks_{i}/...                   <- blocks.{i}.... (see DiTBlock)
  output_layer/...                 <- output_layer....
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgm_jax.ops.logits import NEG_INF_MDLM
from pgm_jax.models.layers import (DiTBlock, FinalLayer, ModelConfig, VocabEmbedding,
                                   conditioning, maybe_remat)
from pgm_jax.ops import AttentionMask


class DiT(nn.Module):
  """Bidirectional transformer over the full (partially masked) sequence (MDLM), or,
  with config.causal, the same network with causal attention (the AR baseline)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, valid_BxL: Optional[jax.Array] = None, *,
               train: bool = False, causal: bool = False, decode: bool = False,
               positions_BxL: Optional[jax.Array] = None,
               targets_BxL: Optional[jax.Array] = None,
               mask_logit: float = NEG_INF_MDLM,
               sigma_B: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits [B, L, V] (no SUBS; see objectives).

    causal (or config.causal): position i attends to positions <= i. decode: one token per
    call against the "cache" collection (see DiTBlock); positions_BxL then gives the
    token's position. targets_BxL: return float32 log p(targets) [B, L] instead (with
    logit[MASK] = mask_logit), without materialising the logits (`FinalLayer`).
    sigma_B: -log alpha(t) per sequence; read only with config.time_conditioning
    (otherwise the conditioning is sigma = 0, as in every released config).
    """
    cfg = self.config
    batch, length = tokens_BxL.shape
    x_BxLxH = VocabEmbedding(cfg.vocab_size, cfg.hidden, name="vocab_embed")(tokens_BxL)
    x_BxLxH = cfg.constrain(x_BxLxH)
    cond_BxC = conditioning(cfg, batch, sigma_B)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    causal = causal or cfg.causal
    mask = AttentionMask(kind="causal" if causal else "full", kv_valid=valid_BxL)
    # Rematerialise only where there is a backward pass (training); `decode` mutates
    # the cache collection and never needs it.
    block_cls = maybe_remat(DiTBlock, cfg, static_argnums=(5, 6)) if train else DiTBlock
    for i in range(cfg.num_layers):
      x_BxLxH = block_cls(cfg, name=f"blocks_{i}")(x_BxLxH, cond_BxC, positions_BxL, mask,
                                                  train, decode)
    return FinalLayer(cfg, name="output_layer")(x_BxLxH, cond_BxC, targets_BxL, mask_logit)
