"""Pallas partition attention vs the dense XLA oracle; sorted layout; PGM train step.

All kernels run in interpret mode on CPU inside jit (TPU-lowering kernels with the
generic interpreter and, in a few cases, the TPU interpreter `pltpu.InterpretParams`;
GPU-lowering (Triton) kernels with the generic interpreter). A separate test lowers
the kernels for real TPU (Mosaic) and CUDA (Triton) without running them.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from conftest import load_config
from pgm_jax import experiment, objectives
from pgm_jax.models import pgm as pgm_mod
from pgm_jax.ops import AttentionMask, partition_attention, permute, sort_by_group
from pgm_jax.ops import masks
from pgm_jax.ops import pallas_attention as pa
from pgm_jax.ops.attention import _xla_attention

RTOL = 1e-5   # relative error (Frobenius norm) vs the dense oracle, float32


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def partitions(length, block, rng):
  """[6, L] 0/1 groups: uniform, all 0, all 1 (empty groups), split off block boundaries,
  mostly 0, mostly 1."""
  g = [rng.integers(0, 2, length), np.zeros(length, int), np.ones(length, int)]
  off = np.ones(length, int)
  off[rng.permutation(length)[:block + 3]] = 0          # split = block + 3
  g += [off, (rng.random(length) < 0.1).astype(int), (rng.random(length) < 0.9).astype(int)]
  return np.stack(g)


def sorted_mask(kind, groups_BxL, valid=None):
  layout = sort_by_group(jnp.asarray(groups_BxL))
  g = permute(jnp.asarray(groups_BxL, jnp.int32), layout.perm)
  return AttentionMask.sorted_groups(kind, g, layout.split, valid)


def qkv(rng, b, lq, lk, h, d, dtype=jnp.float32):
  q = jnp.asarray(rng.normal(size=(b, lq, h, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, lk, h, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, lk, h, d)), dtype)
  ct = jnp.asarray(rng.normal(size=(b, lq, h, d)), jnp.float32)
  return q, k, v, ct


@functools.partial(jax.jit, static_argnames=("attn",))
def _value_and_grads(q, k, v, ct, mask, attn):
  def loss(q, k, v):
    out = attn(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * ct), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def check_against_oracle(q, k, v, ct, mask, **kernel_kwargs):
  attn = functools.partial(pa.pallas_attention, **kernel_kwargs)
  out, grads = _value_and_grads(q, k, v, ct, mask, attn)
  ref_out, ref_grads = _value_and_grads(q, k, v, ct, mask, _xla_attention)
  assert rel_err(out, ref_out) < RTOL
  for name, g, r in zip("qkv", grads, ref_grads):
    assert rel_err(g, r) < RTOL, f"d{name}: {rel_err(g, r)}"
  return out, grads


# ----------------------------------------------------------------------------
# Sorted layout.
# ----------------------------------------------------------------------------

def test_sort_by_group_layout():
  rng = np.random.default_rng(0)
  g = partitions(50, 8, rng)
  lay = sort_by_group(jnp.asarray(g))
  perm, inv, split = map(np.asarray, (lay.perm, lay.inv, lay.split))
  for b in range(g.shape[0]):
    np.testing.assert_array_equal(perm[b], np.argsort(g[b], kind="stable"))   # stable
    np.testing.assert_array_equal(perm[b][inv[b]], np.arange(50))
    np.testing.assert_array_equal(g[b][perm[b]], np.arange(50) >= split[b])
  np.testing.assert_array_equal(np.asarray(lay.positions), perm)
  x = jnp.asarray(rng.normal(size=(6, 50, 3)))
  np.testing.assert_array_equal(permute(permute(x, lay.perm), lay.inv), x)
  # Same-group mask in sorted layout == block diagonal by the split point.
  m = sorted_mask("same_group", g).dense(50, 50)
  i = np.arange(50)
  for b in range(g.shape[0]):
    s = split[b]
    np.testing.assert_array_equal(np.asarray(m[b]), (i[:, None] < s) == (i[None, :] < s))


# ----------------------------------------------------------------------------
# Kernels vs the dense oracle.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,kind,length,bq,bk,d,padded", [
    ("tpu", "same_group", 64, 16, 16, 32, False),
    ("tpu", "other_group", 64, 16, 32, 32, True),
    ("tpu", "other_group", 96, 32, 16, 32, False),    # 3 x 6 blocks, not a power of two
    ("gpu", "same_group", 64, 32, 16, 32, True),
    ("gpu", "other_group", 128, 16, 16, 64, False),
])
@pytest.mark.slow
def test_sorted_group_kernels_match_oracle(backend, kind, length, bq, bk, d, padded):
  rng = np.random.default_rng(length + bq + bk)
  g = partitions(length, bq, rng)
  valid = None
  if padded:   # padding positions, scattered after sorting
    valid = jnp.asarray(rng.random(g.shape) < 0.8)
  mask = sorted_mask(kind, g, valid)
  q, k, v, ct = qkv(rng, g.shape[0], length, length, 2, d)
  out, grads = check_against_oracle(q, k, v, ct, mask, block_q=bq, block_kv=bk,
                                    backend=backend, interpret=True)
  # Empty rows (other_group with everything in one group: examples 1 and 2) are exactly 0
  # and so are all their gradients.
  if kind == "other_group":
    for b in (1, 2):
      assert np.all(np.asarray(out[b]) == 0.0)
      for grad in grads:
        assert np.all(np.asarray(grad[b]) == 0.0)


@pytest.mark.parametrize("backend,kind", [("tpu", "same_group"), ("gpu", "other_group")])
def test_unsorted_groups_are_still_correct(backend, kind):
  """Arbitrary group ids (not sorted, not 0/1): elementwise masks, no group skipping."""
  rng = np.random.default_rng(7)
  g = jnp.asarray(rng.integers(0, 3, (3, 64)))
  mask = AttentionMask(kind, g, g, jnp.asarray(rng.random((3, 64)) < 0.9))
  assert not pa.make_spec(mask, 64, 64, 32, block_q=16, block_kv=16).skip_groups
  q, k, v, ct = qkv(rng, 3, 64, 64, 2, 32)
  check_against_oracle(q, k, v, ct, mask, block_q=16, block_kv=32, backend=backend,
                       interpret=True)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_packed_kernel_matches_oracle(backend):
  """full + kv_length (packed inference), cross attention with Lq != Lk, length 0 and L."""
  rng = np.random.default_rng(3)
  lq, lk = 32, 64
  lengths = jnp.asarray([0, 64, 17, 32, 1], jnp.int32)
  mask = AttentionMask.packed(lengths, lk)
  q, k, v, ct = qkv(rng, 5, lq, lk, 2, 32)
  out, grads = check_against_oracle(q, k, v, ct, mask, block_q=16, block_kv=16,
                                    backend=backend, interpret=True)
  assert np.all(np.asarray(out[0]) == 0.0) and np.all(np.asarray(grads[0][0]) == 0.0)
  # Keys beyond the length get exactly zero gradient.
  assert np.all(np.asarray(grads[1][2, 17:]) == 0.0)
  assert np.all(np.asarray(grads[2][2, 17:]) == 0.0)


def test_causal_and_full_kernels_match_oracle():
  rng = np.random.default_rng(5)
  q, k, v, ct = qkv(rng, 2, 64, 64, 2, 32)
  check_against_oracle(q, k, v, ct, AttentionMask("causal"), block_q=16, block_kv=32,
                       backend="tpu", interpret=True)
  check_against_oracle(q, k, v, ct, AttentionMask("full"), block_q=32, block_kv=16,
                       backend="gpu", interpret=True)


@pytest.mark.parametrize("kind", ["other_group", "packed", "block_other_group"])
@pytest.mark.slow
def test_tpu_interpreter(kind):
  """The Mosaic kernels under the stricter TPU interpreter (scalar prefetch in SMEM,
  VMEM scratch, uninitialised memory = NaN). block_other_group: the block PGM decoder
  (32 queries, 64 keys padded to 128, b = 4; the live table in SMEM, stacked vectors)."""
  rng = np.random.default_rng(11)
  length = 64
  q_len = length
  if kind == "packed":
    mask = AttentionMask.packed(jnp.asarray([0, 40], jnp.int32), length)
  elif kind == "block_other_group":
    q_len = length // 2
    mask = masks.block_training_masks(jnp.asarray(partitions(q_len, 4, rng)[[0, 1]]),
                                      4)["decoder"]
  else:
    mask = sorted_mask(kind, partitions(length, 16, rng)[[0, 3]])
  q, k, v, ct = qkv(rng, 2, q_len, length, 1, 32)
  check_against_oracle(q, k, v, ct, mask, block_q=16, block_kv=32, backend="tpu",
                       interpret=pltpu.InterpretParams())


def test_bfloat16_inputs_close_to_oracle():
  rng = np.random.default_rng(2)
  mask = sorted_mask("same_group", partitions(64, 16, rng)[:2])
  q, k, v, ct = qkv(rng, 2, 64, 64, 2, 32, jnp.bfloat16)
  attn = functools.partial(pa.pallas_attention, block_q=16, block_kv=16, backend="tpu",
                           interpret=True)
  out, grads = _value_and_grads(q, k, v, ct, mask, attn)
  ref_out, ref_grads = _value_and_grads(q, k, v, ct, mask, _xla_attention)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert rel_err(out, ref_out) < 1e-2
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 2e-2


def test_kernels_lower_for_tpu_and_cuda():
  """Mosaic TPU and Triton lowering (to MLIR, no hardware): forward + backward."""
  b, length, h, d = 2, 256, 2, 64
  x = jnp.zeros((b, length, h, d), jnp.bfloat16)
  mask = sorted_mask("other_group", np.zeros((b, length), int))
  for backend, platform, block in (("tpu", "tpu", 128), ("gpu", "cuda", 64)):
    def loss(q, k, v):
      out = pa.pallas_attention(q, k, v, mask, block_q=block, block_kv=block, backend=backend,
                                interpret=False)
      return jnp.sum(out.astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" if backend == "tpu" else "triton") in text


# ----------------------------------------------------------------------------
# Block skipping: exact, and about half at a balanced split.
# ----------------------------------------------------------------------------

def _live_pairs(mask, length, bq, bk, batch):
  spec = pa.make_spec(mask, length, length, 8, block_q=bq, block_kv=bk, interpret=True)
  _, _, _, meta = pa._operands(mask, batch, length, length)
  meta = np.asarray(meta)
  fwd = np.zeros((batch, spec.nq, spec.nk), bool)
  bwd = np.zeros_like(fwd)
  for b in range(batch):
    for i in range(spec.nq):
      lo, hi = pa.kv_block_range(spec, jnp.int32(i), *meta[b, :3])
      fwd[b, i, int(lo):int(hi)] = True
    for j in range(spec.nk):
      lo, hi = pa.q_block_range(spec, jnp.int32(j), *meta[b, :3])
      bwd[b, int(lo):int(hi), j] = True
  return fwd, bwd


@pytest.mark.parametrize("kind", ["same_group", "other_group", "packed"])
def test_skipped_blocks_are_exactly_the_empty_ones(kind):
  rng = np.random.default_rng(1)
  length, bq, bk = 48, 8, 16
  g = partitions(length, bq, rng)
  if kind == "packed":
    mask = AttentionMask.packed(jnp.asarray([0, 5, 16, 17, 47, 48]), length)
  else:
    mask = sorted_mask(kind, g)
  dense = np.asarray(mask.dense(length, length))
  any_allowed = dense.reshape(6, length // bq, bq, length // bk, bk).any(axis=(2, 4))
  fwd, bwd = _live_pairs(mask, length, bq, bk, 6)
  np.testing.assert_array_equal(fwd, any_allowed)   # never skips an allowed pair, tight
  np.testing.assert_array_equal(bwd, any_allowed)   # dk/dv visit the same pairs
  counts = pa.block_counts(mask, 6, length, length, block_q=bq, block_kv=bk)
  assert counts["computed"] == any_allowed.sum()


def test_block_count_report_near_half():
  rng = np.random.default_rng(0)
  g = rng.integers(0, 2, (16, 1024))            # each token in group 1 with p = 1/2
  report = pa.block_count_report(g, block_q=128, block_kv=128)
  assert report["full"]["fraction"] == 1.0
  for kind in ("same_group", "other_group"):
    assert 0.45 <= report[kind]["fraction"] <= 0.65, report[kind]
  assert 0.45 <= report["packed"]["fraction"] <= 0.65   # packed length ~ L / 2


# ----------------------------------------------------------------------------
# Block kinds (the block PGM): training layout [partition; clean] and the sampler's cache.
# ----------------------------------------------------------------------------

# (query length, key length) of each training-layout mask, in units of L.
BLOCK_SHAPES = {"encoder": (2, 2), "decoder": (1, 2), "clean": (1, 1)}


def _concat_masks(masks):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *masks)


def block_training_batch(length, block_lens, rng, valid=None):
  """Training-layout masks (`block_training_masks`) for a batch whose example i has block
  length block_lens[i] and the i-th partition of `partitions` (uniform, all 0, all 1,
  split off the tiles, mostly 0, mostly 1, then uniform again)."""
  g = partitions(length, 16, rng)
  g = np.concatenate([g, rng.integers(0, 2, (len(block_lens), length))])[:len(block_lens)]
  if valid is None:
    valid = np.ones(g.shape, bool)
  per = [masks.block_training_masks(jnp.asarray(g[i:i + 1]), b, jnp.asarray(valid[i:i + 1]))
         for i, b in enumerate(block_lens)]
  return {name: _concat_masks([m[name] for m in per]) for name in BLOCK_SHAPES}


def check_empty_rows_and_keys(mask, q_len, kv_len, out, grads):
  """Queries with no allowed key: output and dq exactly 0; keys no query sees: dk, dv 0.
  Returns the number of empty query rows."""
  dense = np.asarray(mask.dense(q_len, kv_len))
  empty_q, dead_k = ~dense.any(axis=2), ~dense.any(axis=1)
  assert np.all(np.asarray(out)[empty_q] == 0.0)
  assert np.all(np.asarray(grads[0])[empty_q] == 0.0)
  for g in grads[1:]:
    assert np.all(np.asarray(g)[dead_k] == 0.0)
  return int(empty_q.sum())


def test_block_alive_fraction_matches_monte_carlo():
  """`block_alive_fraction` (closed form) vs the mean of `AttentionMask.dense` over
  partitions drawn as in training (t ~ U[0, 1], each token in group 1 with probability t),
  including a block length that does not divide L (5); and its b | L closed forms."""
  rng = np.random.default_rng(0)
  n, length = 4000, 16
  for b in (1, 4, 5, 16):
    t = rng.random((n, 1))
    g = jnp.asarray((rng.random((n, length)) < t).astype(np.int32))
    enc = masks.block_training_masks(g[:2], b)["encoder"]     # the layout [partition; clean]
    np.testing.assert_array_equal(enc.q_block[1], np.tile(np.arange(length) // b, 2))
    np.testing.assert_array_equal(enc.kv_group[1], np.r_[g[1], np.full(length, 2)])
    for name, kind in (("encoder", "block_same_group"), ("decoder", "block_other_group"),
                       ("clean", "block_causal")):
      mq, mk = BLOCK_SHAPES[name]
      dense = masks.block_training_masks(g, b)[name].dense(mq * length, mk * length)
      mc = float(np.asarray(dense).mean())
      assert abs(masks.block_alive_fraction(kind, length, b) - mc) < 4e-3, (b, kind)
  for length, b in ((1024, 16), (64, 1), (64, 64)):
    f = lambda kind: masks.block_alive_fraction(kind, length, b)
    assert f("block_same_group") == pytest.approx(0.25 + (2 * b + 1) / (12 * length))
    assert f("block_other_group") == pytest.approx((length - b) / (4 * length)
                                                   + (b - 1) / (6 * length))
    assert f("block_causal") == pytest.approx((length + b) / (2 * length))
  with pytest.raises(ValueError, match="kind"):
    masks.block_alive_fraction("same_group", 16, 4)


@pytest.mark.parametrize("backend,name,length,padded", [
    ("tpu", "encoder", 32, True),      # kv_valid padding in two examples
    ("tpu", "decoder", 32, False),
    ("tpu", "clean", 32, True),
    ("gpu", "encoder", 20, False),     # 2L = 40 -> Triton tiles 16, padded to 48
    pytest.param("gpu", "decoder", 20, True, marks=pytest.mark.slow),
])
def test_block_kinds_training_layout_match_oracle(backend, name, length, padded):
  """Block kinds in the training layout, one batch covering b in {1, 4, 16, L} and
  partitions with empty groups: forward and dq/dk/dv == the dense oracle; rows with no
  allowed key are exactly 0 with zero gradients."""
  rng = np.random.default_rng(length + len(name))
  block_lens = [1, 4, 16, length, 4, 16, 1, length]
  valid = np.ones((len(block_lens), length), bool)
  if padded:
    valid[0, length - 5:] = False                  # trailing padding
    valid[3] = rng.random(length) < 0.8            # scattered
  mask = block_training_batch(length, block_lens, rng, valid)[name]
  mq, mk = BLOCK_SHAPES[name]
  q_len, kv_len = mq * length, mk * length
  q, k, v, ct = qkv(rng, len(block_lens), q_len, kv_len, 1, 16)
  out, grads = check_against_oracle(q, k, v, ct, mask, block_q=16, block_kv=16,
                                    backend=backend, interpret=True)
  empty = check_empty_rows_and_keys(mask, q_len, kv_len, out, grads)
  if name == "decoder":     # all-0 / all-1 partitions: nothing of the other group
    assert empty > 0


def sampling_batch(length, b, kind):
  """Sampler step with a KV cache: keys = [L cache slots (clean, block slot // b);
  b current-block tokens (group 0, block k)], queries = b tokens. Examples (k, cache):
    0. k = 2, cache slots < 2b valid via kv_valid (the current tokens valid);
    1. k = 0, empty cache;
    2. k = 3, cache of 2b + 3 slots (ragged), kv_valid;
    3. packed via kv_length: cache slots < 2b, the current tokens right after them
       (keys 2b .. 3b - 1), kv_length = 3b (later slots junk);
    4. the clean pass of the just-finished block k = 1 (clean queries), kv_length = 2b.
  Query groups: 0 (encoder, block_same_group) or 1 (decoder, block_other_group); the
  clean pass queries are clean (group 2)."""
  i32 = np.int32
  kv_len = length + b
  slot = np.arange(length)
  q_group = 0 if kind == "block_same_group" else 1
  rows = []
  for k, n_cached, packed, clean in ((2, 2 * b, False, False), (0, 0, False, False),
                                     (3, 2 * b + 3, False, False), (2, 2 * b, True, False),
                                     (1, 2 * b, False, True)):
    kv_group = np.concatenate([np.full(length, 2), np.zeros(b)]).astype(i32)
    kv_block = np.concatenate([slot // b, np.full(b, k)]).astype(i32)
    valid = np.concatenate([slot < n_cached, np.ones(b, bool)])
    kv_length = kv_len
    if packed:    # current tokens at n_cached .. n_cached + b - 1
      kv_group[n_cached:n_cached + b], kv_block[n_cached:n_cached + b] = 0, k
      kv_length = n_cached + b
      valid = np.ones(kv_len, bool)
    if clean:
      kv_length = n_cached
    rows.append((np.full(b, 2 if clean else q_group, i32), kv_group, np.full(b, k, i32),
                 kv_block, valid, kv_length))
  qg, kvg, qb, kvb, valid, kvl = (jnp.asarray(np.stack(x)) for x in zip(*rows))
  return AttentionMask(kind, q_group=qg, kv_group=kvg, kv_valid=valid,
                       kv_length=kvl.astype(jnp.int32), q_block=qb, kv_block=kvb)


@pytest.mark.parametrize("kind", ["block_same_group",
                                  pytest.param("block_other_group", marks=pytest.mark.slow)])
def test_block_kinds_sampling_with_cache_match_oracle(kind):
  """The sampler's cached step (see `sampling_batch`): L = 64 cache slots, b = 8 current
  tokens (72 keys, padded to 80 by blocks 16): forward and gradients == the dense oracle,
  and cache tiles beyond the cached slots are skipped."""
  length, b = 64, 8
  rng = np.random.default_rng(9)
  mask = sampling_batch(length, b, kind)
  q, k, v, ct = qkv(rng, 5, b, length + b, 2, 16)
  out, grads = check_against_oracle(q, k, v, ct, mask, block_q=16, block_kv=16,
                                    backend="tpu", interpret=True)
  check_empty_rows_and_keys(mask, b, length + b, out, grads)
  live = pa.live_tiles(mask, 5, b, length + b, block_q=16, block_kv=16)
  # 5 key tiles: cache slots 0-15, 16-31, 32-47, 48-63, current tokens 64-71 (+ padding).
  np.testing.assert_array_equal(live[:, 0], [[1, 0, 0, 0, 1],     # blocks 0, 1 + current
                                             [0, 0, 0, 0, 1],     # empty cache
                                             [1, 1, 0, 0, 1],     # 19 slots
                                             [1, 1, 0, 0, 0],     # packed in 0..23
                                             [1, 0, 0, 0, 0]])    # clean pass, block <= 1


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _tiles_and_tables(mask, batch, q_len, kv_len, t):
  """(tiles holding an allowed pair [B, nq, nk], the kernels' row and column tables)."""
  nq, nk = q_len // t, kv_len // t
  allowed = mask.dense(q_len, kv_len).reshape(batch, nq, t, nk, t).any(axis=(2, 4))
  spec = pa.make_spec(mask, q_len, kv_len, 8, block_q=t, block_kv=t, interpret=True)
  aux = pa.kernel_operands(mask, batch, q_len, kv_len, spec)
  return allowed, aux.row_table, aux.col_table


def _table_bits(table, n):
  """Live bits [B, rows, n] of a kernel table (ranges, then 32 bits per word)."""
  bits = (np.asarray(table)[..., 4:, None] >> np.arange(32)) & 1
  return bits.reshape(*table.shape[:2], -1)[..., :n] == 1


def test_block_kinds_skip_only_empty_tiles():
  """Training layout, L = 64, tiles 16: the computed tiles (`live_tiles`; the dk/dv
  table is its transpose; both inside their two fetch ranges) are exactly the tiles
  holding an allowed pair (never fewer), and fewer than dense for b < L. For b = L the
  encoder's partition-partition quadrant is one full block (every tile computed), as is
  the clean quadrant, and no partition-clean or clean-partition tile is computed."""
  length, t, batch = 64, 16, 6
  rng = np.random.default_rng(4)
  for b in (1, 4, 16, 64):
    for name, mask in block_training_batch(length, [b] * batch, rng).items():
      mq, mk = BLOCK_SHAPES[name]
      q_len, kv_len = mq * length, mk * length
      allowed, rows, cols = map(np.asarray, _tiles_and_tables(mask, batch, q_len, kv_len, t))
      live = pa.live_tiles(mask, batch, q_len, kv_len, block_q=t, block_kv=t)
      np.testing.assert_array_equal(live, allowed, err_msg=f"{name} b={b}")
      for table, want in ((rows, live), (cols, live.swapaxes(1, 2))):
        n = want.shape[2]
        np.testing.assert_array_equal(_table_bits(table, n), want)
        j = np.arange(n)
        lo1, hi1, lo2, hi2 = (table[..., i, None] for i in range(4))
        assert np.all(~want | ((j >= lo1) & (j < hi1)) | ((j >= lo2) & (j < hi2)))
        assert np.all((lo1 <= hi1) & (hi1 <= lo2) & (lo2 <= hi2))
      counts = pa.block_counts(mask, batch, q_len, kv_len, block_q=t, block_kv=t)
      assert counts["computed"] == live.sum()
      assert counts["computed"] < counts["dense"] or b == length, (name, b)
      if b == length and name == "encoder":
        h = length // t
        assert live[:, :h, :h].all() and live[:, h:, h:].all()     # the two full blocks
        assert not live[:, :h, h:].any() and not live[:, h:, :h].any()


def test_block_count_report_of_the_block_pgm():
  """`block_count_report(..., block_len=16)` at L = 1024, tiles 128: the block kinds in
  the training layout compute far fewer tiles than dense (encoder 80 of 256 tiles: the
  partition diagonal + the clean prefix; decoder 44 / 128; clean stream 36 / 64)."""
  rng = np.random.default_rng(0)
  g = rng.integers(0, 2, (2, 1024))
  report = pa.block_count_report(g, block_q=128, block_kv=128, block_len=16)
  assert report["block_same_group"]["per_example"] == [80, 80]
  assert report["block_other_group"]["per_example"] == [44, 44]
  assert report["block_causal"]["per_example"] == [36, 36]
  for kind in masks.BLOCK_MASKS:
    assert report[kind]["alive_fraction"] == masks.block_alive_fraction(kind, 1024, 16)


def test_block_kernels_lower_for_tpu_and_cuda():
  """Mosaic TPU and Triton lowering (to MLIR, no hardware) of the block kinds' forward +
  backward (scalar-prefetch live table, two guarded loops)."""
  b, length, h, d = 2, 128, 2, 64
  enc = masks.block_training_masks(jnp.zeros((b, length), jnp.int32), 16)["encoder"]
  x = jnp.zeros((b, 2 * length, h, d), jnp.bfloat16)
  for backend, platform, block in (("tpu", "tpu", 128), ("gpu", "cuda", 64)):
    def loss(q, k, v):
      out = pa.pallas_attention(q, k, v, enc, block_q=block, block_kv=block, backend=backend,
                                interpret=False)
      return jnp.sum(out.astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" if backend == "tpu" else "triton") in text


# ----------------------------------------------------------------------------
# The op: impl, block-size validation.
# ----------------------------------------------------------------------------

def test_op_impls_and_block_size_errors():
  x = jnp.zeros((1, 64, 1, 8))
  mask = AttentionMask()
  for bad in (0, -8, 1.5, "128", True):
    with pytest.raises(ValueError, match="config.attn.block_q"):
      partition_attention(x, x, x, mask, impl="pallas", block_q=bad)
  with pytest.raises(ValueError, match="config.attn.block_kv"):
    partition_attention(x, x, x, mask, impl="auto", block_kv=0)
  with pytest.raises(ValueError, match="config.attn.block_kv"):
    pa.check_block_sizes(64, 256, 64, -1)
  with pytest.raises(ValueError, match="config.attn.impl"):
    partition_attention(x, x, x, mask, impl="triton")
  # Every shape is served: blocks are upper bounds, rounded to the hardware tile, and
  # the lengths padded to a multiple of them.
  t = lambda *a, **k: tuple(pa.tiling(*a, **k))
  assert pa.check_block_sizes(64, 16, 128, 128) == (64, 16)
  assert t(7, 24, 128, 128, backend="tpu", interpret=False) == (8, 128, 8, 128)
  assert t(192, 192, 128, 128, backend="tpu", interpret=False) == (96, 128, 192, 256)
  assert t(64, 256, 64, 64, backend="tpu", interpret=False) == (64, 128, 64, 256)
  assert t(7, 24, 128, 128, backend="gpu", interpret=False) == (16, 32, 16, 32)
  assert t(96, 192, 48, 128, backend="gpu", interpret=False) == (64, 128, 128, 256)
  assert t(7, 24, 128, 128, backend="tpu", interpret=True) == (8, 24, 8, 24)
  assert t(7, 24, 4, 16, backend="tpu", interpret=True) == (8, 16, 8, 32)
  if jax.default_backend() == "cpu":
    from pgm_jax.ops import resolve_impl
    assert resolve_impl("auto") == "xla"


# ----------------------------------------------------------------------------
# Padding inside the op: awkward lengths (sampler query counts, encoder buckets).
# ----------------------------------------------------------------------------

def _op(impl, **kw):
  return lambda q, k, v, m: partition_attention(q, k, v, m, impl=impl, **kw)


@pytest.mark.parametrize("lq,lk,bq,bk", [(7, 24, 128, 128), (8, 48, 128, 16), (7, 24, 4, 16)])
@pytest.mark.slow
def test_op_pads_sampler_shapes(lq, lk, bq, bk):
  """The op with impl=pallas (TPU lowering, interpreted) at the sampler's decode shapes:
  7 or 8 queries against packed keys (kv_length 0, short, full), blocks that do not
  tile the lengths: forward and dq/dk/dv == the dense oracle."""
  rng = np.random.default_rng(lq * lk)
  q, k, v, ct = qkv(rng, 3, lq, lk, 2, 16)
  mask = AttentionMask.packed(jnp.asarray([0, 5, lk], jnp.int32), lk)
  out, grads = _value_and_grads(q, k, v, ct, mask, _op("pallas", block_q=bq, block_kv=bk))
  ref_out, ref_grads = _value_and_grads(q, k, v, ct, mask, _xla_attention)
  assert out.shape == ref_out.shape and rel_err(out, ref_out) < RTOL
  for name, g, r in zip("qkv", grads, ref_grads):
    assert g.shape == r.shape and rel_err(g, r) < RTOL, f"d{name}: {rel_err(g, r)}"
  assert np.all(np.asarray(out[0]) == 0.0)


@pytest.mark.parametrize("backend,kind,length,interpret", [
    ("tpu", "same_group", 40, True),      # generic interpreter: 40 -> 48 (blocks 16)
    ("tpu", "other_group", 192, "tpu"),   # TPU interpreter, TPU tiles: keys 192 -> 256
    ("gpu", "other_group", 192, True),    # Triton tiles: 192 -> 256 (queries and keys)
])
@pytest.mark.slow
def test_sorted_groups_with_padding(backend, kind, length, interpret):
  """Sorted-layout group masks at lengths the blocks do not tile: padded queries and
  keys join group 1 (after the split), so block skipping stays exact; padded keys are
  invalid. Includes empty groups and scattered padding (kv_valid)."""
  rng = np.random.default_rng(length)
  g = partitions(length, 16, rng)[[0, 1, 3]]
  valid = jnp.asarray(rng.random(g.shape) < 0.9)
  mask = sorted_mask(kind, g, valid)
  block = 16 if length == 40 else 128
  interp = pltpu.InterpretParams() if interpret == "tpu" else interpret
  spec = pa.make_spec(mask, length, length, 32, block_q=block, block_kv=block, backend=backend,
                      interpret=interp)
  assert spec.kv_len > length and spec.use_kv_valid
  q, k, v, ct = qkv(rng, 3, length, length, 1, 32)
  check_against_oracle(q, k, v, ct, mask, block_q=block, block_kv=block, backend=backend,
                       interpret=interp)


def test_auto_resolves_for_the_compile_target(caplog):
  """`auto` under compile_target("gpu"/"tpu") picks the kernel (interpret off) and serves
  the sampler's 7 queries by padding (no ValueError); a call the kernel cannot serve
  (Triton needs a power-of-two head_dim) falls back to XLA with one logged reason."""
  from pgm_jax.ops import compile_target, resolve_impl, target_platform
  q7 = jnp.zeros((2, 7, 2, 16), jnp.bfloat16)
  k = jnp.zeros((2, 24, 2, 16), jnp.bfloat16)
  mask = AttentionMask.packed(jnp.asarray([3, 24], jnp.int32), 24)

  def loss(q, k, v):
    return jnp.sum(partition_attention(q, k, v, mask, impl="auto").astype(jnp.float32))

  for platform, marker in (("gpu", "triton"), ("tpu", "tpu_custom_call")):
    with compile_target(platform):
      assert target_platform() == platform and resolve_impl("auto") == "pallas"
      assert pa.default_backend() == platform and pa._interpret_mode(None) == "none"
      lowering = "cuda" if platform == "gpu" else "tpu"
      text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q7, k, k).lower(
          lowering_platforms=(lowering,)).as_text()
      assert marker in text
  assert target_platform() == jax.default_backend()     # outside: as before
  with pytest.raises(ValueError, match="compile_target"):
    with compile_target("cuda"):
      pass
  q_odd = jnp.zeros((2, 7, 2, 24), jnp.float32)
  k_odd = jnp.zeros((2, 24, 2, 24), jnp.float32)
  with compile_target("gpu"), caplog.at_level("WARNING"):
    for _ in range(2):
      text = jax.jit(lambda q, k: partition_attention(q, k, k, mask, impl="auto")).trace(
          q_odd, k_odd).lower(lowering_platforms=("cuda",)).as_text()
      assert "triton" not in text
    with pytest.raises(ValueError, match="head_dim"):
      partition_attention(q_odd, k_odd, k_odd, mask, impl="pallas")
  assert sum("dense XLA path" in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------------------------
# The PGM model and train step.
# ----------------------------------------------------------------------------

def tiny_setup(**overrides):
  cfg = load_config("shakespeare", "tiny")
  cfg.model.dropout = 0.0
  cfg.model.dtype = "float32"
  cfg.attn.block_q = 8          # seq_len 32 -> 4 x 4 blocks
  cfg.attn.block_kv = 8
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return experiment.make_setup(cfg)


def perturbed(params):
  """Non-zero adaLN / output weights (they are zero-init) so that every parameter matters."""
  return jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)


def pgm_inputs(setup, batch=8):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, setup.model_cfg.vocab_size - 1, (batch, 32)))
  valid = jnp.ones((batch, 32), bool).at[0, 20:].set(False)
  t_B = jnp.asarray([1e-3, 0.1, 0.3, 0.5, 0.6, 0.8, 0.95, 1.0])[:batch]
  return {"tokens": tokens, "valid": valid}, t_B, jnp.asarray(rng.random((batch, 32)))


