"""Image samplers: the Halton order and the schedules, the guidance formula, efficient PGM
== full-length PGM token for token (Halton and confidence, with guidance), and bounded
compilation whatever S is."""
import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from pgm_jax.models import ImagePartitionDiT, MaskGIT, ModelConfig
from pgm_jax.samplers import image as S

G, C, NUM_CODES = 4, 3, 5
N, L = G * G, G * G + 1
MASK, BOS = NUM_CODES, NUM_CODES + 1


@pytest.fixture(scope="module")
def pgm():
  cfg = ModelConfig("pgm_image", NUM_CODES + 2, MASK, hidden=16, num_heads=2, cond_dim=16,
                    enc_layers=1, dec_layers=1, dropout=0.0, dtype="float32", num_classes=C,
                    register=2)
  model = ImagePartitionDiT(cfg)
  tokens = jnp.zeros((1, L), jnp.int32)
  return model, random_params(model, tokens, tokens, jnp.zeros((1,), jnp.int32))


@pytest.fixture(scope="module")
def maskgit():
  cfg = ModelConfig("maskgit", NUM_CODES + 1, MASK, hidden=16, num_heads=2, cond_dim=16,
                    num_layers=1, dropout=0.0, dtype="float32", num_classes=C, register=1,
                    num_positions=N)
  model = MaskGIT(cfg)
  return model, random_params(model, jnp.zeros((1, N), jnp.int32), jnp.zeros((1,), jnp.int32),
                               seed=3)


def _radical_inverse(i: int, base: int) -> float:
  out, f = 0.0, 1.0 / base
  while i:
    i, digit = divmod(i, base)
    out += digit * f
    f /= base
  return out


def test_halton_order_is_the_2d_halton_sequence():
  """Points i = 1, 2, ... of the (2, 3) Halton sequence (the reference's generator skips
  the origin), floored onto the grid, each cell at its first visit."""
  for grid in (4, 8, 32):
    order = S.halton_order(grid)
    assert sorted(order.tolist()) == list(range(grid * grid))
    seen, expected, i = set(), [], 1
    while len(expected) < grid * grid:
      cell = (int(_radical_inverse(i, 2) * grid) * grid + int(_radical_inverse(i, 3) * grid))
      if cell not in seen:
        seen.add(cell)
        expected.append(cell)
      i += 1
    assert order.tolist() == expected
  assert S.halton_order(8)[:4].tolist() == [4 * 8 + 2, 2 * 8 + 5, 6 * 8 + 0, 1 * 8 + 3]


def test_halton_points_are_the_exact_rationals():
  """Point i is the radical inverse of i as a fraction, rounded once (the reference's num / den
  generator). Summing digit * base^-k in floats, as scipy.stats.qmc.Halton does, is 1 ulp off
  for some base-3 points (i = 5: 7/9), which moves cells for grids divisible by 9."""
  for base in (2, 3):
    points = S.halton_sequence(base, 3000)
    for i, got in enumerate(points.tolist(), start=1):
      exact, f, k = fractions.Fraction(0), fractions.Fraction(1, base), i
      while k:
        k, digit = divmod(k, base)
        exact, f = exact + digit * f, f / base
      assert got == float(exact), (base, i, got, exact)
  assert S.halton_sequence(3, 5)[4] == 7 / 9 != _radical_inverse(5, 3)
  assert S.halton_order(9)[4] == 5 * 9 + 7  # column floor(9 * 7/9) = 7, not 6


@pytest.mark.parametrize("n,steps", [(64, 1), (64, 8), (64, 64), (1024, 32), (16, 5)])
def test_schedules(n, steps):
  halton = S.halton_counts(n, steps)
  cum = np.cumsum(halton)
  for k in range(steps):
    assert cum[k] == max(k + 1, int(np.floor(n * (1 - np.arccos((k + 1) / steps) / (np.pi / 2)))))
  conf = S.confidence_counts(n, steps)
  assert conf.sum() == halton.sum() == n and (conf >= 0).all() and (halton >= 0).all()
  assert conf[0] == 1 or steps == 1
  if steps > 1:
    ccum = np.cumsum(conf)
    k = np.arange(steps - 1)
    expected = np.maximum(k + 1, np.floor(n * (1 - np.arccos(k / (steps - 1)) / (np.pi / 2))))
    np.testing.assert_array_equal(ccum[:-1], expected)
  with pytest.raises(ValueError, match="config.sample.steps"):
    S.halton_counts(n, n + 1)


def test_step_shapes_at_the_paper_setting():
  """ImageNet, S = 32, default bucket max(8, 1025 // 16) = 64: the program shapes a run
  compiles (what plan mode's what=sample compiles the largest of)."""
  halton = S.step_shapes("halton", 32, 32, execution="efficient")
  assert len(halton) == 32 and halton[0] == (64, 64) and halton[-1] == (896, 192)
  assert max(e for e, _ in halton) == 896 and max(q for _, q in halton) == 192
  conf = S.step_shapes("confidence", 32, 32, execution="efficient")
  assert conf[0] == (64, 1024) and conf[-1] == (896, 192)  # queries shrink as n_enc grows
  assert S.step_shapes("halton", 32, 32, execution="full") == [(0, 1025)] * 32
  assert S.step_shapes("halton", G, 4, execution="efficient", bucket_size=8)[-1][0] <= L


