"""Group-sorted token layout: makes the PGM attention masks block-structured.

Sorting each example's positions by group (stable, group 0 first) turns the
same-group mask into a block-diagonal matrix [[1, 0], [0, 1]] and the other-group
mask into an anti-block-diagonal one [[0, 1], [1, 0]], both with a per-example split
point `split[b]` = number of group-0 tokens. A kernel that knows the split can then
skip every key block that holds no key of the group(s) its query block may read
(`pgm_jax.ops.pallas_attention`).

Everything position-dependent must still use the ORIGINAL positions: RoPE and the
GroupSwap query embedding read `positions` (= `perm`, the original index of each
sorted slot), and the model un-permutes its outputs with `inv`.

Groups must be in {0, 1} (the PGM partition) for the split to describe the mask.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pgm_jax.ops.masks import AttentionMask


class SortedLayout(NamedTuple):
  """Result of `sort_by_group` (all int32).

  perm:      [B, L] sorted slot -> original position (x_sorted = take(x, perm)).
  inv:       [B, L] original position -> sorted slot (x = take(x_sorted, inv)).
  positions: [B, L] ORIGINAL position of each sorted slot (== perm); use it for RoPE.
  split:     [B]    number of group-0 tokens; sorted slots >= split are group 1.
  """
  perm: jax.Array
  inv: jax.Array
  positions: jax.Array
  split: jax.Array


def sort_by_group(group_BxL: jax.Array) -> SortedLayout:
  """Stable sort of each example's positions by group id (0 first, then 1)."""
  group_BxL = group_BxL.astype(jnp.int32)
  batch, length = group_BxL.shape
  perm_BxL = jnp.argsort(group_BxL, axis=1, stable=True).astype(jnp.int32)
  slots_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
  inv_BxL = jnp.zeros_like(perm_BxL).at[jnp.arange(batch)[:, None], perm_BxL].set(slots_BxL)
  split_B = jnp.sum(group_BxL == 0, axis=1).astype(jnp.int32)
  return SortedLayout(perm=perm_BxL, inv=inv_BxL, positions=perm_BxL, split=split_B)


def permute(x_BxL, index_BxL: jax.Array):
  """Gathers x[b, index[b, i], ...] along axis 1 (apply `perm` to sort, `inv` to undo)."""
  idx = index_BxL.reshape(index_BxL.shape + (1,) * (x_BxL.ndim - 2))
  return jnp.take_along_axis(x_BxL, idx, axis=1)


class PartitionView(NamedTuple):
  """How a PGM's training pass sees a partitioned sequence (text and image PGMs alike).

  positions: [B, T] the ORIGINAL position of each slot (RoPE, query embeddings).
  same:      the encoder's mask (attend within the group).
  other:     GroupSwap's and the decoder's mask (attend to the other group).
  layout:    the SortedLayout in the group-sorted view, else None (slots = positions).
  Inputs enter through `gather` and outputs leave through `restore`.
  """
  positions: jax.Array
  same: AttentionMask
  other: AttentionMask
  layout: Optional[SortedLayout]

  def gather(self, x_BxT):
    """Per-slot inputs (tokens, embeddings, targets) in this view's order."""
    return x_BxT if self.layout is None or x_BxT is None else permute(x_BxT, self.layout.perm)

  def restore(self, out_BxT):
    """Outputs back in the original order."""
    return out_BxT if self.layout is None else permute(out_BxT, self.layout.inv)


def partition_view(group_BxT: jax.Array, valid_BxT: Optional[jax.Array], *,
                   sorted_layout: bool) -> PartitionView:
  """The masks and slot order of a PGM training pass over groups in {0, 1}.

  sorted_layout=False: slots are positions and the masks compare group ids. True: each
  example's tokens are stably sorted by group (`sort_by_group`), so that the masks are
  block-structured and a kernel can skip the blocks nobody may read.
  """
  group_BxT = group_BxT.astype(jnp.int32)
  batch, length = group_BxT.shape
  if not sorted_layout:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
    return PartitionView(positions, AttentionMask("same_group", group_BxT, group_BxT, valid_BxT),
                         AttentionMask("other_group", group_BxT, group_BxT, valid_BxT), None)
  layout = sort_by_group(group_BxT)
  group_s = permute(group_BxT, layout.perm)
  valid_s = None if valid_BxT is None else permute(valid_BxT, layout.perm)
  return PartitionView(layout.positions,
                       AttentionMask.sorted_groups("same_group", group_s, layout.split, valid_s),
                       AttentionMask.sorted_groups("other_group", group_s, layout.split, valid_s),
                       layout)


__all__ = ["PartitionView", "SortedLayout", "partition_view", "sort_by_group", "permute"]
