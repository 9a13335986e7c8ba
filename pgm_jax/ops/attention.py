"""The one attention op of pgm_jax: `partition_attention`.

Every attention in the models (MDLM self-attention, the PGM encoder, GroupSwap and
the PGM decoder cross-attention, packed inference) calls this op. The mask is
described structurally by an `AttentionMask` instead of a dense [B, Lq, Lk] array,
so that kernels can skip whole blocks; the dense XLA implementation below is the
reference oracle that every other implementation is tested against.

Layout: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, heads, head_dim].

Mask kinds (a query attends to a key iff all that apply hold):
  * "full":         every key.
  * "same_group":   q_group[b, i] == kv_group[b, j]   (PGM encoder, training).
  * "other_group":  q_group[b, i] != kv_group[b, j]   (GroupSwap / decoder, training).
  * "causal":       j <= i                            (autoregressive baseline).
and, for every kind, kv_valid[b, j] when given (padding, or packed inference where
only the first `length` keys hold real tokens; see `AttentionMask.packed`).

Rows with no valid key return exactly zero (as PyTorch >= 2.5 SDPA does); their
gradients are exactly zero too. A finite-mask softmax would instead attend
uniformly and leak information across groups.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P
from flax import struct

MASK_KINDS = ("full", "same_group", "other_group", "causal")
IMPLS = ("xla", "pallas", "auto")
PLATFORMS = ("tpu", "gpu", "cpu")

# ----------------------------------------------------------------------------
# Compile target: the platform kernels are built for (default: jax.default_backend()).
# ----------------------------------------------------------------------------

# A JAX config state (part of the jit cache / trace context key, so a function traced
# for one target is retraced for another); a plain context variable if that internal
# API is missing.
try:
  from jax._src import config as _jax_config  # pylint: disable=g-import-not-at-top
  _TARGET_STATE = _jax_config.optional_enum_state(
      name="pgm_jax_compile_target", enum_values=list(PLATFORMS), default=None,
      help="pgm_jax attention: platform the kernels are built for (compile_target).",
      include_in_jit_key=True, include_in_trace_context=True)
except Exception:  # pylint: disable=broad-except
  _TARGET_STATE = None
_TARGET_VAR = contextvars.ContextVar("pgm_jax_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
  """Builds attention for `platform` ("tpu" | "gpu" | "cpu") instead of the local backend.

  Inside the context `resolve_impl("auto")` resolves for `platform` and the Pallas
  kernels are lowered for it with interpret off ("tpu" -> Mosaic, "gpu" -> Triton);
  "cpu" gives the local CPU behaviour (auto -> xla, pallas interpreted). Trace (jit,
  lower) inside the context, e.g. to compile for TPU devices from
  `jax.experimental.topologies.get_topology_desc` on a CPU machine:
    with compile_target("tpu"): jax.jit(step).lower(...).compile()
  """
  if platform not in PLATFORMS:
    raise ValueError(f"compile_target platform must be one of {PLATFORMS}, got {platform!r}")
  if _TARGET_STATE is not None:
    with _TARGET_STATE(platform):
      yield
  else:
    token = _TARGET_VAR.set(platform)
    try:
      yield
    finally:
      _TARGET_VAR.reset(token)


def target_platform() -> str:
  """"tpu" | "gpu" | "cpu": the `compile_target` if set, else jax.default_backend()."""
  value = _TARGET_STATE.value if _TARGET_STATE is not None else _TARGET_VAR.get()
  return value or jax.default_backend()

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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
    from pgm_jax.ops import pallas_attention as pa  # pylint: disable=g-import-not-at-top
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


__all__ = ["AttentionMask", "partition_attention", "resolve_impl", "compile_target",
           "target_platform", "MASK_KINDS", "IMPLS", "PLATFORMS"]