def loss_and_grads(setup, params, model_cfg, batch, t_B, noise, sorted_layout=None):
  """The train step's loss (as `steps.loss_terms`) -> loss, parameter grads, logits."""
  model = pgm_mod.PartitionDiT(model_cfg)
  eps = setup.config.train.sampling_eps
  group = objectives.groups_from_uniform(noise, t_B, eps)

  def loss(params):
    logits = model.apply({"params": params}, batch["tokens"], group, batch["valid"],
                         sorted_layout=sorted_layout)
    terms = objectives.pgm_loss_terms(logits, batch["tokens"], group, t_B, batch["valid"],
                                      setup.mask_id)
    return terms.loss_sum / jnp.maximum(terms.num_tokens, 1.0), logits

  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, grads, logits, group


@pytest.mark.slow
def test_pgm_sorted_layout_and_pallas_match_xla():
  """The PGM train step's loss (as `steps.loss_terms`), its parameter gradients and the
  logits, three ways in one jit: impl="xla" in the original layout (reference), impl="xla"
  in the sorted layout (the layout alone changes nothing) and impl="pallas" in the sorted
  layout (block skipping active: seq 32, blocks 8; the config-attribute path of
  `sorted_layout`). float32, dropout 0 (with dropout the sorted layout draws its masks on
  permuted positions). The batch has an empty group (t = 1e-3 and t = 1) and padding.
  Tolerance: loss rtol 1e-5, logits rtol 1e-4 / atol 1e-5, relative Frobenius error
  < 1e-4 per gradient leaf (measured ~1e-6)."""
  setup = tiny_setup()
  params = perturbed(experiment.init_state(setup, jax.random.key(0)).params)
  batch, t_B, noise = pgm_inputs(setup)
  pallas_cfg = dataclasses.replace(setup.model_cfg, attn_impl="pallas", sorted_layout=True)

  @jax.jit
  def all_three(params):
    run = functools.partial(loss_and_grads, setup, params, batch=batch, t_B=t_B, noise=noise)
    return (run(model_cfg=setup.model_cfg, sorted_layout=False),
            run(model_cfg=setup.model_cfg, sorted_layout=True),
            run(model_cfg=pallas_cfg))

  (ref_loss, ref_grads, ref_logits, group), *others = all_three(params)
  g = np.asarray(group)
  assert (g == 0).all(axis=1).any() and (g == 1).all(axis=1).any()
  for loss, grads, logits, _ in others:
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for (path, g), r in zip(flat, ref_flat):
      assert rel_err(g, r) < 1e-4, (jax.tree_util.keystr(path), rel_err(g, r))


