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

from typing import NamedTuple

import jax
import jax.numpy as jnp


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


__all__ = ["SortedLayout", "sort_by_group", "permute"]
