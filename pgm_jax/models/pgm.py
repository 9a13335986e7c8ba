"""PartitionDiT: the Partition Generative Model's network (method §3).

Training layout (`__call__`): every position holds its clean token and a group id.
The encoder attends within a group only; GroupSwap and the decoder let each
position's query read the OTHER group's encoder outputs, so the prediction at a
position never depends on any token of its own group (tested exactly by a gradient
test). Inference layout (`encode` + `decode`): the encoder runs only on the packed
clean tokens and the decoder queries only the positions being revealed.

Parameter tree (Flax) <-> reference state dict (`backbone.` prefix dropped):
  vocab_embed/embedding                      <- vocab_embed.embedding
  sigma_map/mlp_{0,2}                        <- sigma_map.mlp.{0,2}
  encoder/blocks_{i}/...                     <- encoder.blocks.{i}....
  decoder/group_swap/{base_embedding, pre_query_norm, query_processor,
                      hidden_to_key_value, output_linear}
  decoder/layers_{j}/{q_norm1, kv_norm1, norm2, attn_q, attn_kv, attn_out, mlp,
                      adaLN_modulation}
  output_layer/...
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgm_jax.models.layers import (AffineLayerNorm, DiTBlock, FinalLayer, Linear, ModelConfig,
                                   ScaleLayerNorm, TimestepEmbedder, VocabEmbedding, apply_rope,
                                   attention_out_and_mlp, logical, maybe_remat, merge_heads,
                                   modulate, sinusoidal_embedding, split_heads)
from pgm_jax.ops import AttentionMask
from pgm_jax.ops.attention import resolve_sorted_layout
from pgm_jax.ops.partition_layout import partition_view

QUERY_MODES = ("learn", "learn+freqs", "learn+freqs+mean", "learn+freqs+logsumexp")


def other_group_aggregate(enc_BxKxH: jax.Array, mask: AttentionMask, mode: str,
                          num_queries: int) -> jax.Array:
  """Mean or per-feature logsumexp of the encoder outputs each query may read.

  Training ("other_group" mask, groups in {0, 1}): over the keys of the other group.
  Inference ("full" mask): over all valid keys. An empty set gives 0.
  Returns float32 [B, Q, H].
  """
  enc = enc_BxKxH.astype(jnp.float32)
  batch, kv_len, _ = enc.shape
  valid_BxK = (mask.kv_valid if mask.kv_valid is not None
               else jnp.ones((batch, kv_len), dtype=bool))
  if mask.kind == "other_group":
    # Row g of sel_Bx2xK selects the keys a query of group g may read.
    sel_Bx2xK = (mask.kv_group[:, None, :] != jnp.arange(2)[None, :, None]) & valid_BxK[:, None]
  elif mask.kind == "full":
    sel_Bx2xK = valid_BxK[:, None, :]
  else:
    raise ValueError(f"GroupSwap aggregate does not support mask kind {mask.kind!r}")
  count_Bx2x1 = sel_Bx2xK.sum(-1, keepdims=True).astype(jnp.float32)
  sel = sel_Bx2xK[..., None]
  if mode.endswith("+mean"):
    agg_Bx2xH = jnp.where(sel, enc[:, None], 0.0).sum(2) / jnp.maximum(count_Bx2x1, 1.0)
  else:  # logsumexp
    neg_inf = -jnp.inf
    agg_Bx2xH = jax.nn.logsumexp(jnp.where(sel, enc[:, None], neg_inf), axis=2)
    agg_Bx2xH = jnp.where(count_Bx2x1 > 0, agg_Bx2xH, 0.0)
  if mask.kind == "other_group":
    return jnp.take_along_axis(agg_Bx2xH, mask.q_group[..., None].astype(jnp.int32), axis=1)
  return jnp.broadcast_to(agg_Bx2xH, (batch, num_queries, agg_Bx2xH.shape[-1]))


def _rope_heads_kv(cfg, kv_BxKx2H, kv_pos_BxK):
  """[k | v] projections -> (k with RoPE, v), each [B, K, heads, head_dim]."""
  k, v = jnp.split(kv_BxKx2H, 2, axis=-1)
  return (apply_rope(split_heads(k, cfg.num_heads), kv_pos_BxK, cfg.rope_base),
          split_heads(v, cfg.num_heads))


def _with_prefix(kv_prefix, k, v):
  """(k, v) with cached keys / values put first (None: unchanged)."""
  if kv_prefix is None:
    return k, v
  return (jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1),
          jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1))


class GroupSwap(nn.Module):
  """Builds each query from its position alone, then cross-attends to the encoder."""
  config: ModelConfig

  @nn.compact
  def __call__(self, enc_BxKxH, kv_pos_BxK, query_pos_BxQ, mask: AttentionMask, *,
               kv_prefix=None, kv_only: bool = False):
    """kv_only: return the (k, v) of `enc_BxKxH` only (what a KV cache holds);
    kv_prefix: cached (k, v) put before them (`mask` covers both)."""
    cfg = self.config
    dt = cfg.compute_dtype
    k, v = _rope_heads_kv(cfg, Linear(2 * cfg.hidden, "embed", "kv", dtype=dt,
                                      name="hidden_to_key_value")(enc_BxKxH), kv_pos_BxK)
    if kv_only:
      return k, v
    k, v = _with_prefix(kv_prefix, k, v)
    if cfg.query_mode not in QUERY_MODES:
      raise ValueError(f"config.model.query_mode must be one of {QUERY_MODES}, "
                       f"got {cfg.query_mode!r}")
    batch, num_queries = query_pos_BxQ.shape
    base_1xH = self.param("base_embedding",
                          logical(nn.initializers.normal(1.0), (None, "embed")),
                          (1, cfg.hidden), jnp.float32)
    q_pre_BxQxH = jnp.broadcast_to(base_1xH[None], (batch, num_queries, cfg.hidden))
    if "freqs" in cfg.query_mode:
      q_pre_BxQxH = q_pre_BxQxH + sinusoidal_embedding(query_pos_BxQ, cfg.hidden)
    if cfg.query_mode.endswith(("+mean", "+logsumexp")):
      q_pre_BxQxH = q_pre_BxQxH + other_group_aggregate(enc_BxKxH, mask, cfg.query_mode,
                                                        num_queries)
    q = Linear(cfg.hidden, "embed", "heads_dim", dtype=dt, name="query_processor")(
        AffineLayerNorm(name="pre_query_norm")(q_pre_BxQxH))
    q = apply_rope(split_heads(q, cfg.num_heads), query_pos_BxQ, cfg.rope_base)
    att = cfg.attention(q, k, v, mask)
    out = Linear(cfg.hidden, "heads_dim", "embed", dtype=dt, name="output_linear")(
        merge_heads(att))
    return out.astype(jnp.float32)


class DecoderBlock(nn.Module):
  """Cross-attention-only decoder block: queries read the (unmodulated) encoder output."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxQxH, enc_BxKxH, cond_BxC, query_pos_BxQ, kv_pos_BxK,
               mask: AttentionMask, train: bool, kv_prefix=None, kv_only: bool = False):
    """kv_only / kv_prefix: as `GroupSwap` (the block PGM's decoder cache)."""
    cfg = self.config
    dt = cfg.compute_dtype
    k, v = _rope_heads_kv(cfg, Linear(2 * cfg.hidden, "embed", "kv", use_bias=False, dtype=dt,
                                      name="attn_kv")(ScaleLayerNorm(name="kv_norm1")(enc_BxKxH)),
                          kv_pos_BxK)
    if kv_only:
      return k, v
    k, v = _with_prefix(kv_prefix, k, v)
    mods = Linear(6 * cfg.hidden, "cond", "adaln", zero_init=True,
                  name="adaLN_modulation")(cond_BxC)[:, None, :]
    shift_msa, scale_msa = jnp.split(mods, 6, -1)[:2]

    skip = x_BxQxH
    xq = modulate(ScaleLayerNorm(name="q_norm1")(x_BxQxH), shift_msa, scale_msa)
    q = Linear(cfg.hidden, "embed", "heads_dim", use_bias=False, dtype=dt, name="attn_q")(xq)
    q = apply_rope(split_heads(q, cfg.num_heads), query_pos_BxQ, cfg.rope_base)
    att = cfg.attention(q, k, v, mask)
    return cfg.constrain(attention_out_and_mlp(cfg, skip, att, mods, train=train))


