"""The one attention op of pgm_jax: `partition_attention`.

Every attention in the models (MDLM self-attention, the PGM encoder, GroupSwap and
the PGM decoder cross-attention, packed inference) calls this op. The mask is
described structurally by an `AttentionMask` instead of a dense [B, Lq, Lk] array,
so that kernels can skip whole blocks; the dense XLA implementation below is the
reference oracle that every other implementation is tested against.

Layout: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, heads, head_dim].

Mask kinds: see `pgm_jax.ops.masks`. Compile target: see `pgm_jax.ops.target`.

Rows with no valid key return exactly zero (as PyTorch >= 2.5 SDPA does); their
gradients are exactly zero too. A finite-mask softmax would instead attend
uniformly and leak information across groups.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from pgm_jax.ops import pallas_attention as pa
from pgm_jax.ops.masks import MASK_KINDS, AttentionMask
from pgm_jax.ops.target import PLATFORMS, compile_target, target_platform

IMPLS = ("xla", "pallas", "auto")

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _xla_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask: AttentionMask):
  q_len, kv_len = q_BxQxHxD.shape[1], k_BxKxHxD.shape[1]
  head_dim = q_BxQxHxD.shape[-1]
  allowed_BxQxK = mask.dense(q_len, kv_len)
  scores_BxHxQxK = jnp.einsum(
      "bqhd,bkhd->bhqk", q_BxQxHxD, k_BxKxHxD,
      preferred_element_type=jnp.float32) * (head_dim ** -0.5)
  allowed_Bx1xQxK = allowed_BxQxK[:, None]
  scores_BxHxQxK = jnp.where(allowed_Bx1xQxK, scores_BxHxQxK, _MASK_VALUE)
  probs_BxHxQxK = jax.nn.softmax(scores_BxHxQxK, axis=-1)
  # Zero every masked probability explicitly: this also zeroes rows that have no
  # valid key (which the finite-mask softmax would fill with a uniform average).
  probs_BxHxQxK = jnp.where(allowed_Bx1xQxK, probs_BxHxQxK, 0.0)
  out_BxQxHxD = jnp.einsum(
      "bhqk,bkhd->bqhd", probs_BxHxQxK.astype(v_BxKxHxD.dtype), v_BxKxHxD,
      preferred_element_type=jnp.float32)
  return out_BxQxHxD.astype(q_BxQxHxD.dtype)


def resolve_impl(impl: str) -> str:
  """"auto" -> "pallas" when the target platform (`compile_target`, else
  jax.default_backend()) is TPU/GPU, "xla" on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"config.attn.impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if target_platform() in ("tpu", "gpu") else "xla"
  return impl


SORTED_LAYOUTS = ("auto", True, False)


def resolve_sorted_layout(sorted_layout, impl: str) -> bool:
  """config.attn.sorted_layout: "auto" -> whether `impl` resolves to the Pallas kernels
  (`resolve_impl`, at trace time: the `compile_target` if set, else the local backend),
  which the group-sorted layout lets skip the masked half of every PGM attention; the
  dense XLA path keeps the unsorted layout. True / False force it."""
  if not isinstance(sorted_layout, str):
    return bool(sorted_layout)
  if sorted_layout != "auto":
    raise ValueError(f"config.attn.sorted_layout must be one of {SORTED_LAYOUTS}, "
                     f"got {sorted_layout!r}")
  return resolve_impl(impl) == "pallas"


_LOGGED_FALLBACKS: set = set()


def _kernel_unsupported(q_shape, kv_shape, backend: str) -> Optional[str]:
  """Why the Pallas kernel cannot serve this call (after padding), or None."""
  if q_shape[1] == 0 or kv_shape[1] == 0:
    return "empty query or key sequence"
  head_dim = q_shape[-1]
  if backend == "gpu" and (head_dim < 16 or head_dim & (head_dim - 1)):
    return f"head_dim {head_dim} is not a power of two >= 16 (Triton)"
  return None


