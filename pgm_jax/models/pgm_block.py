"""BlockPartitionDiT: the block-autoregressive PGM's network (docs/method.md, "Block PGM").

The sequence is cut into blocks of `block_len` = b tokens, generated left to right; inside a
block tokens are generated as in a PGM. Same modules and parameter tree as `PartitionDiT`
(a PGM checkpoint initialises a block PGM), run on two streams of the same sequence:

  * the clean stream: every token, group CLEAN_GROUP, block-causal self-attention (a token
    sees its own block and every earlier one). At sampling time its per-layer keys and
    values (encoder) and the decoder's keys and values of its outputs are the KV cache;
  * the partition stream: each block is split into groups 0 / 1 as the PGM splits a
    sequence. A token attends to its own group inside its block and to the clean stream of
    earlier blocks (encoder); GroupSwap and the decoder predict each group of a block from
    the other group of the same block plus the clean stream of earlier blocks.

Training (`__call__`) runs both streams in one pass: the encoder over [partition; clean]
(2L tokens, mask "block_same_group"), the decoder's L partition queries over the 2L
encoder outputs ("block_other_group"). With b = L there is no earlier block and the
partition stream is exactly the PGM's layout (tested: same logits and loss).

Sampling (`encode_cached`, `decode_cached`, `decoder_keys_values`): keys are
[cache slots 0..C-1 (position = slot, group CLEAN_GROUP); this call's tokens], so the
cache is read, never recomputed.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pgm_jax.models.pgm import PartitionDiT
from pgm_jax.ops import AttentionMask
from pgm_jax.ops.masks import CLEAN_GROUP

# GroupSwap query modes without an aggregate of the other group's encoder outputs: the cache
# holds keys and values, not the outputs an aggregate would average.
BLOCK_QUERY_MODES = ("learn", "learn+freqs")


def block_ids(positions, block_len: int):
  """Block index of each position."""
  return positions // block_len


class BlockPartitionDiT(PartitionDiT):
  """PartitionDiT over a clean and a partition stream (module docstring)."""

  def _check(self):
    cfg = self.config
    if cfg.block_len <= 0:
      raise ValueError(f"config.model.block_len must be a positive integer for "
                       f"config.model.kind='pgm_block', got {cfg.block_len}")
    if cfg.query_mode not in BLOCK_QUERY_MODES:
      raise ValueError(f"config.model.query_mode={cfg.query_mode!r} is not available for the "
                       f"block PGM: use one of {BLOCK_QUERY_MODES}")

  def __call__(self, tokens_BxL: jax.Array, group_BxL: jax.Array,
               valid_BxL: Optional[jax.Array] = None, *, train: bool = False,
               targets_BxL: Optional[jax.Array] = None, mask_logit: float = -jnp.inf,
               clean_tokens_BxL: Optional[jax.Array] = None) -> jax.Array:
    """Training layout: logits [B, L, V] (or log p(targets) [B, L]) of every position of the
    partition stream, each predicted from the other group of its block and the clean
    stream of earlier blocks.

    Args:
      tokens_BxL: the partition stream's tokens (x0).
      group_BxL: 0/1 partition within each block (1 = the "masked" group at the block's t).
      valid_BxL: optional key validity (padding), applied to both streams.
      clean_tokens_BxL: the clean stream's tokens (default `tokens_BxL`; a separate input
        only so that tests can show which stream a prediction reads).
    """
    self._check()
    batch, length = tokens_BxL.shape
    b = self.config.block_len
    clean = tokens_BxL if clean_tokens_BxL is None else clean_tokens_BxL
    pos_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
    block_BxL = block_ids(pos_BxL, b)
    group_BxL = group_BxL.astype(jnp.int32)
    group2 = jnp.concatenate([group_BxL, jnp.full_like(group_BxL, CLEAN_GROUP)], axis=1)
    pos2 = jnp.concatenate([pos_BxL, pos_BxL], axis=1)
    block2 = jnp.concatenate([block_BxL, block_BxL], axis=1)
    valid2 = None if valid_BxL is None else jnp.concatenate([valid_BxL, valid_BxL], axis=1)
    enc_mask = AttentionMask(kind="block_same_group", q_group=group2, kv_group=group2,
                             q_block=block2, kv_block=block2, kv_valid=valid2)
    enc_Bx2LxH = self.encode(jnp.concatenate([tokens_BxL, clean], axis=1), pos2, enc_mask,
                             train=train)
    dec_mask = AttentionMask(kind="block_other_group", q_group=group_BxL, kv_group=group2,
                             q_block=block_BxL, kv_block=block2, kv_valid=valid2)
    return self.decode(enc_Bx2LxH, pos2, pos_BxL, dec_mask, train=train,
                       targets_BxQ=targets_BxL, mask_logit=mask_logit)

  # -- sampling with a KV cache ------------------------------------------------------------
  def encode_cached(self, tokens_BxN, positions_BxN, group_BxN, valid_BxN, enc_cache,
                    cache_valid_BxC):
    """Encoder over N new tokens whose keys follow the C cached clean-stream slots.

    group_BxN: 0 for known tokens of the current block (partition stream), CLEAN_GROUP for
    the clean pass of a finished block. enc_cache: per encoder layer (k, v)
    [B, C, heads, head_dim], slot c holding position c. Returns (outputs [B, N, H], the
    per-layer (k, v) of the N tokens)."""
    self._check()
    mask = self._cached_mask("block_same_group", positions_BxN, group_BxN, positions_BxN,
                             group_BxN, valid_BxN, cache_valid_BxC)
    cond_BxC = self._cond(tokens_BxN.shape[0])
    x_BxNxH = self.config.constrain(self.vocab_embed(tokens_BxN))
    return self.encoder(x_BxNxH, cond_BxC, positions_BxN, mask, train=False,
                        kv_prefix=enc_cache, return_kv=True)

  def decode_cached(self, enc_BxNxH, kv_pos_BxN, kv_valid_BxN, query_pos_BxQ, dec_cache,
                    cache_valid_BxC):
    """Logits [B, Q, V] of the queried positions (group 1 of the current block) from the
    known tokens' encoder outputs (group 0) and the decoder cache (GroupSwap's and every
    decoder layer's (k, v) of the cached clean slots)."""
    self._check()
    batch, num_queries = query_pos_BxQ.shape
    q_group = jnp.ones((batch, num_queries), jnp.int32)
    kv_group = jnp.zeros(kv_pos_BxN.shape, jnp.int32)
    mask = self._cached_mask("block_other_group", query_pos_BxQ, q_group, kv_pos_BxN, kv_group,
                             kv_valid_BxN, cache_valid_BxC)
    cond_BxC = self._cond(batch)
    x_BxQxH = self.decoder(enc_BxNxH, cond_BxC, kv_pos_BxN, query_pos_BxQ, mask, train=False,
                           kv_prefix=dec_cache)
    return self.output_layer(x_BxQxH, cond_BxC, None, -jnp.inf)

  def decoder_keys_values(self, enc_BxNxH, positions_BxN):
    """GroupSwap's and every decoder layer's (k, v) of clean-stream encoder outputs (what
    the decoder cache appends when a block is finished)."""
    self._check()
    cond_BxC = self._cond(enc_BxNxH.shape[0])
    return self.decoder(enc_BxNxH, cond_BxC, positions_BxN, None, None, train=False,
                        kv_only=True)

  def _cached_mask(self, kind, q_pos_BxQ, q_group_BxQ, kv_pos_BxN, kv_group_BxN, kv_valid_BxN,
                   cache_valid_BxC):
    b = self.config.block_len
    batch, cache_len = cache_valid_BxC.shape
    slot_BxC = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32)[None], (batch, cache_len))
    return AttentionMask(
        kind=kind, q_group=q_group_BxQ,
        kv_group=jnp.concatenate([jnp.full((batch, cache_len), CLEAN_GROUP, jnp.int32),
                                  kv_group_BxN.astype(jnp.int32)], axis=1),
        q_block=block_ids(q_pos_BxQ, b),
        kv_block=jnp.concatenate([block_ids(slot_BxC, b), block_ids(kv_pos_BxN, b)], axis=1),
        kv_valid=jnp.concatenate([cache_valid_BxC, kv_valid_BxN], axis=1))