@pytest.mark.slow
def test_whole_train_step_pallas_matches_xla():
  """`steps.train_step` (optimizer, clipping, EMA included) with config.attn.impl=pallas and
  the sorted layout vs impl=xla: same loss (rtol 1e-5) and updated parameters (atol 1e-6:
  one Adam step moves each parameter by at most lr, so this checks the update direction).
  The batch is 30 tokens long with blocks 8: the op pads queries and keys to 32 inside
  (padded keys invalid, padded queries sliced), so gradients must stay exact."""
  from pgm_jax import steps
  outs = []
  batch = None
  for impl, sort in (("xla", False), ("pallas", True)):
    setup = tiny_setup(**{"attn.impl": impl, "attn.sorted_layout": sort})
    state = experiment.init_state(setup, jax.random.key(0))
    state = state.replace(params=perturbed(state.params))
    if batch is None:
      batch, _, _ = pgm_inputs(setup)
      batch = jax.tree.map(lambda x: x[:, :30], batch)
    fn = jax.jit(functools.partial(steps.train_step, model=setup.model, tx=setup.tx,
                                   config=setup.config, mask_id=setup.mask_id))
    outs.append(jax.device_get(fn(state, batch, jax.random.key(3))))
  (s_x, m_x), (s_p, m_p) = outs
  np.testing.assert_allclose(float(m_p.loss.compute()), float(m_x.loss.compute()), rtol=1e-5)
  np.testing.assert_allclose(float(m_p.grad_norm.compute()), float(m_x.grad_norm.compute()),
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s_p.params), jax.tree.leaves(s_x.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


_SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pgm_jax.ops import AttentionMask, partition_attention
from pgm_jax.ops.attention import _xla_attention
from pgm_jax.ops.partition_layout import sort_by_group, permute
from pgm_jax.experiment import with_mesh

mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
rng = np.random.default_rng(0)
b, l, h, d = 8, 32, 4, 16
q, k, v = (jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32) for _ in range(3))
group = jnp.asarray(rng.integers(0, 2, (b, l)))
layout = sort_by_group(group)
g_sorted = permute(group, layout.perm)
mask = AttentionMask.sorted_groups("other_group", g_sorted, layout.split)
qkv_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
q, k, v = (jax.device_put(x, qkv_sharding) for x in (q, k, v))

