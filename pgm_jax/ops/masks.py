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
