"""The MaskGIT baseline (method §7): Halton-MaskGIT's class-conditional bidirectional
transformer over the code grid, MASK tokens included.

Architecture (the reference's `Transformer`, `image_pretrain/models/transformer.py`):
  x = tok_emb[codes] + pos_emb (learned, one row per code), registers appended AFTER the codes;
  blocks: adaLN from SiLU(class embedding) -> Linear(H, 6H) (zero init) giving
  [shift, scale, gate] for attention and for the MLP; RMSNorm (weight only) pre-norms;
  attention with q/k RMS-normalised over the full width (no parameters), no bias, no RoPE;
  SwiGLU MLP with hidden 256 * ceil(int(2 * mlp_ratio * H / 3) / 256);
  final AdaNorm (RMSNorm with weight and bias, then shift/scale from SiLU(class) -> Linear)
  and an output head tied to tok_emb (plus a bias). Linear layers are Xavier-uniform with zero
  biases, embeddings N(0, 0.02).
It consumes the codes only (no BOS): `tokens[:, 1:]` of a batch. Its vocabulary is the codes
plus MASK (vocab_size = mask_id + 1).

Parameter tree (Flax) <-> the authors' state dict (the `model_state_dict` of their `.ckpt`),
as `python -m pgm_jax.tools.convert` maps it (`io/torch_names.maskgit_torch_name`, the
family's `torch_name`; kernels are the transposed torch Linear weights; docs/convert.md):
  cls_emb/embedding, tok_emb, pos_emb, reg_tokens  <- cls_emb.weight, tok_emb.weight,
                                                      pos_emb.weight, reg_tokens.weight
  transformer/layers_{i}/mlp_1                     <- transformer.layers.{i}.mlp.1
  transformer/layers_{i}/{ln1, ln2}/scale          <- ....ln1.weight, ....ln2.weight
  transformer/layers_{i}/attn/{wq, wk, wv, wo}     <- ....attn.{wq, wk, wv, wo}
  transformer/layers_{i}/ff/{w1, w2, w3}           <- ....ff.{w1, w2, w3}
  last_norm/norm_final/{scale, bias}, last_norm/mlp_1   <- last_norm.norm_final, last_norm.mlp.1
  head_bias                                        <- head.bias
  head.weight is tok_emb.weight (tied): the converter checks that it is and drops it.
Differences: no dropout on the attention probabilities (our attention op has none); the
residual-branch dropouts are kept.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgm_jax.ops.logits import NEG_INF_MDLM
from pgm_jax.models.layers import (ClassEmbedding, Linear, ModelConfig, dense, logical,
                                   maybe_remat, merge_heads, modulate, projected_log_probs,
                                   split_heads)
from pgm_jax.ops import AttentionMask


def swiglu_hidden(mlp_dim: int, multiple_of: int = 256) -> int:
  """The reference's SwiGLU width: int(2 mlp_dim / 3) rounded up to a multiple of 256."""
  h = int(2 * mlp_dim / 3)
  return multiple_of * ((h + multiple_of - 1) // multiple_of)


def rms_normalize(x, eps: float = 1e-5):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """x / rms(x) in float32, times `scale` (and plus `bias`); eps 1e-5."""
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    h = x.shape[-1]
    y = rms_normalize(x) * self.param("scale", logical(nn.initializers.ones_init(), ("embed",)),
                                      (h,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", logical(nn.initializers.zeros_init(), ("embed",)), (h,),
                         jnp.float32)
    return y


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxH, train: bool):
    cfg = self.config
    dt = cfg.compute_dtype
    proj = lambda name, i, o: Linear(cfg.hidden, i, o, use_bias=False, dtype=dt, xavier=True,
                                     name=name)
    q = proj("wq", "embed", "heads_dim")(x_BxNxH)
    k = proj("wk", "embed", "heads_dim")(x_BxNxH)
    v = proj("wv", "embed", "heads_dim")(x_BxNxH)
    # QK-norm over the full width (before splitting heads), no parameters.
    q, k = rms_normalize(q).astype(v.dtype), rms_normalize(k).astype(v.dtype)
    att = cfg.attention(split_heads(q, cfg.num_heads), split_heads(k, cfg.num_heads),
                        split_heads(v, cfg.num_heads), AttentionMask(kind="full"))
    out = proj("wo", "heads_dim", "embed")(merge_heads(att))
    return nn.Dropout(cfg.dropout, deterministic=not train)(out)


class SwiGLU(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxH, train: bool):
    cfg = self.config
    dt = cfg.compute_dtype
    hidden = swiglu_hidden(cfg.mlp_ratio * cfg.hidden)
    w1 = Linear(hidden, "embed", "mlp", use_bias=False, dtype=dt, xavier=True, name="w1")
    w3 = Linear(hidden, "embed", "mlp", use_bias=False, dtype=dt, xavier=True, name="w3")
    h = nn.silu(w1(x_BxNxH)) * w3(x_BxNxH)
    h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
    return Linear(cfg.hidden, "mlp", "embed", use_bias=False, dtype=dt, xavier=True,
                  name="w2")(h)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxH, cond_BxH, train: bool):
    cfg = self.config
    mods = Linear(6 * cfg.hidden, "cond", "adaln", zero_init=True, name="mlp_1")(
        nn.silu(cond_BxH))[:, None, :]
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mods, 6, axis=-1)
    h = Attention(cfg, name="attn")(modulate(RMSNorm(name="ln1")(x_BxNxH), shift1, scale1), train)
    x = x_BxNxH + gate1 * h.astype(jnp.float32)
    h = SwiGLU(cfg, name="ff")(modulate(RMSNorm(name="ln2")(x), shift2, scale2), train)
    return cfg.constrain(x + gate2 * h.astype(jnp.float32))