def loss(q, k, v, mask, impl):
  out = partition_attention(q, k, v, mask, impl=impl, block_q=8, block_kv=8)
  return (out * jnp.cos(out)).sum(), out

fn = lambda impl: jax.jit(with_mesh(mesh, jax.value_and_grad(
    lambda q, k, v, m: loss(q, k, v, m, impl), argnums=(0, 1, 2), has_aux=True)))
(l_p, out_p), g_p = fn("pallas")(q, k, v, mask)
(l_x, out_x), g_x = fn("xla")(q, k, v, mask)
jaxpr = str(jax.make_jaxpr(with_mesh(mesh, lambda q, k, v, m: loss(q, k, v, m, "pallas")))(
    q, k, v, mask))
assert "shard_map" in jaxpr, "the Pallas kernel was not wrapped in shard_map"
np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_x), rtol=1e-5, atol=1e-6)
for a, c in zip(g_p, g_x):
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)
# Batch 3 / 3 heads divide no mesh axis: still one shard_map (replicated), same values.
q3, k3, v3 = (jax.device_put(x[:3, :30, :3], NamedSharding(mesh, P())) for x in (q, k, v))
mask3 = AttentionMask.packed(jnp.asarray([0, 7, 30], jnp.int32), 30)
f3 = lambda impl: jax.jit(with_mesh(mesh, jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
    partition_attention(q, k, v, mask3, impl=impl, block_q=8, block_kv=8))), argnums=(0, 1, 2))))