class Encoder(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxH, cond_BxC, positions_BxN, mask: AttentionMask, *, train: bool,
               kv_prefix=None, return_kv: bool = False):
    """kv_prefix: per layer, cached (k, v) put before the layer's own keys; return_kv: also
    return every layer's own (k, v) (the block PGM's encoder cache)."""
    # Rematerialise only where there is a backward pass (training).
    block_cls = maybe_remat(DiTBlock, self.config, static_argnums=(5, 6)) if train else DiTBlock
    if kv_prefix is None and not return_kv:
      for i in range(self.config.enc_layers):
        x_BxNxH = block_cls(self.config, name=f"blocks_{i}")(x_BxNxH, cond_BxC, positions_BxN,
                                                            mask, train, False)
      return x_BxNxH
    kvs = []
    for i in range(self.config.enc_layers):
      x_BxNxH, kv = DiTBlock(self.config, name=f"blocks_{i}")(
          x_BxNxH, cond_BxC, positions_BxN, mask, train, False,
          kv_prefix=None if kv_prefix is None else kv_prefix[i], return_kv=True)
      kvs.append(kv)
    return (x_BxNxH, tuple(kvs)) if return_kv else x_BxNxH


class Decoder(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, enc_BxKxH, cond_BxC, kv_pos_BxK, query_pos_BxQ, mask: AttentionMask, *,
               train: bool, kv_prefix=None, kv_only: bool = False):
    """kv_only: the (k, v) of `enc_BxKxH` of GroupSwap and of every layer (a tuple of
    dec_layers + 1 pairs, the block PGM's decoder cache); kv_prefix: such a tuple of cached
    pairs, put before the keys of `enc_BxKxH` (`mask` covers both)."""
    cfg = self.config
    if kv_only:
      pairs = [GroupSwap(cfg, name="group_swap")(enc_BxKxH, kv_pos_BxK, None, mask,
                                                 kv_only=True)]
      pairs += [DecoderBlock(cfg, name=f"layers_{j}")(None, enc_BxKxH, cond_BxC, None, kv_pos_BxK,
                                                      mask, train, kv_only=True)
                for j in range(cfg.dec_layers)]
      return tuple(pairs)
    prefix = (lambda i: None) if kv_prefix is None else (lambda i: kv_prefix[i])
    x_BxQxH = GroupSwap(cfg, name="group_swap")(enc_BxKxH, kv_pos_BxK, query_pos_BxQ, mask,
                                                kv_prefix=prefix(0))
    x_BxQxH = cfg.constrain(x_BxQxH)
    if kv_prefix is None:
      block_cls = (maybe_remat(DecoderBlock, cfg, static_argnums=(7,)) if train
                   else DecoderBlock)
      for j in range(cfg.dec_layers):
        x_BxQxH = block_cls(cfg, name=f"layers_{j}")(
            x_BxQxH, enc_BxKxH, cond_BxC, query_pos_BxQ, kv_pos_BxK, mask, train)
      return x_BxQxH
    for j in range(cfg.dec_layers):
      x_BxQxH = DecoderBlock(cfg, name=f"layers_{j}")(
          x_BxQxH, enc_BxKxH, cond_BxC, query_pos_BxQ, kv_pos_BxK, mask, train,
          kv_prefix=prefix(j + 1))
    return x_BxQxH


