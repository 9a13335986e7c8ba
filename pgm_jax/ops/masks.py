"""`AttentionMask`: the structured mask every attention implementation takes.

Mask kinds (a query attends to a key iff all that apply hold):
  * "full":         every key.
  * "same_group":   q_group[b, i] == kv_group[b, j]   (PGM encoder, training).
  * "other_group":  q_group[b, i] != kv_group[b, j]   (GroupSwap / decoder, training).
  * "causal":       j <= i                            (autoregressive baseline).
and, for every kind, kv_valid[b, j] when given (padding, or packed inference where
only the first `length` keys hold real tokens; see `AttentionMask.packed`).
`AttentionMask.dense` is the boolean form the XLA reference uses.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

MASK_KINDS = ("full", "same_group", "other_group", "causal")


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
  group_sorted: bool = struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    if self.kind not in MASK_KINDS:
      raise ValueError(f"AttentionMask.kind must be one of {MASK_KINDS}, got {self.kind!r}")
    if self.kind in ("same_group", "other_group") and (
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
    elif self.kind == "causal":
      allowed = (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None]
    else:
      allowed = jnp.ones((1, q_len, kv_len), dtype=bool)
    if self.kv_valid is not None:
      allowed = allowed & self.kv_valid[:, None, :]
    if self.kv_length is not None:
      allowed = allowed & (jnp.arange(kv_len)[None, None, :] < self.kv_length[:, None, None])
    return allowed