def test_guidance_formula_and_schedules():
  np.testing.assert_allclose(S.cfg_weights(4.0, 5), [0.0, 1.0, 2.0, 3.0, 4.0])
  cond, uncond = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 1.0])
  np.testing.assert_allclose(S.cfg_logits(cond, uncond, 3.0), [4 * 1.0 - 3 * 0.5, -8 - 3])
  np.testing.assert_allclose(S.halton_temperatures(0.5, 1.5, 3), [0.25, 1.0, 1.5])
  np.testing.assert_allclose(S.confidence_noise(5.0, 3), [5.0, 2.5, 0.0])


@pytest.mark.slow
def test_guided_logits_combine_the_doubled_batch(maskgit):
  """The sampler's guided logits == (1 + w) cond - w uncond from two separate passes."""
  model, params = maskgit
  plan = S.image_plan("halton", 2, G, 4)
  st = S._initial_state(plan.order, MASK, BOS, jnp.asarray)
  labels = jnp.asarray([0, 2], jnp.int32)
  q_pos = st.rem_pos[:, :N]

  def both(params, st, labels):
    guided = S._query_logits(params, st, labels, q_pos, 1.5, model=model,
                             execution="full", n_enc=0, cfg=True, mask_id=MASK, null_class=C)
    cond = model.apply({"params": params}, st.canvas[:, 1:], labels)
    uncond = model.apply({"params": params}, st.canvas[:, 1:], jnp.full_like(labels, C))
    take = lambda x: jnp.take_along_axis(x, (q_pos - 1)[..., None], axis=1)
    return guided, 2.5 * take(cond) - 1.5 * take(uncond)

  guided, expected = jax.jit(both)(params, st, labels)
  np.testing.assert_allclose(np.asarray(guided), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,cfg_w,bucket", [("halton", 2.0, 8), ("confidence", 0.0, 16)])
@pytest.mark.slow
def test_efficient_pgm_equals_full_length_token_for_token(pgm, sampler, cfg_w, bucket):
  model, params = pgm
  labels = np.asarray([0, 1, 2])
  kw = dict(model=model, sampler=sampler, steps=4, seed=7, grid=G, cfg_w=cfg_w)
  eff = S.image_sample(params, labels, bucket_size=bucket, **kw)
  full = S.image_sample(params, labels, execution="full", **kw)
  np.testing.assert_array_equal(eff.tokens, full.tokens)
  assert eff.passes == full.passes == 4
  assert (eff.tokens[:, 0] == BOS).all()
  codes = eff.tokens[:, 1:]
  assert ((codes >= 0) & (codes < NUM_CODES)).all()  # never MASK or BOS
  assert len(np.unique(codes)) > 2  # a random, peaked model: not a constant image


@pytest.mark.slow
def test_maskgit_samples_every_code(maskgit):
  model, params = maskgit
  res = S.image_sample(params, [0, 1], model=model, sampler="confidence", steps=3, seed=0,
                       grid=G, cfg_w=1.0)
  assert res.passes == 3 and res.compiles <= 1
  assert ((res.tokens[:, 1:] >= 0) & (res.tokens[:, 1:] < NUM_CODES)).all()
  assert (res.tokens[:, 0] == BOS).all()


@pytest.mark.slow
def test_compilations_are_bounded_and_do_not_grow_with_steps(pgm):
  """Programs traced (lowering only: nothing runs) on a 6x6 grid with 8-token buckets: at
  most 2 L / bucket per run for the efficient PGM, whatever S; one for the full length."""
  grid, bucket = 6, 8
  length = grid * grid + 1
  bound = 2 * -(-length // bucket)
  model, params = pgm
  kw = dict(seed=0, grid=grid, bucket_size=bucket, measure_flops=True, execute=False)
  for sampler in ("halton", "confidence"):
    for steps in (4, 36):
      res = S.image_sample(params, [0, 1], model=model, sampler=sampler, steps=steps, **kw)
      assert res.passes == steps and 0 < res.compiles <= bound, (sampler, steps, res.compiles)
    again = S.image_sample(params, [0, 1], model=model, sampler=sampler, steps=36, **kw)
    assert again.compiles == 0
  cfg = ModelConfig("maskgit", NUM_CODES + 1, MASK, hidden=16, num_heads=2, cond_dim=16,
                    num_layers=1, dropout=0.0, dtype="float32", num_classes=C, register=1,
                    num_positions=grid * grid)
  model = MaskGIT(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                               jnp.zeros((1,), jnp.int32))["params"])
  abstract = jax.tree.map(lambda x: getattr(x, "value", x), abstract,
                          is_leaf=lambda x: hasattr(x, "value"))
  compiles = [S.image_sample(abstract, [0, 1], model=model, sampler="halton", steps=steps,
                             **kw).compiles for steps in (4, 36)]
  assert compiles == [1, 0]