class PartitionDiT(nn.Module):
  """Encoder (within-group self-attention) + GroupSwap + cross-attention decoder."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.vocab_embed = VocabEmbedding(cfg.vocab_size, cfg.hidden)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.output_layer = FinalLayer(cfg)
    self.sigma_map = TimestepEmbedder(cfg.cond_dim)

  def _cond(self, batch):
    return nn.silu(self.sigma_map(jnp.zeros((batch,), jnp.float32)))

  def encode(self, tokens_BxN, positions_BxN, mask: AttentionMask, *, train: bool = False):
    """Encoder outputs (float32 [B, N, H]) for tokens at their ORIGINAL positions."""
    cond_BxC = self._cond(tokens_BxN.shape[0])
    x_BxNxH = self.config.constrain(self.vocab_embed(tokens_BxN))
    return self.encoder(x_BxNxH, cond_BxC, positions_BxN, mask, train=train)

  def decode(self, enc_BxKxH, kv_pos_BxK, query_pos_BxQ, mask: AttentionMask, *,
             train: bool = False, targets_BxQ: Optional[jax.Array] = None,
             mask_logit: float = -jnp.inf):
    """Float32 logits [B, Q, V] for the queried positions (MASK not yet excluded), or,
    with `targets_BxQ`, float32 log p(targets) [B, Q] after logit[MASK] = mask_logit
    (computed chunk by chunk, see `FinalLayer`)."""
    cond_BxC = self._cond(enc_BxKxH.shape[0])
    x_BxQxH = self.decoder(enc_BxKxH, cond_BxC, kv_pos_BxK, query_pos_BxQ, mask, train=train)
    return self.output_layer(x_BxQxH, cond_BxC, targets_BxQ, mask_logit)

  def __call__(self, tokens_BxL: jax.Array, group_BxL: jax.Array,
               valid_BxL: Optional[jax.Array] = None, *, train: bool = False,
               sorted_layout: Optional[bool] = None, targets_BxL: Optional[jax.Array] = None,
               mask_logit: float = -jnp.inf) -> jax.Array:
    """Training layout. Every position is predicted from the other group's tokens.

    Args:
      tokens_BxL: clean tokens x0.
      group_BxL: 0/1 partition (1 = the "masked" group at time t).
      valid_BxL: optional key validity (padding), applied to every attention.
      sorted_layout: run encoder and decoder with each example's tokens stably sorted
        by group (`pgm_jax.ops.partition_layout.partition_view`, shared with the image PGM), so that attention kernels can skip
        the masked half of every attention; RoPE and the query embedding still use the
        ORIGINAL positions and the logits are returned in the original order. Same
        function (to float tolerance; with dropout active the dropout masks land on
        permuted positions, an equally distributed draw). None: the config's
        `sorted_layout` attribute if it has one ("auto": sorted iff the attention resolves
        to the Pallas kernels, `resolve_sorted_layout`), else False.
      targets_BxL: if given, return float32 log p(targets) [B, L] (logit[MASK] =
        mask_logit, float32 log-softmax) instead of the logits; the [B, L, V] logits are
        then never materialised (see `FinalLayer`), and in the sorted layout the targets
        are permuted, not the logits.
    Returns:
      float32 logits [B, L, V], or log-probabilities [B, L] (targets_BxL given).
    """
    if sorted_layout is None:
      sorted_layout = resolve_sorted_layout(getattr(self.config, "sorted_layout", False),
                                            getattr(self.config, "attn_impl", "xla"))
    view = partition_view(group_BxL, valid_BxL, sorted_layout=sorted_layout)
    enc_BxLxH = self.encode(view.gather(tokens_BxL), view.positions, view.same, train=train)
    out = self.decode(enc_BxLxH, view.positions, view.positions, view.other, train=train,
                      targets_BxQ=view.gather(targets_BxL), mask_logit=mask_logit)
    return view.restore(out)  # [B, L, V] logits or [B, L] log-probs
