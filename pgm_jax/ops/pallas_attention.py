"""Pallas flash attention for `partition_attention`, skipping fully masked blocks.

Kernels (forward, dq, dk/dv; wrapped in one `jax.custom_vjp`) use the flash-style
online softmax in float32 and exist in two lowerings:

  * "tpu": Mosaic. Grid (batch, heads, q blocks, kv blocks) with the kv (or, for
    dk/dv, q) axis innermost and VMEM scratch accumulators. The per-example split
    points and key lengths are SCALAR PREFETCH operands (`PrefetchScalarGridSpec`,
    SMEM): the kernel computes only the live block range [lo, hi) of the inner axis
    (`pl.when`), and the BlockSpec index maps clamp the inner block index into
    [lo, hi - 1], so a skipped block is not even copied (same block index as the
    previous step -> the pipeline issues no DMA).
  * "gpu": Triton. Grid (batch, heads, q blocks) (or kv blocks for dk/dv); each
    program loops (`fori_loop`) over exactly the live blocks [lo, hi) of the other
    axis. The split points travel as a tiny int32 [B, 4] operand (block kinds: also
    the table row; two loops over its ranges, each step guarded by its live bit).

Masking inside a block is always computed ELEMENTWISE from the group ids, the key
validity and (causal) the indices, so the kernels are correct for ANY group ids.
Block skipping is an optimisation on top, driven by the scalars:
  * same_group / other_group with `mask.group_sorted` (groups in sorted layout, see
    `partition_layout`): the query block's group range against the split decides the
    contiguous live key-block range (block-diagonal / anti-block-diagonal).
    Without `group_sorted` nothing is skipped for group kinds (still correct).
  * every kind: key blocks at or beyond `mask.kv_length[b]` (packed inference).
  * causal: key blocks above the diagonal.
For these kinds the live set is one contiguous range, and it is exactly the set of blocks
that hold at least one allowed (query, key) pair when the mask is in sorted/packed form
(tested), so the count in `block_counts` is both safe and tight.
  * block kinds (block_causal / block_same_group / block_other_group, the block PGM):
    the live set is not one range (a partition query tile needs its own partition tile
    and a prefix of the clean stream). The wrapper decides the live tile pairs from
    per-tile summaries (`tile_alive`: block / group ranges of partition tokens, the
    extreme clean block; the diagonal pairs exactly) and passes a table per row (query
    block; for dk/dv key block): two fetch ranges covering every live block (the first
    run, then the rest) and the live bits. Kernels compute a step iff its bit is set; TPU index maps fetch inside the
    ranges only (the gap repeats the last block: no DMA). In the block PGM's layouts the
    live set is exactly the tiles holding an allowed pair (tested).

Rows with no valid key return 0 and get zero gradients (as the dense oracle).

Any q_len / kv_len: `tiling` picks balanced blocks (<= block_q / block_kv, rounded to the
hardware tile) and `pallas_attention` pads queries (group 1, sliced off) and keys
(invalid) to a multiple of them, so values and gradients are those of the unpadded call.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

from pgm_jax.ops import masks, target
from pgm_jax.ops.masks import BLOCK_MASKS, CLEAN_GROUP, AttentionMask, block_allowed
from pgm_jax.ops.partition_layout import sort_by_group

BACKENDS = ("tpu", "gpu")
INTERPRET_MODES = ("none", "generic", "tpu")
_NEG = -1e30          # finite "masked" score: exp(_NEG - m) == 0 and never NaN


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """Static description of one attention call (hashable: nondiff arg of custom_vjp)."""
  mode: str            # a mask kind (masks.MASK_KINDS)
  use_groups: bool     # elementwise group mask from q_group / kv_group (same/other_group)
  use_kv_valid: bool   # elementwise key-validity mask
  skip_groups: bool    # groups in sorted layout: skip by split point
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  head_dim: int
  backend: str = "tpu"
  interpret: str = "none"

  @property
  def nq(self) -> int:
    return self.q_len // self.block_q

  @property
  def nk(self) -> int:
    return self.kv_len // self.block_kv

  @property
  def scale(self) -> float:
    return self.head_dim ** -0.5

  @property
  def interpret_arg(self):
    if self.interpret == "tpu":
      return pltpu.InterpretParams()
    return self.interpret == "generic"


# ----------------------------------------------------------------------------
# Block sizes.
# ----------------------------------------------------------------------------

class Tiling(NamedTuple):
  """Effective kernel blocks and the padded lengths they tile (see `tiling`)."""
  block_q: int
  block_kv: int
  q_len: int      # padded query length (a multiple of block_q)
  kv_len: int     # padded key length (a multiple of block_kv)


def _check_block_value(name: str, block) -> int:
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
    raise ValueError(f"config.attn.{name} must be a positive integer, got {block!r}")
  return int(block)


def _tile_rules(backend: Optional[str], interpret) -> tuple[int, int, bool]:
  """(query tile, key tile, power-of-two blocks) for a lowering and interpret mode.

  Compiled kernels and the TPU interpreter follow the hardware: TPU (Mosaic) blocks
  are multiples of 8 sublanes (queries) and 128 lanes (keys; the key validity / group
  rows are [1, block_kv]); GPU (Triton) blocks are powers of two >= 16. The generic
  interpreter on the TPU lowering only rounds to 8 (so tests can use small blocks).
  """
  backend = backend or default_backend()
  mode = _interpret_mode(interpret)
  if backend == "gpu":
    return 16, 16, True
  if mode == "generic":
    return 8, 8, False
  return 8, 128, False


def _block_and_length(length: int, block: int, tile: int, pow2: bool) -> tuple[int, int]:
  """Balanced blocks: ceil(length / block) blocks of equal size, rounded up to the tile
  (or the next power of two >= tile); the length is padded to a multiple of it."""
  length = max(int(length), 1)
  n = -(-length // block)
  eff = -(-length // n)
  if pow2:
    eff = max(tile, 1 << (eff - 1).bit_length())
  else:
    eff = -(-eff // tile) * tile
  return eff, -(-length // eff) * eff


def tiling(q_len: int, kv_len: int, block_q: int, block_kv: int, *,
           backend: Optional[str] = None, interpret=None) -> Tiling:
  """Effective blocks and padded lengths for one call (never raises for a shape).

  block_q / block_kv are upper bounds (config.attn.block_q / block_kv): a length L
  gets ceil(L / block) equal blocks, each rounded up to the hardware tile (see
  `_tile_rules`), and L is padded to a multiple of the block. E.g. TPU: 7 queries ->
  one block of 8; 192 keys with block 128 -> 2 x 128 (padded to 256); 192 queries with
  block 128 -> 2 x 96. GPU: 7 queries -> 16; 24 keys -> 32.
  Raises ValueError naming config.attn.block_q / block_kv only for values that are
  not positive integers.
  """
  block_q = _check_block_value("block_q", block_q)
  block_kv = _check_block_value("block_kv", block_kv)
  tile_q, tile_kv, pow2 = _tile_rules(backend, interpret)
  bq, q_pad = _block_and_length(q_len, block_q, tile_q, pow2)
  bk, kv_pad = _block_and_length(kv_len, block_kv, tile_kv, pow2)
  return Tiling(bq, bk, q_pad, kv_pad)


def check_block_sizes(q_len: int, kv_len: int, block_q: int, block_kv: int, *,
                      backend: Optional[str] = None, interpret=True) -> tuple[int, int]:
  """Effective (block_q, block_kv) of `tiling` (the lengths are padded to them).

  Raises ValueError naming config.attn.block_q / config.attn.block_kv for values that
  are not positive integers; every shape is served (by padding).
  """
  t = tiling(q_len, kv_len, block_q, block_kv, backend=backend, interpret=interpret)
  return t.block_q, t.block_kv


# ----------------------------------------------------------------------------
# Live block ranges (shared by the kernels, the index maps and the block report).
# ----------------------------------------------------------------------------

def _cdiv(a, b: int):
  return lax.div(a + (b - 1), jnp.int32(b))


def kv_block_range(spec: KernelSpec, qi, q_split, kv_split, kv_len):
  """[lo, hi) of key blocks that query block `qi` must visit (int32 scalars)."""
  bq, bk, nk = spec.block_q, spec.block_kv, spec.nk
  qs = qi * bq
  qe = qs + bq
  lo, hi = jnp.int32(0), jnp.int32(nk)
  if spec.skip_groups and spec.mode in ("same_group", "other_group"):
    has0, has1 = qs < q_split, qe > q_split           # query block holds group 0 / 1
    first1 = lax.div(kv_split, jnp.int32(bk))          # first key block holding group 1
    end0 = _cdiv(kv_split, bk)                         # key blocks [0, end0) hold group 0
    read0, read1 = (has0, has1) if spec.mode == "same_group" else (has1, has0)
    lo = jnp.where(read0, jnp.int32(0), first1)
    hi = jnp.where(read1, jnp.int32(nk), end0)
  if spec.mode == "causal":
    hi = jnp.minimum(hi, _cdiv(qe, bk))
  hi = jnp.minimum(hi, _cdiv(kv_len, bk))
  return lo, hi


def q_block_range(spec: KernelSpec, ki, q_split, kv_split, kv_len):
  """[lo, hi) of query blocks that read key block `ki` (same pairs as kv_block_range)."""
  bq, bk, nq = spec.block_q, spec.block_kv, spec.nq
  ks = ki * bk
  ke = ks + bk
  lo, hi = jnp.int32(0), jnp.int32(nq)
  if spec.skip_groups and spec.mode in ("same_group", "other_group"):
    has0, has1 = ks < kv_split, ke > kv_split
    first1 = lax.div(q_split, jnp.int32(bq))
    end0 = _cdiv(q_split, bq)
    read0, read1 = (has0, has1) if spec.mode == "same_group" else (has1, has0)
    lo = jnp.where(read0, jnp.int32(0), first1)
    hi = jnp.where(read1, jnp.int32(nq), end0)
  if spec.mode == "causal":
    lo = jnp.maximum(lo, lax.div(ks, jnp.int32(bq)))
  hi = jnp.where(ks < kv_len, hi, lo)
  return lo, hi


def _clamp(i, lo, hi, n: int):
  """Block index to fetch at inner step i: i inside [lo, hi), else the nearest live one."""
  return jnp.minimum(jnp.maximum(jnp.minimum(i, hi - 1), lo), n - 1)


# ----------------------------------------------------------------------------
# Block kinds: per-tile summaries -> a live-tile table per (example, outer block).
# ----------------------------------------------------------------------------

_BIG = 1 << 30        # sentinel block / group id of "no such token in this tile"


def _is_block(spec: KernelSpec) -> bool:
  return spec.mode in BLOCK_MASKS


def tile_alive(spec: KernelSpec, qg, qb, kvg, kvb, kvv, q_len: Optional[int] = None):
  """Bool [B, nq, nk]: (query tile, key tile) pairs a block kind may need (conservative).

  Decided from per-tile summaries, never from the pairs themselves: for each query tile,
  the block range of its partition tokens (group != CLEAN_GROUP), the largest block of its
  clean tokens and the group-id range of its partition tokens; for each key tile the same
  over its VALID keys (kv_valid, kv_length, tiling padding) with the smallest clean block.
  A tile pair is live iff
    * some clean key may be seen: min clean kv block < max partition q block, or
      <= max clean q block (block_causal: every token counts as clean); or
    * partition keys may be seen: the partition block ranges overlap and the group ranges
      allow it (same: the group-id ranges overlap; other: not both tiles one single,
      identical group).
  The diagonal pairs (i, i) are then decided exactly (any allowed (i, j) in the pair).
  The live set holds every pair with an allowed (i, j) for ANY block / group ids; in the
  block PGM layouts (monotone blocks, partition stream first) it is exactly that set up
  to the group test of off-diagonal tiles spanning several blocks (tested). Padded
  queries (index >= q_len) are ignored.
  """
  batch = qg.shape[0]
  nq, nk, bq, bk = spec.nq, spec.nk, spec.block_q, spec.block_kv
  q_real = (jnp.arange(spec.q_len) < (spec.q_len if q_len is None else q_len))[None, :]
  q_clean, kv_ok = qg == CLEAN_GROUP, kvv != 0
  q_part, kv_part = q_real & ~q_clean, kv_ok & (kvg != CLEAN_GROUP)
  q_clean, kv_clean = q_real & q_clean, kv_ok & (kvg == CLEAN_GROUP)

  def tmin(x, sel, n, blk):
    return jnp.min(jnp.where(sel, x, _BIG).reshape(batch, n, blk), axis=2)

  def tmax(x, sel, n, blk):
    return jnp.max(jnp.where(sel, x, -_BIG).reshape(batch, n, blk), axis=2)

  Q = lambda x: x[:, :, None]
  K = lambda x: x[:, None, :]
  kc_lo = K(tmin(kvb, kv_clean, nk, bk))
  live = (kc_lo < Q(tmax(qb, q_part, nq, bq))) | (kc_lo <= Q(tmax(qb, q_clean, nq, bq)))
  if spec.mode == "block_causal":
    return live
  qp_lo, qp_hi = Q(tmin(qb, q_part, nq, bq)), Q(tmax(qb, q_part, nq, bq))
  kp_lo, kp_hi = K(tmin(kvb, kv_part, nk, bk)), K(tmax(kvb, kv_part, nk, bk))
  qg_lo, qg_hi = Q(tmin(qg, q_part, nq, bq)), Q(tmax(qg, q_part, nq, bq))
  kg_lo, kg_hi = K(tmin(kvg, kv_part, nk, bk)), K(tmax(kvg, kv_part, nk, bk))
  overlap = jnp.maximum(qp_lo, kp_lo) <= jnp.minimum(qp_hi, kp_hi)
  if spec.mode == "block_same_group":
    groups = jnp.maximum(qg_lo, kg_lo) <= jnp.minimum(qg_hi, kg_hi)
  else:
    groups = ~((qg_lo == qg_hi) & (kg_lo == kg_hi) & (qg_lo == kg_lo))
  live = live | (overlap & groups)
  # The diagonal pairs (i, i), where the PGM layouts put a stream's tile against itself,
  # are decided exactly (O(Lq x block_kv) work): e.g. the decoder at b = 1 sees no partition
  # key (the only one of its block is its own copy), which the summaries cannot tell.
  n = min(nq, nk)
  qt = lambda x: x[:, :n * bq].reshape(batch, n, bq, 1)
  kt = lambda x: x[:, :n * bk].reshape(batch, n, 1, bk)
  exact = (block_allowed(spec.mode, qt(qb), kt(kvb), qt(qg), kt(kvg)) & qt(jnp.broadcast_to(q_real, qg.shape))
           & kt(kv_ok)).any(axis=(2, 3))
  i = jnp.arange(n)
  return live.at[:, i, i].set(live[:, i, i] & exact)


def _first(x, n: int):
  """Index of the first True along the last axis, n if none."""
  return jnp.min(jnp.where(x, jnp.arange(n, dtype=jnp.int32), jnp.int32(n)), axis=-1)


def _live_table(alive):
  """int32 [B, R, 4 + ceil(N / 32)] from bool alive [B, R, N]: per row (lo1, hi1, lo2, hi2)
  = two block ranges covering every live block (the first run of live blocks, then the
  rest of the hull; an empty second range is [hi1, hi1), no live block at all is all
  zeros), then the live bits, 32 per int32 word (bit j % 32 of word j // 32).
  Min/max reductions only (cumulative ops and argmax compile several times slower for
  TPU). In the block PGM's layouts a row's live blocks are at most two runs (a diagonal
  tile, a clean prefix; the cache prefix, the current block), so the ranges are exact."""
  batch, rows, n = alive.shape
  idx = jnp.arange(n, dtype=jnp.int32)
  first = _first(alive, n)
  end = jnp.max(jnp.where(alive, idx, -1), axis=-1) + 1                # 0 if none
  hi1 = jnp.minimum(_first(~alive & (idx > first[..., None]), n), end)
  lo2 = jnp.minimum(_first(alive & (idx >= hi1[..., None]), n), end)
  ranges = jnp.stack([first, hi1, lo2, end], axis=-1)
  ranges = jnp.where((end > 0)[..., None], ranges, 0)
  words = -(-n // 32)
  bits = jnp.pad(alive, ((0, 0), (0, 0), (0, words * 32 - n))).reshape(batch, rows, words, 32)
  one = jnp.left_shift(jnp.int32(1), jnp.arange(32, dtype=jnp.int32))   # bit 31: INT32_MIN
  packed = jnp.sum(jnp.where(bits, one, 0), axis=-1, dtype=jnp.int32)
  return jnp.concatenate([ranges, packed], axis=-1)


def _tab_bit(tab, base, i):
  """Live bit of inner block i in the table row starting at `base` (ref, scalar index)."""
  word = tab[base + 4 + lax.shift_right_logical(i, 5)]
  return (lax.shift_right_logical(word, jnp.bitwise_and(i, 31)) & 1) == 1


def _tab_fetch(tab, base, i, n: int):
  """Block to fetch at inner step i: i inside a range; in the gap the last block of the
  first range; before / after them the first / last live block (no new DMA)."""
  lo1, hi1, lo2, hi2 = tab[base], tab[base + 1], tab[base + 2], tab[base + 3]
  j = jnp.where(i < lo2, jnp.maximum(jnp.minimum(i, hi1 - 1), lo1), jnp.minimum(i, hi2 - 1))
  return jnp.minimum(jnp.maximum(j, 0), n - 1)


def _inner(spec: KernelSpec, dkv: bool):
  """(outer blocks, inner blocks, table row width) of a grid: fwd/dq (q outer) or dkv."""
  n_outer, n_inner = (spec.nk, spec.nq) if dkv else (spec.nq, spec.nk)
  return n_outer, n_inner, 4 + -(-n_inner // 32)


def _tpu_live(spec, sc, b, outer, inner, dkv: bool = False):
  """Whether the TPU grid step (b, outer block, inner block) computes."""
  if _is_block(spec):
    n_outer, _, width = _inner(spec, dkv)
    return _tab_bit(sc[3], (b * n_outer + outer) * width, inner)
  lo, hi = (q_block_range if dkv else kv_block_range)(spec, outer, sc[0][b], sc[1][b], sc[2][b])
  return (inner >= lo) & (inner < hi)


def _tpu_fetch(spec, sc, b, outer, inner, dkv: bool = False):
  """Inner block the TPU index maps fetch at step (b, outer, inner): skipped steps repeat
  a live block, so the pipeline issues no DMA for them."""
  n_outer, n_inner, width = _inner(spec, dkv)
  if _is_block(spec):
    return _tab_fetch(sc[3], (b * n_outer + outer) * width, inner, n_inner)
  lo, hi = (q_block_range if dkv else kv_block_range)(spec, outer, sc[0][b], sc[1][b], sc[2][b])
  return _clamp(inner, lo, hi, n_inner)


# ----------------------------------------------------------------------------
# Elementwise masks.
# ----------------------------------------------------------------------------

def _combine(*masks):
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else out & m
  return out


def _block_mask(spec: KernelSpec, qg, kvg, kvv, row, col, qb=None, kvb=None):
  """Boolean [bq, bk] mask (or None = all allowed). qg, qb [bq,1]; kvg, kvv, kvb [1,bk];
  row/col ints."""
  group = None
  if _is_block(spec):
    group = block_allowed(spec.mode, qb, kvb, qg, kvg)
  elif spec.use_groups:
    group = (qg == kvg) if spec.mode == "same_group" else (qg != kvg)
  causal = (col <= row) if spec.mode == "causal" else None
  valid = (kvv != 0) if spec.use_kv_valid else None
  return _combine(group, causal, valid)


def _where(mask, x, fill):
  return x if mask is None else jnp.where(mask, x, fill)


def _dot_nt(a, b):     # a [m, d] . b [n, d]^T -> [m, n], float32
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):        # a [m, k] . b [k, n] -> [m, n], float32
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _finalize(acc, m, l):
  nonempty = l > 0
  safe_l = jnp.where(nonempty, l, 1.0)
  out = jnp.where(nonempty, acc / safe_l, 0.0)
  lse = jnp.where(nonempty, m + jnp.log(safe_l), 0.0)
  return out, lse


# ----------------------------------------------------------------------------
# Kernel operands. Scalars: TPU scalar prefetch (q_split, kv_split, kv_length [B] and,
# block kinds, the flattened live table); GPU: meta [B, 4] (and the table [B, n, W']).
# Per-position vectors: qg, kvg, kvv (every kind), then qb, kvb (block kinds; on TPU
# stacked as [B, Lq, 2] = (qg, qb) and [B, 3, Lk] = (kvg, kvv, kvb): a [B, Lq, 1] operand
# is padded to 128 lanes in HBM, so a separate qb would cost as much as qg again).
# ----------------------------------------------------------------------------

def _num_scalars(spec: KernelSpec, backend: str) -> int:
  return (4 if backend == "tpu" else 2) if _is_block(spec) else (3 if backend == "tpu" else 1)


def _num_vecs(spec: KernelSpec, backend: str) -> int:
  if not _is_block(spec):
    return 3
  return 2 if backend == "tpu" else 5     # TPU: (qg, qb) and (kvg, kvv, kvb) stacked


def _split_refs(spec: KernelSpec, refs, n_main: int, backend: str):
  """Kernel refs -> (scalars, main operands, vectors, outputs + scratch)."""
  ns, nv = _num_scalars(spec, backend), _num_vecs(spec, backend)
  return (refs[:ns], refs[ns:ns + n_main], refs[ns + n_main:ns + n_main + nv],
          refs[ns + n_main + nv:])


# ----------------------------------------------------------------------------
# TPU (Mosaic) kernels: grid with the reduction axis innermost, scalar prefetch.
# ----------------------------------------------------------------------------

def _tpu_masks(spec, qi, ki, vecs):
  bq, bk = spec.block_q, spec.block_kv
  row = col = None
  if spec.mode == "causal":
    row = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    col = ki * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  if _is_block(spec):
    qv, kv = vecs[0][...], vecs[1][...]                 # [bq, 2], [3, bk]
    return _block_mask(spec, qv[:, 0:1], kv[0:1, :], kv[1:2, :], row, col, qv[:, 1:2],
                       kv[2:3, :])
  qg, kvg, kvv = (r[...] for r in vecs)
  return _block_mask(spec, qg, kvg, kvv, row, col)


def _tpu_fwd_kernel(*refs, spec: KernelSpec):
  sc, (q_ref, k_ref, v_ref), vecs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(
      spec, refs, 3, "tpu")
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_tpu_live(spec, sc, b, qi, ki))
  def _compute():
    v = v_ref[...]
    s = _dot_nt(q_ref[...], k_ref[...]) * spec.scale
    mask = _tpu_masks(spec, qi, ki, vecs)
    s = _where(mask, s, _NEG)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = _where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v)
    m_sc[...] = m_new

  @pl.when(ki == spec.nk - 1)
  def _store():
    out, lse = _finalize(acc_sc[...], m_sc[...], l_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tpu_dq_kernel(*refs, spec: KernelSpec):
  sc, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), vecs, (dq_ref, dq_sc) = _split_refs(
      spec, refs, 6, "tpu")
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(ki == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_tpu_live(spec, sc, b, qi, ki))
  def _compute():
    k = k_ref[...]
    s = _dot_nt(q_ref[...], k) * spec.scale
    mask = _tpu_masks(spec, qi, ki, vecs)
    p = _where(mask, jnp.exp(_where(mask, s, _NEG) - lse_ref[...]), 0.0)
    dp = _dot_nt(do_ref[...], v_ref[...])
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += _dot(ds.astype(k.dtype), k) * spec.scale

  @pl.when(ki == spec.nk - 1)
  def _store():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(*refs, spec: KernelSpec):
  sc, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), vecs, rest = _split_refs(
      spec, refs, 6, "tpu")
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  b, ki, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_tpu_live(spec, sc, b, ki, qi, dkv=True))
  def _compute():
    q, do = q_ref[...], do_ref[...]
    s = _dot_nt(q, k_ref[...]) * spec.scale
    mask = _tpu_masks(spec, qi, ki, vecs)
    p = _where(mask, jnp.exp(_where(mask, s, _NEG) - lse_ref[...]), 0.0)
    dv_sc[...] += _dot(p.astype(do.dtype).T, do)
    dp = _dot_nt(do, v_ref[...])
    ds = p * (dp - delta_ref[...])
    dk_sc[...] += _dot(ds.astype(q.dtype).T, q) * spec.scale

  @pl.when(qi == spec.nq - 1)
  def _store():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _tpu_scalars(spec, aux, dkv: bool = False):
  meta = aux.meta
  scalars = (meta[:, 0], meta[:, 1], meta[:, 2])
  if _is_block(spec):
    scalars += ((aux.col_table if dkv else aux.row_table).reshape(-1),)
  return scalars


def _tpu_vecs(spec, aux):
  if _is_block(spec):
    return (jnp.stack([aux.qg, aux.qb], axis=-1), jnp.stack([aux.kvg, aux.kvv, aux.kvb], axis=1))
  return (aux.qg[:, :, None], aux.kvg[:, None, :], aux.kvv[:, None, :])


def _tpu_vec_specs(spec, q_map, kv_map):
  """BlockSpecs of `_tpu_vecs` from the index maps of a query / key block."""
  bq, bk = spec.block_q, spec.block_kv
  if _is_block(spec):
    return [pl.BlockSpec((None, bq, 2), q_map), pl.BlockSpec((None, 3, bk), kv_map)]
  kvec = pl.BlockSpec((None, 1, bk), kv_map)
  return [pl.BlockSpec((None, bq, 1), q_map), kvec, kvec]


def _tpu_forward(spec, q, k, v, aux):
  B, H = q.shape[:2]
  bq, bk, D = spec.block_q, spec.block_kv, spec.head_dim
  scalars = _tpu_scalars(spec, aux)
  kv_index = lambda b, qi, ki, s: _tpu_fetch(spec, s, b, qi, ki)

  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, qi, ki, *_: (b, h, qi, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D),
                         lambda b, h, qi, ki, *s: (b, h, kv_index(b, qi, ki, s), 0))
  qvec_map = lambda b, h, qi, ki, *_: (b, qi, 0)
  kvec_map = lambda b, h, qi, ki, *s: (b, 0, kv_index(b, qi, ki, s))
  lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, qi, ki, *_: (b, h, qi, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(scalars), grid=(B, H, spec.nq, spec.nk),
      in_specs=[q_spec, kv_spec, kv_spec] + _tpu_vec_specs(spec, qvec_map, kvec_map),
      out_specs=[q_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, D), jnp.float32)])
  o, lse = pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, spec=spec), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, spec.q_len, 1), jnp.float32)],
      compiler_params=_tpu_params(), interpret=spec.interpret_arg,
      name="partition_attention_fwd")(*scalars, q, k, v, *_tpu_vecs(spec, aux))
  return o, lse[..., 0]


def _tpu_backward(spec, q, k, v, aux, lse, delta, do):
  B, H = q.shape[:2]
  bq, bk, D = spec.block_q, spec.block_kv, spec.head_dim
  vecs = _tpu_vecs(spec, aux)
  lse4, delta4 = lse[..., None], delta[..., None]
  scratch = lambda n: pltpu.VMEM((n, D), jnp.float32)

  # dq: grid (B, H, q blocks, kv blocks), kv innermost.
  scalars = _tpu_scalars(spec, aux)
  kv_index = lambda b, qi, ki, s: _tpu_fetch(spec, s, b, qi, ki)
  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, qi, ki, *_: (b, h, qi, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D),
                         lambda b, h, qi, ki, *s: (b, h, kv_index(b, qi, ki, s), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, qi, ki, *_: (b, h, qi, 0))
  qvec_map = lambda b, h, qi, ki, *_: (b, qi, 0)
  kvec_map = lambda b, h, qi, ki, *s: (b, 0, kv_index(b, qi, ki, s))
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars), grid=(B, H, spec.nq, spec.nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
          + _tpu_vec_specs(spec, qvec_map, kvec_map),
          out_specs=q_spec, scratch_shapes=[scratch(bq)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_tpu_params(), interpret=spec.interpret_arg,
      name="partition_attention_dq")(*scalars, q, k, v, do, lse4, delta4, *vecs)

  # dk, dv: grid (B, H, kv blocks, q blocks), q innermost.
  scalars = _tpu_scalars(spec, aux, dkv=True)
  q_index = lambda b, ki, qi, s: _tpu_fetch(spec, s, b, ki, qi, dkv=True)
  q_spec2 = pl.BlockSpec((None, None, bq, D),
                         lambda b, h, ki, qi, *s: (b, h, q_index(b, ki, qi, s), 0))
  kv_spec2 = pl.BlockSpec((None, None, bk, D), lambda b, h, ki, qi, *_: (b, h, ki, 0))
  row_spec2 = pl.BlockSpec((None, None, bq, 1),
                           lambda b, h, ki, qi, *s: (b, h, q_index(b, ki, qi, s), 0))
  qvec_map2 = lambda b, h, ki, qi, *s: (b, q_index(b, ki, qi, s), 0)
  kvec_map2 = lambda b, h, ki, qi, *_: (b, 0, ki)
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars), grid=(B, H, spec.nk, spec.nq),
          in_specs=[q_spec2, kv_spec2, kv_spec2, q_spec2, row_spec2, row_spec2]
          + _tpu_vec_specs(spec, qvec_map2, kvec_map2),
          out_specs=[kv_spec2, kv_spec2], scratch_shapes=[scratch(bk), scratch(bk)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_tpu_params(), interpret=spec.interpret_arg,
      name="partition_attention_dkv")(*scalars, q, k, v, do, lse4, delta4, *vecs)
  return dq, dk, dv


# ----------------------------------------------------------------------------
# GPU (Triton) kernels: one program per (b, h, block), fori_loop over live blocks.
# ----------------------------------------------------------------------------

def _gpu_masks(spec, qs, ks, qg, kvg, kvv, qb=None, kvb=None):
  row = col = None
  if spec.mode == "causal":
    row = (qs + jnp.arange(spec.block_q, dtype=jnp.int32))[:, None]
    col = (ks + jnp.arange(spec.block_kv, dtype=jnp.int32))[None, :]
  blocks = () if qb is None else (qb[:, None], kvb[None, :])
  return _block_mask(spec, qg[:, None], kvg[None, :], kvv[None, :], row, col, *blocks)


def _gpu_loop(spec, sc, outer, body, init, dkv: bool = False):
  """fori_loop of body(inner, carry) over the live inner blocks of `outer`: the range of
  `kv_block_range` / `q_block_range`, or (block kinds) the table row's two ranges, each
  step guarded by its live bit."""
  if _is_block(spec):
    tab = sc[1]

    def guarded(i, carry):
      return lax.cond(_tab_bit(tab, 0, i), lambda c: body(i, c), lambda c: c, carry)

    carry = lax.fori_loop(tab[0], tab[1], guarded, init)
    return lax.fori_loop(tab[2], tab[3], guarded, carry)
  meta = sc[0]
  lo, hi = (q_block_range if dkv else kv_block_range)(spec, outer, meta[0], meta[1], meta[2])
  return lax.fori_loop(lo, hi, body, init)


def _gpu_fwd_kernel(*refs, spec: KernelSpec):
  sc, (q_ref, k_ref, v_ref), vecs, (o_ref, lse_ref) = _split_refs(spec, refs, 3, "gpu")
  qg_ref, kvg_ref, kvv_ref, *b_refs = vecs
  bq, bk = spec.block_q, spec.block_kv
  qi = pl.program_id(2)
  q, qg = q_ref[...], qg_ref[...]
  qb = b_refs[0][...] if b_refs else None

  def body(ki, carry):
    acc, m_prev, l_prev = carry
    ks = ki * bk
    sl = pl.ds(pl.multiple_of(ks, bk), bk)
    v = v_ref[sl, :]
    s = _dot_nt(q, k_ref[sl, :]) * spec.scale
    kvb = b_refs[1][sl] if b_refs else None
    mask = _gpu_masks(spec, qi * bq, ks, qg, kvg_ref[sl], kvv_ref[sl], qb, kvb)
    s = _where(mask, s, _NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = _where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l_new

  init = (jnp.zeros((bq, spec.head_dim), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _gpu_loop(spec, sc, qi, body, init)
  out, lse = _finalize(acc, m[:, None], l[:, None])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _gpu_dq_kernel(*refs, spec: KernelSpec):
  sc, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), vecs, (dq_ref,) = _split_refs(
      spec, refs, 6, "gpu")
  qg_ref, kvg_ref, kvv_ref, *b_refs = vecs
  bq, bk = spec.block_q, spec.block_kv
  qi = pl.program_id(2)
  q, do, qg = q_ref[...], do_ref[...], qg_ref[...]
  qb = b_refs[0][...] if b_refs else None
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(ki, dq):
    ks = ki * bk
    sl = pl.ds(pl.multiple_of(ks, bk), bk)
    k = k_ref[sl, :]
    s = _dot_nt(q, k) * spec.scale
    kvb = b_refs[1][sl] if b_refs else None
    mask = _gpu_masks(spec, qi * bq, ks, qg, kvg_ref[sl], kvv_ref[sl], qb, kvb)
    p = _where(mask, jnp.exp(_where(mask, s, _NEG) - lse), 0.0)
    dp = _dot_nt(do, v_ref[sl, :])
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k) * spec.scale

  dq = _gpu_loop(spec, sc, qi, body, jnp.zeros((bq, spec.head_dim), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(*refs, spec: KernelSpec):
  sc, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), vecs, (dk_ref, dv_ref) = _split_refs(
      spec, refs, 6, "gpu")
  qg_ref, kvg_ref, kvv_ref, *b_refs = vecs
  bq, bk = spec.block_q, spec.block_kv
  ki = pl.program_id(2)
  k, v, kvg, kvv = k_ref[...], v_ref[...], kvg_ref[...], kvv_ref[...]
  kvb = b_refs[1][...] if b_refs else None

  def body(qi, carry):
    dk, dv = carry
    qs = qi * bq
    sl = pl.ds(pl.multiple_of(qs, bq), bq)
    q, do = q_ref[sl, :], do_ref[sl, :]
    s = _dot_nt(q, k) * spec.scale
    qb = b_refs[0][sl] if b_refs else None
    mask = _gpu_masks(spec, qs, ki * bk, qg_ref[sl], kvg, kvv, qb, kvb)
    p = _where(mask, jnp.exp(_where(mask, s, _NEG) - lse_ref[sl][:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype).T, do)
    dp = _dot_nt(do, v)
    ds = p * (dp - delta_ref[sl][:, None])
    dk = dk + _dot(ds.astype(q.dtype).T, q) * spec.scale
    return dk, dv

  zeros = jnp.zeros((bk, spec.head_dim), jnp.float32)
  dk, dv = _gpu_loop(spec, sc, ki, body, (zeros, zeros), dkv=True)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_params(spec):
  return pltr.CompilerParams(num_warps=4 if spec.head_dim <= 64 else 8, num_stages=2)


def _gpu_table(table):
  """[B, n, W] -> [B, n, W'] with W' a power of two (Triton block shapes)."""
  width = table.shape[-1]
  return jnp.pad(table, ((0, 0), (0, 0), (0, (1 << (width - 1).bit_length()) - width)))


def _gpu_scalars(spec, aux, dkv: bool = False):
  """(operands, BlockSpecs) of the GPU scalars: meta [B, 4] (+ the live table row)."""
  ops = [aux.meta]
  specs = [pl.BlockSpec((None, 4), lambda b, h, i: (b, 0))]
  if _is_block(spec):
    table = _gpu_table(aux.col_table if dkv else aux.row_table)
    ops.append(table)
    specs.append(pl.BlockSpec((None, None, table.shape[-1]), lambda b, h, i: (b, i, 0)))
  return ops, specs


def _gpu_vecs(spec, aux):
  vecs = [aux.qg, aux.kvg, aux.kvv]
  if _is_block(spec):
    vecs += [aux.qb, aux.kvb]
  return vecs


def _gpu_forward(spec, q, k, v, aux):
  B, H = q.shape[:2]
  bq, D, Lq, Lk = spec.block_q, spec.head_dim, spec.q_len, spec.kv_len
  sc_ops, sc_specs = _gpu_scalars(spec, aux)
  qvec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
  kvec = pl.BlockSpec((None, Lk), lambda b, h, i: (b, 0))
  vec_specs = [qvec, kvec, kvec] + ([qvec, kvec] if _is_block(spec) else [])
  o, lse = pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, spec=spec), grid=(B, H, spec.nq),
      in_specs=sc_specs + [pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
                           pl.BlockSpec((None, None, Lk, D), lambda b, h, i: (b, h, 0, 0)),
                           pl.BlockSpec((None, None, Lk, D), lambda b, h, i: (b, h, 0, 0))]
      + vec_specs,
      out_specs=[pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, Lq), jnp.float32)],
      compiler_params=_gpu_params(spec), interpret=spec.interpret_arg,
      name="partition_attention_fwd")(*sc_ops, q, k, v, *_gpu_vecs(spec, aux))
  return o, lse


def _gpu_backward(spec, q, k, v, aux, lse, delta, do):
  B, H = q.shape[:2]
  bq, bk, D, Lq, Lk = spec.block_q, spec.block_kv, spec.head_dim, spec.q_len, spec.kv_len
  vecs = _gpu_vecs(spec, aux)
  sc_ops, sc_specs = _gpu_scalars(spec, aux)
  qvec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
  kvec = pl.BlockSpec((None, Lk), lambda b, h, i: (b, 0))
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, spec=spec), grid=(B, H, spec.nq),
      in_specs=sc_specs + [
          pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, Lk, D), lambda b, h, i: (b, h, 0, 0)),
          pl.BlockSpec((None, None, Lk, D), lambda b, h, i: (b, h, 0, 0)),
          pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
          qvec, kvec, kvec] + ([qvec, kvec] if _is_block(spec) else []),
      out_specs=pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_params(spec), interpret=spec.interpret_arg,
      name="partition_attention_dq")(*sc_ops, q, k, v, do, lse, delta, *vecs)
  sc_ops, sc_specs = _gpu_scalars(spec, aux, dkv=True)
  full_q = pl.BlockSpec((None, None, Lq, D), lambda b, h, j: (b, h, 0, 0))
  blk_kv = pl.BlockSpec((None, None, bk, D), lambda b, h, j: (b, h, j, 0))
  full_row = pl.BlockSpec((None, None, Lq), lambda b, h, j: (b, h, 0))
  qvec2 = pl.BlockSpec((None, Lq), lambda b, h, j: (b, 0))
  kvec2 = pl.BlockSpec((None, bk), lambda b, h, j: (b, j))
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, spec=spec), grid=(B, H, spec.nk),
      in_specs=sc_specs + [full_q, blk_kv, blk_kv, full_q, full_row, full_row, qvec2, kvec2,
                           kvec2] + ([qvec2, kvec2] if _is_block(spec) else []),
      out_specs=[blk_kv, blk_kv],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_gpu_params(spec), interpret=spec.interpret_arg,
      name="partition_attention_dkv")(*sc_ops, q, k, v, do, lse, delta, *vecs)
  return dq, dk, dv


# ----------------------------------------------------------------------------
# custom_vjp over the kernels (layout [B, H, L, D]).
# ----------------------------------------------------------------------------

class KernelAux(NamedTuple):
  """Integer operands of one call (see `kernel_operands`); None where a kind needs none."""
  qg: jax.Array              # [B, Lq'] query group ids
  kvg: jax.Array             # [B, Lk'] key group ids
  kvv: jax.Array             # [B, Lk'] key validity (0/1)
  meta: jax.Array            # [B, 4] (q_split, kv_split, kv_length, 0)
  qb: Optional[jax.Array] = None          # [B, Lq'] query block ids (block kinds)
  kvb: Optional[jax.Array] = None         # [B, Lk'] key block ids (block kinds)
  row_table: Optional[jax.Array] = None   # [B, nq, W] live key blocks per query block
  col_table: Optional[jax.Array] = None   # [B, nk, W] live query blocks per key block


def _forward(spec, q, k, v, aux):
  return (_tpu_forward if spec.backend == "tpu" else _gpu_forward)(spec, q, k, v, aux)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_attention(spec, q, k, v, aux):
  return _forward(spec, q, k, v, aux)[0]


def _flash_attention_fwd(spec, q, k, v, aux):
  o, lse = _forward(spec, q, k, v, aux)
  return o, (q, k, v, aux, o, lse)


def _flash_attention_bwd(spec, res, do):
  q, k, v, aux, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)   # [B, H, Lq]
  backward = _tpu_backward if spec.backend == "tpu" else _gpu_backward
  dq, dk, dv = backward(spec, q, k, v, aux, lse, delta, do)
  int_zero = lambda x: np.zeros(x.shape, dtype=jax.dtypes.float0)
  return dq, dk, dv, jax.tree.map(int_zero, aux)


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


# ----------------------------------------------------------------------------
# Entry point from `partition_attention` and the block-count report.
# ----------------------------------------------------------------------------

def _platform() -> str:
  """The platform kernels are built for: `target.compile_target` if set, else JAX's."""
  return target.target_platform()


def default_backend() -> str:
  """Kernel lowering for the target platform (`target.compile_target`, else
  jax.default_backend()): "gpu" -> Triton, else Mosaic (CPU runs it interpreted)."""
  return "gpu" if _platform() == "gpu" else "tpu"


def _interpret_mode(interpret) -> str:
  if interpret is None:
    return "generic" if _platform() == "cpu" else "none"
  if isinstance(interpret, str):
    if interpret not in INTERPRET_MODES:
      raise ValueError(f"interpret must be one of {INTERPRET_MODES}, got {interpret!r}")
    return interpret
  if isinstance(interpret, pltpu.InterpretParams):
    return "tpu"
  return "generic" if interpret else "none"


def make_spec(mask, q_len: int, kv_len: int, head_dim: int, *, block_q: int, block_kv: int,
              backend: Optional[str] = None, interpret=None) -> KernelSpec:
  """KernelSpec for the PADDED problem (`tiling`): spec.q_len / kv_len are padded."""
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"pallas backend must be one of {BACKENDS}, got {backend!r}")
  mode = _interpret_mode(interpret)
  t = tiling(q_len, kv_len, block_q, block_kv, backend=backend, interpret=mode)
  groups = mask.kind in ("same_group", "other_group")
  return KernelSpec(
      mode=mask.kind, use_groups=groups,
      use_kv_valid=(mask.kv_valid is not None or mask.kv_length is not None
                    or t.kv_len != kv_len),
      skip_groups=groups and mask.group_sorted, block_q=t.block_q, block_kv=t.block_kv,
      q_len=t.q_len, kv_len=t.kv_len, head_dim=head_dim, backend=backend, interpret=mode)


def _operands(mask, batch: int, q_len: int, kv_len: int, q_pad: Optional[int] = None,
              kv_pad: Optional[int] = None):
  """int32 qg [B, Lq'], kvg [B, Lk'], kvv [B, Lk'] and meta [B, 4] = (q_split, kv_split,
  kv_length, 0), padded to Lq' = q_pad, Lk' = kv_pad. Padded queries and keys get
  group 1 (consistent with the sorted layout: positions >= the split), padded keys are
  invalid, and kv_length is clamped to the real kv_len (so all-padding key blocks are
  skipped). block_causal reads no groups: every token gets CLEAN_GROUP (the rule of a
  clean query and key), so the block kinds share one tile summary (`tile_alive`)."""
  i32 = jnp.int32
  q_pad = q_len if q_pad is None else q_pad
  kv_pad = kv_len if kv_pad is None else kv_pad
  if mask.kind in ("same_group", "other_group", "block_same_group", "block_other_group"):
    qg = jnp.broadcast_to(mask.q_group.astype(i32), (batch, q_len))
    kvg = jnp.broadcast_to(mask.kv_group.astype(i32), (batch, kv_len))
  elif mask.kind == "block_causal":     # the clean stream alone: every token clean
    qg = jnp.full((batch, q_len), CLEAN_GROUP, i32)
    kvg = jnp.full((batch, kv_len), CLEAN_GROUP, i32)
  else:
    qg, kvg = jnp.zeros((batch, q_len), i32), jnp.zeros((batch, kv_len), i32)
  kvv = jnp.ones((batch, kv_len), bool)
  if mask.kv_valid is not None:
    kvv = kvv & mask.kv_valid
  kv_length = jnp.full((batch,), kv_len, i32)
  if mask.kv_length is not None:
    kv_length = jnp.minimum(jnp.broadcast_to(mask.kv_length.astype(i32), (batch,)), kv_len)
    kvv = kvv & (jnp.arange(kv_len)[None, :] < kv_length[:, None])
  if mask.group_sorted and mask.kind in ("same_group", "other_group"):
    q_split = jnp.broadcast_to(mask.q_split.astype(i32), (batch,))
    kv_split = jnp.broadcast_to(mask.kv_split.astype(i32), (batch,))
  else:
    q_split = jnp.zeros((batch,), i32)
    kv_split = jnp.zeros((batch,), i32)
  meta = jnp.stack([q_split, kv_split, kv_length, jnp.zeros((batch,), i32)], axis=1)
  kvv = kvv.astype(i32)
  if q_pad > q_len:
    qg = jnp.pad(qg, ((0, 0), (0, q_pad - q_len)), constant_values=1)
  if kv_pad > kv_len:
    kvg = jnp.pad(kvg, ((0, 0), (0, kv_pad - kv_len)), constant_values=1)
    kvv = jnp.pad(kvv, ((0, 0), (0, kv_pad - kv_len)), constant_values=0)
  return qg, kvg, kvv, meta


def kernel_operands(mask, batch: int, q_len: int, kv_len: int, spec: KernelSpec) -> KernelAux:
  """The integer operands of one call, padded to the spec's tiling; for the block kinds
  also the block ids (padded with 0) and the live-tile tables (`tile_alive`,
  `_live_table`) of the forward/dq grid (rows = query blocks) and the dk/dv grid
  (rows = key blocks)."""
  qg, kvg, kvv, meta = _operands(mask, batch, q_len, kv_len, spec.q_len, spec.kv_len)
  if not _is_block(spec):
    return KernelAux(qg, kvg, kvv, meta)
  i32 = jnp.int32
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])))
  qb = pad(jnp.broadcast_to(mask.q_block.astype(i32), (batch, q_len)), spec.q_len)
  kvb = pad(jnp.broadcast_to(mask.kv_block.astype(i32), (batch, kv_len)), spec.kv_len)
  alive = tile_alive(spec, qg, qb, kvg, kvb, kvv, q_len)
  return KernelAux(qg, kvg, kvv, meta, qb, kvb, _live_table(alive),
                   _live_table(jnp.swapaxes(alive, 1, 2)))


