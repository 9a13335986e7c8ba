"""`AttentionMask`: the structured mask every attention implementation takes.

Mask kinds (a query attends to a key iff all that apply hold):
  * "full":         every key.
  * "same_group":   q_group[b, i] == kv_group[b, j]   (PGM encoder, training).
  * "other_group":  q_group[b, i] != kv_group[b, j]   (GroupSwap / decoder, training).
  * "causal":       j <= i                            (autoregressive baseline).
Block kinds (the block PGM, `pgm_jax.models.pgm_block`) read a block index per query and key
(`q_block`, `kv_block`) and the group ids, where group CLEAN_GROUP (= 2) marks a token of the
clean stream (every other group id is a partition group):
  * "block_causal":      kv_block[j] <= q_block[i]   (the clean stream alone; b = 1 is AR).
  * "block_same_group":  a clean key j is seen iff kv_block[j] < q_block[i], or
                         kv_block[j] <= q_block[i] when query i is itself clean; a partition
                         key j is seen iff query i is a partition token of the same block and
                         the same group (the block PGM encoder over [partition; clean]).
  * "block_other_group": as block_same_group, but a partition key must be of the OTHER group
                         (GroupSwap and the decoder of the block PGM).
So a partition token sees its own group of its own block and the clean stream of every
earlier block; a clean token sees the clean stream of its own and every earlier block; no
clean token ever sees a partition token.
and, for every kind, kv_valid[b, j] when given (padding, or packed inference where
only the first `length` keys hold real tokens; see `AttentionMask.packed`).
`AttentionMask.dense` is the boolean form the XLA reference uses.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

MASK_KINDS = ("full", "same_group", "other_group", "causal", "block_causal", "block_same_group",
              "block_other_group")
BLOCK_MASKS = ("block_causal", "block_same_group", "block_other_group")
CLEAN_GROUP = 2  # group id of a clean-stream token in the block kinds


@struct.dataclass
class AttentionMask:
  """Structured attention mask (see module docstring).

  Attributes:
    kind: one of MASK_KINDS (static).
    q_group: int [B, Lq] group id of each query (group kinds only).
    kv_group: int [B, Lk] group id of each key (group kinds only).
    kv_valid: bool [B, Lk] or None; keys with False are never attended.
    kv_length: int [B] or None; keys at index >= kv_length[b] are never attended
      (packed inference; set by `packed`). Lets kernels skip those key blocks.
    q_block: int [B, Lq] block index of each query (block kinds only).
    kv_block: int [B, Lk] block index of each key (block kinds only).
    q_split, kv_split: int [B] or None; number of group-0 queries / keys. Only
      meaningful with group_sorted.
    group_sorted: static; True iff groups are in {0, 1} and sorted (all group-0
      positions first: q_group[b, i] == (i >= q_split[b]), likewise for keys), as
      produced by `pgm_jax.ops.partition_layout.sort_by_group`. Kernels then skip
      key blocks by the split point; the mask itself is unchanged.
  """
  kind: str = struct.field(pytree_node=False, default="full")
  q_group: Optional[jax.Array] = None
  kv_group: Optional[jax.Array] = None
  kv_valid: Optional[jax.Array] = None
  kv_length: Optional[jax.Array] = None
  q_split: Optional[jax.Array] = None
  kv_split: Optional[jax.Array] = None
  q_block: Optional[jax.Array] = None
  kv_block: Optional[jax.Array] = None
  group_sorted: bool = struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    if self.kind not in MASK_KINDS:
      raise ValueError(f"AttentionMask.kind must be one of {MASK_KINDS}, got {self.kind!r}")
    if self.kind in ("same_group", "other_group") and (
        self.q_group is None or self.kv_group is None):
      raise ValueError(f"AttentionMask kind {self.kind!r} needs q_group and kv_group")
    if self.kind in BLOCK_MASKS and (self.q_block is None or self.kv_block is None):
      raise ValueError(f"AttentionMask kind {self.kind!r} needs q_block and kv_block")
    if self.kind in ("block_same_group", "block_other_group") and (
        self.q_group is None or self.kv_group is None):
      raise ValueError(f"AttentionMask kind {self.kind!r} needs q_group and kv_group")
    if self.group_sorted and (self.q_split is None or self.kv_split is None):
      raise ValueError("AttentionMask(group_sorted=True) needs q_split and kv_split")

  @classmethod
  def packed(cls, kv_length_B: jax.Array, kv_len: int) -> "AttentionMask":
    """Packed inference: keys at index >= kv_length_B[b] are padding."""
    kv_valid = jnp.arange(kv_len)[None, :] < kv_length_B[:, None]
    return cls(kind="full", kv_valid=kv_valid, kv_length=kv_length_B)

  @classmethod
  def sorted_groups(cls, kind: str, group_BxL: jax.Array, split_B: jax.Array,
                    kv_valid: Optional[jax.Array] = None) -> "AttentionMask":
    """same_group / other_group self-mask for tokens in sorted layout (`sort_by_group`)."""
    return cls(kind=kind, q_group=group_BxL, kv_group=group_BxL, kv_valid=kv_valid,
               q_split=split_B, kv_split=split_B, group_sorted=True)

  def dense(self, q_len: int, kv_len: int) -> jax.Array:
    """Boolean [B or 1, Lq, Lk] mask; True = attend."""
    if self.kind == "same_group":
      allowed = self.q_group[:, :, None] == self.kv_group[:, None, :]
    elif self.kind == "other_group":
      allowed = self.q_group[:, :, None] != self.kv_group[:, None, :]
    elif self.kind in BLOCK_MASKS:
      allowed = block_allowed(self.kind, self.q_block[:, :, None], self.kv_block[:, None, :],
                              None if self.q_group is None else self.q_group[:, :, None],
                              None if self.kv_group is None else self.kv_group[:, None, :])
    elif self.kind == "causal":
      allowed = (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None]
    else:
      allowed = jnp.ones((1, q_len, kv_len), dtype=bool)
    if self.kv_valid is not None:
      allowed = allowed & self.kv_valid[:, None, :]
    if self.kv_length is not None:
      allowed = allowed & (jnp.arange(kv_len)[None, None, :] < self.kv_length[:, None, None])
    return allowed


def block_allowed(kind: str, q_block, kv_block, q_group=None, kv_group=None):
  """The block kinds' rule on broadcastable arrays (the dense form and the kernels share it)."""
  if kind == "block_causal":
    return kv_block <= q_block
  q_clean = q_group == CLEAN_GROUP
  kv_clean = kv_group == CLEAN_GROUP
  clean_seen = kv_clean & ((kv_block < q_block) | (q_clean & (kv_block == q_block)))
  same = kv_group == q_group if kind == "block_same_group" else kv_group != q_group
  partition_seen = ~kv_clean & ~q_clean & (kv_block == q_block) & same
  return clean_seen | partition_seen