class Transformer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxH, cond_BxH, *, train: bool):
    # Rematerialise only where there is a backward pass (training).
    block_cls = maybe_remat(Block, self.config, static_argnums=(3,)) if train else Block
    for i in range(self.config.num_layers):
      x_BxNxH = block_cls(self.config, name=f"layers_{i}")(x_BxNxH, cond_BxH, train)
    return x_BxNxH


class AdaNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxH, cond_BxH):
    mods = Linear(2 * self.config.hidden, "cond", "adaln", xavier=True, name="mlp_1")(
        nn.silu(cond_BxH))[:, None, :]
    shift, scale = jnp.split(mods, 2, axis=-1)
    return modulate(RMSNorm(use_bias=True, name="norm_final")(x_BxNxH), shift, scale)


class MaskGIT(nn.Module):
  """Bidirectional class-conditional transformer over MASKed code grids."""
  config: ModelConfig

  @nn.compact
  def __call__(self, codes_BxN: jax.Array, labels_B: jax.Array, *, train: bool = False,
               targets_BxN: Optional[jax.Array] = None,
               mask_logit: float = NEG_INF_MDLM) -> jax.Array:
    """Float32 logits [B, N, V] over the codes (MASK included in the vocabulary), or, with
    `targets_BxN`, float32 log p(targets) [B, N] after logit[MASK] = mask_logit."""
    cfg = self.config
    batch, n = codes_BxN.shape
    if n > cfg.num_positions:
      raise ValueError(f"MaskGIT: {n} codes but config.data.grid^2 = {cfg.num_positions} "
                       "position embeddings")
    normal = nn.initializers.normal(0.02)
    tok_VxH = self.param("tok_emb", logical(normal, ("vocab", "embed")),
                         (cfg.vocab_size, cfg.hidden), jnp.float32)
    pos_PxH = self.param("pos_emb", logical(normal, (None, "embed")),
                         (cfg.num_positions, cfg.hidden), jnp.float32)
    cond_BxH = ClassEmbedding(cfg.num_classes + 1, cfg.hidden, stddev=0.02, name="cls_emb")(
        labels_B)
    x_BxTxH = jnp.take(tok_VxH, codes_BxN, axis=0) + pos_PxH[None, :n]
    if cfg.register:
      reg_RxH = self.param("reg_tokens", logical(normal, (None, "embed")),
                           (cfg.register, cfg.hidden), jnp.float32)
      x_BxTxH = jnp.concatenate(
          [x_BxTxH, jnp.broadcast_to(reg_RxH[None], (batch,) + reg_RxH.shape)], axis=1)
    x_BxTxH = Transformer(cfg, name="transformer")(cfg.constrain(x_BxTxH), cond_BxH, train=train)
    h_BxNxH = AdaNorm(cfg, name="last_norm")(x_BxTxH[:, :n], cond_BxH)
    bias_V = self.param("head_bias", logical(nn.initializers.zeros_init(), ("vocab",)),
                        (cfg.vocab_size,), jnp.float32)
    if targets_BxN is None:
      return dense(h_BxNxH, tok_VxH.T, bias_V, cfg.compute_dtype).astype(jnp.float32)
    return projected_log_probs(cfg, h_BxNxH, tok_VxH.T, bias_V, targets_BxN, mask_logit)

  def canvas_logits(self, canvas_BxL: jax.Array, labels_B: jax.Array) -> jax.Array:
    """The samplers' full-length pass over a canvas ([BOS] + codes, MASK where unknown):
    float32 logits [B, L, V] indexed by token position (MaskGIT never sees BOS: row 0
    repeats row 1, and BOS is never queried)."""
    full_BxNxV = self(canvas_BxL[:, 1:], labels_B)
    return jnp.concatenate([full_BxNxV[:, :1], full_BxNxV], axis=1)
