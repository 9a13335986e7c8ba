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


@pytest.mark.parametrize("kind", ["other_group", "packed"])
@pytest.mark.slow
def test_tpu_interpreter(kind):
  """The Mosaic kernels under the stricter TPU interpreter (scalar prefetch in SMEM,
  VMEM scratch, uninitialised memory = NaN)."""
  rng = np.random.default_rng(11)
  length = 64
  if kind == "packed":
    mask = AttentionMask.packed(jnp.asarray([0, 40], jnp.int32), length)
  else:
    mask = sorted_mask(kind, partitions(length, 16, rng)[[0, 3]])
  q, k, v, ct = qkv(rng, 2, length, length, 1, 32)
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