def block_training_masks(group_BxL: jax.Array, block_len: int,
                         valid_BxL: Optional[jax.Array] = None) -> dict:
  """The block PGM's training masks over 2L tokens = [partition stream (positions 0..L-1,
  groups 0/1); clean stream (the same positions, group CLEAN_GROUP)], block = position //
  block_len in both streams:
    "encoder": block_same_group, self-attention over the 2L tokens;
    "decoder": block_other_group, queries the L partition tokens, keys the 2L;
    "clean":   block_causal over the L clean tokens alone.
  valid_BxL (padding) marks valid positions; it applies to both copies of a position."""
  batch, length = group_BxL.shape
  i32 = jnp.int32
  block_L = jnp.arange(length, dtype=i32) // block_len
  block_BxL = jnp.broadcast_to(block_L, (batch, length))
  block_Bx2L = jnp.concatenate([block_BxL, block_BxL], axis=1)
  group_Bx2L = jnp.concatenate([group_BxL.astype(i32),
                                jnp.full((batch, length), CLEAN_GROUP, i32)], axis=1)
  valid_Bx2L = None if valid_BxL is None else jnp.concatenate([valid_BxL, valid_BxL], axis=1)
  return {
      "encoder": AttentionMask("block_same_group", q_group=group_Bx2L, kv_group=group_Bx2L,
                               kv_valid=valid_Bx2L, q_block=block_Bx2L, kv_block=block_Bx2L),
      "decoder": AttentionMask("block_other_group", q_group=group_Bx2L[:, :length],
                               kv_group=group_Bx2L, kv_valid=valid_Bx2L,
                               q_block=block_BxL, kv_block=block_Bx2L),
      "clean": AttentionMask("block_causal", kv_valid=valid_BxL, q_block=block_BxL,
                             kv_block=block_BxL),
  }


def block_alive_fraction(kind: str, seq_len: int, block_len: int) -> float:
  r"""Expected fraction of (query, key) pairs a block kind lets through in the block PGM's
  training layouts (`block_training_masks`), each partition token in group 1
  independently with probability t ~ U[0, 1] (so two distinct tokens share a group with
  probability E[t^2 + (1-t)^2] = 2/3 and differ with E[2 t (1-t)] = 1/3, as
  `families.base.ALIVE_FRACTION`), no padding:

    block_same_group  (encoder, 2L x 2L):
        sum_k s_k [ S_k + 1 + 2/3 (s_k - 1) ]  +  sum_k s_k (S_k + s_k)    over 4 L^2
    block_other_group (decoder, L x 2L):
        sum_k s_k [ S_k + 1/3 (s_k - 1) ]                                   over 2 L^2
    block_causal      (clean stream, L x L):
        sum_k s_k (S_k + s_k)                                               over L^2

  with L = seq_len, block k = positions [k b, min((k+1) b, L)), s_k its size and
  S_k = k b the positions before it (b = block_len). A partition query sees the clean
  stream of earlier blocks (S_k) and its own group of its own block (itself included;
  the decoder only the other group); a clean query sees the clean stream up to its own
  block. When b divides L:
    block_same_group  = 1/4 + (2b + 1) / (12 L)      (b = L: 5/12 + 1/(12 L); b = 1: 1/4 + 1/(4L))
    block_other_group = (L - b) / (4L) + (b - 1) / (6L)
    block_causal      = (L + b) / (2L)
  """
  if kind not in BLOCK_MASKS:
    raise ValueError(f"block_alive_fraction: kind must be one of {BLOCK_MASKS}, got {kind!r}")
  length, b = int(seq_len), int(block_len)
  if length <= 0 or b <= 0:
    raise ValueError(f"block_alive_fraction: seq_len and block_len must be positive, "
                     f"got {seq_len}, {block_len}")
  starts = range(0, length, b)
  sizes = [min(b, length - s) for s in starts]
  clean = sum(n * (s + n) for s, n in zip(starts, sizes))
  if kind == "block_causal":
    return clean / length ** 2
  if kind == "block_same_group":
    part = sum(n * (s + 1 + 2.0 / 3.0 * (n - 1)) for s, n in zip(starts, sizes))
    return (part + clean) / (4 * length ** 2)
  part = sum(n * (s + 1.0 / 3.0 * (n - 1)) for s, n in zip(starts, sizes))
  return part / (2 * length ** 2)