assert "shard_map" in str(jax.make_jaxpr(f3("pallas"))(q3, k3, v3))
for a, c in zip(f3("pallas")(q3, k3, v3), f3("xla")(q3, k3, v3)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
print("SHARDED_OK", out_p.sharding.spec)
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_pallas_under_shard_map_on_a_mesh(tmp_path):
  """On an 8-device (2, 2, 2) mesh the kernel runs per shard under jax.shard_map (batch
  over data/fsdp, heads over tensor) and matches the dense oracle, forward and grads;
  a batch / head count that divides no mesh axis runs replicated in the shard_map."""
  import subprocess
  import sys
  from conftest import REPO_ROOT
  script = tmp_path / "sharded.py"
  script.write_text(_SHARDED_SCRIPT)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=REPO_ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "SHARDED_OK" in res.stdout


@pytest.mark.slow
def test_efficient_sampler_pallas_matches_xla():
  """The efficient PGM samplers with attn_impl="pallas" (interpreted, blocks 16) give
  the same tokens as with "xla" at a scaled-down paper bucket pattern: L = 48, encoder
  buckets of 24 tokens (24 keys padded to 32 with blocks 16), S = 6 steps, so the
  uniform sampler decodes 7 or 8 queries (padded to 8) and the non-uniform one powers
  of two. (One encoder and one decoder layer: every program compiles 3 interpreted
  kernels, the test's cost.)"""
  from pgm_jax import samplers
  from pgm_jax.models import ModelConfig, PartitionDiT
  length, vocab = 48, 30
  mask_id, bos = vocab - 1, 0
  base = ModelConfig("pgm", vocab, mask_id, hidden=32, num_heads=2, cond_dim=16,
                     num_layers=2, enc_layers=1, dec_layers=1, dropout=0.0, dtype="float32",
                     block_q=16, block_kv=16)
  xla_model = PartitionDiT(base)
  pallas_model = PartitionDiT(dataclasses.replace(base, attn_impl="pallas"))
  tokens = jnp.zeros((1, length), jnp.int32)
  params = jax.tree.map(lambda x: getattr(x, "value", x),
                        xla_model.init(jax.random.key(0), tokens, tokens)["params"],
                        is_leaf=lambda x: hasattr(x, "value"))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = treedef.unflatten([0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  prompt = samplers.unconditional_prompt(2, length, bos)
  prompt.tokens[1, 20:23] = [3, 4, 5]
  prompt.known[1, 20:23] = True
  for sampler in ("efficient-uniform", "efficient-non-uniform"):
    kw = dict(sampler=sampler, steps=6, seed=4, mask_id=mask_id, bucket_size=24)
    ref = samplers.pgm_sample(params, prompt, model=xla_model, **kw)
    got = samplers.pgm_sample(params, prompt, model=pallas_model, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    assert not (got.tokens == mask_id).any()
    print(sampler, "programs", got.compiles)