def pallas_attention(q_BxQxHxD, k_BxKxHxD, v_BxKxHxD, mask, *, block_q: int = 128,
                     block_kv: int = 128, backend: Optional[str] = None, interpret=None):
  """Flash attention with block skipping; same contract as `partition_attention`.

  Any q_len / kv_len: both are padded to the kernel tiling (`tiling`); padded queries
  (group 1) are sliced off the output, padded keys are invalid (never attended), so
  values and gradients are those of the unpadded call.

  backend: "tpu" (Mosaic) | "gpu" (Triton) | None (the target platform:
    `target.compile_target`, else jax.default_backend()).
  interpret: None (interpret iff the target platform is CPU), True/"generic", "tpu" or
    a `pltpu.InterpretParams` (TPU interpreter), False/"none".
  """
  batch, q_len, _, head_dim = q_BxQxHxD.shape
  kv_len = k_BxKxHxD.shape[1]
  spec = make_spec(mask, q_len, kv_len, head_dim, block_q=block_q, block_kv=block_kv,
                   backend=backend, interpret=interpret)
  aux = kernel_operands(mask, batch, q_len, kv_len, spec)
  pad = lambda x, n: x if n == x.shape[1] else jnp.pad(
      x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  to_bhld = lambda x: jnp.swapaxes(x, 1, 2)
  out = _flash_attention(spec, to_bhld(pad(q_BxQxHxD, spec.q_len)),
                         to_bhld(pad(k_BxKxHxD, spec.kv_len)),
                         to_bhld(pad(v_BxKxHxD, spec.kv_len)), aux)
  return to_bhld(out)[:, :q_len]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _live_tiles(mask, batch: int, q_len: int, kv_len: int, spec: KernelSpec):
  aux = kernel_operands(mask, batch, q_len, kv_len, spec)
  if _is_block(spec):
    ki = jnp.arange(spec.nk, dtype=jnp.int32)
    word = jnp.take(aux.row_table[..., 4:], ki // 32, axis=-1)
    return (jnp.right_shift(word, ki % 32) & 1) == 1
  qi = jnp.arange(spec.nq, dtype=jnp.int32)
  lo, hi = jax.vmap(lambda m: jax.vmap(lambda i: kv_block_range(spec, i, m[0], m[1], m[2]))(
      qi))(aux.meta)
  ki = jnp.arange(spec.nk)
  return (ki >= lo[..., None]) & (ki < hi[..., None])


def live_tiles(mask, batch: int, q_len: int, kv_len: int, *, block_q: int, block_kv: int,
               backend: str = "tpu", interpret=True) -> np.ndarray:
  """Bool [B, nq, nk]: the (query block, key block) pairs the kernels compute (forward
  and dq; dk/dv visit the same pairs). Blocks as `tiling` gives them for the backend
  and interpret mode (default: the generic interpreter's, i.e. block_q / block_kv
  rounded to 8)."""
  spec = make_spec(mask, q_len, kv_len, 8, block_q=block_q, block_kv=block_kv,
                   backend=backend, interpret=interpret)
  return np.asarray(_live_tiles(mask, batch, q_len, kv_len, spec))


def block_counts(mask, batch: int, q_len: int, kv_len: int, *, block_q: int,
                 block_kv: int) -> dict:
  """Key blocks the kernels compute vs the dense count (per forward pass; dq and dk/dv
  visit exactly the same (query block, key block) pairs). Every mask kind, the block
  kinds included (`live_tiles`)."""
  spec = make_spec(mask, q_len, kv_len, 8, block_q=block_q, block_kv=block_kv,
                   backend="tpu", interpret=True)
  per_b = live_tiles(mask, batch, q_len, kv_len, block_q=block_q,
                     block_kv=block_kv).sum(axis=(1, 2))
  dense = spec.nq * spec.nk
  computed = int(per_b.sum())
  return {"kind": mask.kind, "block_q": spec.block_q, "block_kv": spec.block_kv,
          "computed": computed, "dense": dense * batch,
          "fraction": computed / (dense * batch), "per_example": per_b.tolist()}


def block_count_report(group_BxL, *, block_q: int, block_kv: int, kv_length_B=None,
                       block_len: Optional[int] = None) -> dict:
  """Computed / dense block counts for each mask kind of one partition (sorted layout).

  same_group / other_group: the training masks of `group_BxL` after `sort_by_group`.
  packed: inference, keys valid below kv_length_B (default: the group-0 count, i.e. the
  clean tokens packed first).
  block_len (the block PGM): also the block kinds in their training layout
  (`masks.block_training_masks`): block_same_group (encoder, 2L x 2L), block_other_group
  (decoder, L x 2L) and block_causal (clean stream, L x L), each with the expected alive
  fraction of its pairs (`masks.block_alive_fraction`) next to the computed tiles.
  """
  group_BxL = jnp.asarray(group_BxL, jnp.int32)
  batch, length = group_BxL.shape
  layout = sort_by_group(group_BxL)
  sorted_g = jnp.take_along_axis(group_BxL, layout.perm, axis=1)
  report = {}
  for kind in ("same_group", "other_group"):
    mask = AttentionMask.sorted_groups(kind, sorted_g, layout.split)
    report[kind] = block_counts(mask, batch, length, length, block_q=block_q,
                                block_kv=block_kv)
  lengths = layout.split if kv_length_B is None else jnp.asarray(kv_length_B, jnp.int32)
  report["packed"] = block_counts(AttentionMask.packed(lengths, length), batch, length, length,
                                  block_q=block_q, block_kv=block_kv)
  report["full"] = block_counts(AttentionMask(), batch, length, length, block_q=block_q,
                                block_kv=block_kv)
  if block_len is not None:
    block_masks = masks.block_training_masks(group_BxL, block_len)
    for name, (mq, mk) in (("encoder", (2, 2)), ("decoder", (1, 2)), ("clean", (1, 1))):
      mask = block_masks[name]
      counts = block_counts(mask, batch, mq * length, mk * length, block_q=block_q,
                            block_kv=block_kv)
      counts["alive_fraction"] = masks.block_alive_fraction(mask.kind, length, block_len)
      report[mask.kind] = counts
  return report


__all__ = ["KernelSpec", "Tiling", "tiling", "check_block_sizes", "pallas_attention", "block_counts",
           "block_count_report", "kv_block_range", "q_block_range", "default_backend",
           "BACKENDS", "live_tiles", "tile_alive", "kernel_operands", "KernelAux"]