def partition_attention(q_BxQxHxD: jax.Array, k_BxKxHxD: jax.Array, v_BxKxHxD: jax.Array,
                        mask: AttentionMask, *, impl: str = "xla", block_q: int = 128,
                        block_kv: int = 128) -> jax.Array:
  """Multi-head scaled dot-product attention under a structured mask.

  Args:
    q_BxQxHxD: queries, [batch, q_len, heads, head_dim] (RoPE already applied).
    k_BxKxHxD: keys, [batch, kv_len, heads, head_dim].
    v_BxKxHxD: values, [batch, kv_len, heads, head_dim].
    mask: an `AttentionMask`.
    impl: "xla" (dense reference), "pallas" (flash kernels that skip masked blocks;
      interpreted when the target platform is CPU) or "auto" (pallas when the target
      platform, see `compile_target`, is TPU/GPU, else xla; falls back to xla, with a
      logged reason, for calls the kernel cannot serve).
    block_q, block_kv: kernel block sizes (config.attn.block_q / block_kv), upper
      bounds: any q_len / kv_len is padded to the kernel tiling
      (`pallas_attention.tiling`) and the result sliced. A ValueError names the config
      key for values that are not positive integers (pallas and auto).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; rows with no valid key are 0.
  """
  resolved = resolve_impl(impl)
  if q_BxQxHxD.ndim != 4 or k_BxKxHxD.shape != v_BxKxHxD.shape:
    raise ValueError(
        f"partition_attention: bad shapes q={q_BxQxHxD.shape} k={k_BxKxHxD.shape} "
        f"v={v_BxKxHxD.shape}; expected [batch, seq, heads, head_dim]")
  if impl != "xla":
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
      if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"config.attn.{name} must be a positive integer, got {block!r}")
  if resolved == "pallas":
    backend = pa.default_backend()
    reason = _kernel_unsupported(q_BxQxHxD.shape, k_BxKxHxD.shape, backend)
    if reason is not None:
      if impl == "pallas":
        raise ValueError(f"partition_attention(impl='pallas'): {reason}; "
                         f"q {q_BxQxHxD.shape}, k {k_BxKxHxD.shape}")
      key = (target_platform(), q_BxQxHxD.shape, k_BxKxHxD.shape, reason)
      if key not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(key)
        logging.warning("partition_attention(impl='auto'): dense XLA path for q %s, k %s "
                        "on %s: %s", q_BxQxHxD.shape, k_BxKxHxD.shape, key[0], reason)
      return _xla_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask)
    kernel = functools.partial(pa.pallas_attention, block_q=block_q, block_kv=block_kv)
    return _shard_over_mesh(kernel, q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask)
  return _xla_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask)


BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXIS = "tensor"


def _shard_over_mesh(kernel, q, k, v, mask: AttentionMask):
  """Runs a Pallas kernel per shard under `jax.shard_map` whenever a mesh is set
  (`jax.set_mesh` / `use_abstract_mesh`, as the train/eval/sample steps do): XLA cannot
  partition a Pallas call by itself, and Mosaic refuses to compile one outside a
  shard_map that is manual over every mesh axis (even for a 1-device mesh, or when the
  jit runs on several devices). The batch is sharded over the data/fsdp axes that
  divide it, the heads over tensor if it divides them; every other mesh axis (and every
  axis for a batch/head count that divides none) holds a replicated copy: each of those
  devices runs the whole kernel on its input (redundant, but correct and compilable).
  Axes that are already manual (inside an outer shard_map) are left alone. Without a
  mesh the kernel runs unpartitioned.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.axis_names:
    return kernel(q, k, v, mask)
  manual = set(getattr(mesh, "manual_axes", ()))
  free = tuple(a for a in mesh.axis_names if a not in manual)
  if not free:
    return kernel(q, k, v, mask)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch_axes, dp = [], 1
  for a in BATCH_MESH_AXES:
    if a in free and sizes[a] > 1 and q.shape[0] % (dp * sizes[a]) == 0:
      batch_axes.append(a)
      dp *= sizes[a]
  head_axis = HEAD_MESH_AXIS if (HEAD_MESH_AXIS in free and sizes[HEAD_MESH_AXIS] > 1 and
                                 q.shape[2] % sizes[HEAD_MESH_AXIS] == 0) else None
  batch_spec = tuple(batch_axes) or None
  qkv_spec = P(batch_spec, None, head_axis, None)
  # Every mask leaf (groups, validity, splits, lengths) is per example: shard its batch.
  mask_leaves, mask_def = jax.tree_util.tree_flatten(mask)

  def per_shard(q, k, v, *leaves):
    return kernel(q, k, v, jax.tree_util.tree_unflatten(mask_def, leaves))

  specs = (qkv_spec,) * 3 + (P(batch_spec),) * len(mask_leaves)
  axis_names = {"axis_names": set(free)} if manual else {}
  return jax.shard_map(per_shard, in_specs=specs, out_specs=qkv_spec, check_vma=False,
                       **axis_names)(q, k, v, *mask_leaves)


__all__ = ["AttentionMask", "partition_attention", "resolve_impl", "resolve_sorted_layout",
           "compile_target", "target_platform", "MASK_KINDS", "IMPLS", "PLATFORMS"]
