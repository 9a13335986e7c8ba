"""The reference-compatibility switches (issue 19): config.sample.reference_compat
("registers_count": the PGM image samplers' key count; "halton_redraw": MaskGIT Halton draws
the revealed codes again) and config.distill.normalizer ("reference": MASK logit 0 in the
SDTT softmax). Each changes what it should, and the defaults nothing (tests/test_golden.py
pins the default results bitwise)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pgm_jax import distill, experiment, families
from pgm_jax.models import pgm_image as pgm_image_model
from pgm_jax.ops import AttentionMask
from pgm_jax.samplers import image as S

# The tiny image PGM and MaskGIT of the sampler tests (module fixtures), and their sizes.
from test_image_samplers import BOS, G, L, MASK, N, NUM_CODES, maskgit, pgm  # pylint: disable=unused-import,g-bad-import-order


# ----------------------------------------------------------------------------
# 1. registers_count
# ----------------------------------------------------------------------------

def test_registers_count_key_mask_leaves_the_last_known_tokens_out():
  """[1 group-0 register] + 4 packed slots, known tokens (BOS included) 1 and 3: ours has
  1 + clean_len valid keys, the reference's count clean_len (the registers inside it)."""
  mask = AttentionMask.packed(jnp.asarray([1, 3]), 4)
  ours = pgm_image_model.encoder_key_mask(mask, 1, False)
  ref = pgm_image_model.encoder_key_mask(mask, 1, True)
  np.testing.assert_array_equal(ours.kv_valid, [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(ref.kv_valid, [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(ours.kv_length, [2, 4])
  np.testing.assert_array_equal(ref.kv_length, [1, 3])


@pytest.mark.slow
def test_registers_count_logits_are_ours_with_the_last_known_token_dropped(pgm):
  """infer(registers_in_count=True) with c known tokens == ours with c - 1 (the most recent
  known token padding); it differs from ours with c."""
  model, params = pgm
  rng = np.random.default_rng(0)
  n_known = 5
  tok = np.concatenate([[BOS], rng.integers(0, NUM_CODES, n_known)])[None].astype(np.int32)
  pos = np.concatenate([[0], rng.permutation(np.arange(1, L))[:n_known]])[None].astype(np.int32)
  q_pos = np.setdiff1d(np.arange(1, L), pos[0])[None, :4].astype(np.int32)
  labels = jnp.asarray([1])
  run = lambda count, compat: model.apply(
      {"params": params}, tok, pos, AttentionMask.packed(jnp.asarray([count]), tok.shape[1]),
      q_pos, labels, method="infer", registers_in_count=compat)
  for count in (2, 4, 6):
    np.testing.assert_allclose(run(count, True), run(count - 1, False), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(run(count, True)) - np.asarray(run(count, False))).max() > 1e-4


@pytest.mark.slow
def test_registers_count_sampler_feeds_the_reference_count(pgm, monkeypatch):
  """The efficient sampler's encoder sees 1 + revealed valid keys with the switch (BOS +
  known codes, the reference's `concrete_lengths`, registers inside), 2 + revealed without
  (the group-0 register on top)."""
  model, params = pgm
  counts = []
  original = pgm_image_model.encoder_key_mask

  def spy(mask, n, registers_in_count):
    out = original(mask, n, registers_in_count)
    jax.debug.callback(lambda v: counts.append(np.asarray(v).sum(-1)), out.kv_valid)
    return out

  monkeypatch.setattr(pgm_image_model, "encoder_key_mask", spy)
  revealed = np.concatenate([[0], np.cumsum(S.halton_counts(N, 4))[:-1]])
  tokens = {}
  for compat in ((), ("registers_count",)):
    counts.clear()
    jax.clear_caches()  # trace again, through the spy
    tokens[compat] = S.image_sample(params, [0, 2], model=model, sampler="halton", steps=4,
                                    seed=1, grid=G, reference_compat=compat).tokens
    extra = 1 if compat else 2
    np.testing.assert_array_equal(np.stack(counts), (revealed + extra)[:, None].repeat(2, 1))
  jax.clear_caches()
  for t in tokens.values():
    assert (t[:, 0] == BOS).all() and ((t[:, 1:] >= 0) & (t[:, 1:] < NUM_CODES)).all()


# ----------------------------------------------------------------------------
# 2. halton_redraw
# ----------------------------------------------------------------------------

def _canvases(monkeypatch, params, model, compat):
  """The canvas after every step of a 5-step MaskGIT Halton run."""
  seen = []
  original = S._image_step_jit  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    st = original(*args, **kwargs)
    seen.append(np.asarray(jax.device_get(st.canvas)))
    return st

  monkeypatch.setattr(S, "_image_step_jit", spy)
  S.image_sample(params, [0, 1, 2], model=model, sampler="halton", steps=5, seed=4, grid=G,
                 cfg_w=1.0, reference_compat=compat)
  monkeypatch.setattr(S, "_image_step_jit", original)
  return seen


@pytest.mark.slow
def test_halton_redraw_changes_revealed_codes_and_only_with_the_switch(maskgit, monkeypatch):
  model, params = maskgit
  ours = _canvases(monkeypatch, params, model, ())
  ref = _canvases(monkeypatch, params, model, ("halton_redraw",))
  assert len(ours) == len(ref) == 5
  changed = 0
  for k in range(1, 5):
    for steps in (ours, ref):  # the same positions are known after each step
      np.testing.assert_array_equal(steps[k] == MASK, ref[k] == MASK)
    before = (ours[k - 1] != MASK)
    before[:, 0] = False  # BOS
    np.testing.assert_array_equal(ours[k][before], ours[k - 1][before])  # never change
    before = (ref[k - 1] != MASK)
    before[:, 0] = False
    changed += int((ref[k][before] != ref[k - 1][before]).sum())
  assert changed > 0
  # The first step has nothing to draw again: both runs reveal the same codes.
  np.testing.assert_array_equal(ours[0], ref[0])
  assert ((ref[-1][:, 1:] >= 0) & (ref[-1][:, 1:] < NUM_CODES)).all()


@pytest.mark.parametrize("value, family, pattern", [
    ("bogus", "maskgit", r"config\.sample\.reference_compat: unknown quirk 'bogus'"),
    ("halton_redraw", "pgm_image", r"config\.sample\.reference_compat: 'halton_redraw' is not"),
    ("registers_count", "maskgit", r"config\.sample\.reference_compat: 'registers_count' is not"),
    (3, "maskgit", r"config\.sample\.reference_compat=3 must be a string"),
])
def test_bad_reference_compat_is_a_one_line_error(value, family, pattern):
  with pytest.raises(ValueError, match=pattern) as err:
    S.parse_reference_compat(value, families.get(family).reference_quirks)
  assert "\n" not in str(err.value)


def test_reference_compat_values_and_config_validation():
  assert S.parse_reference_compat("", ("registers_count",)) == ()
  assert S.parse_reference_compat(False, ("registers_count",)) == ()
  assert S.parse_reference_compat("all", ("registers_count",)) == ("registers_count",)
  assert S.parse_reference_compat(True, ("halton_redraw",)) == ("halton_redraw",)
  assert S.parse_reference_compat(" halton_redraw ", ("halton_redraw",)) == ("halton_redraw",)
  cfg = load_config("digits", "maskgit")
  assert cfg.sample.reference_compat == ""
  cfg.sample.reference_compat = "halton_redraw"
  cfg.sample.sampler = "confidence"
  with pytest.raises(ValueError, match=r"config\.sample\.reference_compat: 'halton_redraw' is "
                                       r"a behaviour of the halton sampler"):
    experiment.validate(cfg)
  cfg = load_config("digits", "pgm")
  cfg.sample.reference_compat = "halton_redraw"
  with pytest.raises(ValueError, match=r"config\.sample\.reference_compat"):
    experiment.validate(cfg)
  cfg.sample.reference_compat = "all"
  experiment.validate(cfg)
  assert families.of(cfg).reference_compat(cfg) == ("registers_count",)
  with pytest.raises(ValueError, match=r"config\.sample\.reference_compat: 'registers_count' "
                                       r"is a behaviour of the efficient"):
    S.check_reference_compat(("registers_count",), "halton", "full")


# ----------------------------------------------------------------------------
# 3. distill.normalizer
# ----------------------------------------------------------------------------

def _reference_subs(logits, xt, mask_id):
  """The reference's `_subs_parameterization` (text_distill_sdtt), step by step in numpy."""
  out = logits.astype(np.float64).copy()
  out[..., mask_id] = -np.inf                                  # scatter(MASK, -inf)
  out = np.where((xt != mask_id)[..., None], -10_000_000.0, out)
  np.put_along_axis(out, xt[..., None], 0.0, axis=-1)          # scatter(xt, 0.0)
  m = out.max(-1, keepdims=True)
  out = out - (m + np.log(np.exp(out - m).sum(-1, keepdims=True)))
  out[..., mask_id] = -10_000_000.0
  return out


def _reference_kl_bwd(student, teacher):
  """F.kl_div(teacher, student, log_target=True, reduction="batchmean") on [n, V]."""
  return float((np.exp(student) * (student - teacher)).sum() / student.shape[0])


def test_reference_normalizer_keeps_mask_in_the_softmax_and_matches_the_reference_kl():
  rng = np.random.default_rng(0)
  batch, length, vocab, mask_id = 4, 32, 20, 19
  xt = rng.integers(0, mask_id, (batch, length))
  xt[rng.random((batch, length)) < 0.5] = mask_id
  is_mask = xt == mask_id
  s_logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  t_logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  ours_s = np.asarray(distill.normalized_log_probs(s_logits, xt, mask_id))
  ref_s = np.asarray(distill.normalized_log_probs(s_logits, xt, mask_id, "reference"))
  ref_t = np.asarray(distill.normalized_log_probs(t_logits, xt, mask_id, "reference"))
  # Ours: the MASK-free softmax of before, bitwise; sums to one.
  np.testing.assert_array_equal(
      ours_s, jax.nn.log_softmax(jnp.asarray(s_logits).at[..., mask_id].set(-1e6), axis=-1))
  np.testing.assert_allclose(np.exp(ours_s).sum(-1), 1.0, rtol=1e-5)
  # Reference: at masked positions the tokens carry Z / (Z + 1) < 1; elsewhere as ours.
  z = np.exp(s_logits[..., :mask_id].astype(np.float64)).sum(-1)
  mass = np.exp(ref_s.astype(np.float64)).sum(-1)
  np.testing.assert_allclose(mass[is_mask], (z / (z + 1))[is_mask], rtol=1e-5)
  assert (mass[is_mask] < 1 - 1e-3).all()
  np.testing.assert_array_equal(ref_s[~is_mask][:, :mask_id], ours_s[~is_mask][:, :mask_id])
  # The KL over masked positions equals the reference's formula on its own log-probs.
  want = _reference_kl_bwd(_reference_subs(s_logits, xt, mask_id)[is_mask],
                           _reference_subs(t_logits, xt, mask_id)[is_mask])
  total, count = distill.divergence(ref_s, ref_t, is_mask, "kl-bwd")
  np.testing.assert_allclose(float(total / count), want, rtol=1e-5)
  ours_t = np.asarray(distill.normalized_log_probs(t_logits, xt, mask_id))
  ours_total, _ = distill.divergence(ours_s, ours_t, is_mask, "kl-bwd")
  assert abs(float(ours_total / count) - want) > 1e-4 * want


def test_reference_normalizer_reveals_as_the_reference_teacher():
  """A position is revealed w.p. P (a_s - a_t) / (P (a_s - a_t) + 1 - a_s) with P the token
  mass (ours: P = 1). u between the two: ours reveals, the reference does not."""
  mask_id, vocab = 3, 4
  logits = jnp.zeros((1, 1, vocab))
  x = jnp.full((1, 1), mask_id, jnp.int32)
  t, dt = jnp.asarray([0.5]), 0.25
  from pgm_jax import objectives  # pylint: disable=g-import-not-at-top
  a_t, a_s = objectives.alpha(t)[0], objectives.alpha(t - dt)[0]
  p_ours = float((a_s - a_t) / (1 - a_t))
  mass = 3 / 4  # three tokens at logit 0, MASK at 0 in the normaliser
  p_ref = float(mass * (a_s - a_t) / (mass * (a_s - a_t) + 1 - a_s))
  assert p_ref < p_ours
  u = jnp.full((1, 1), (p_ref + p_ours) / 2)
  noise = [(u, jnp.zeros((1, 1, vocab)))]
  for normalizer, revealed in (("ours", True), ("reference", False)):
    fn = lambda xx, tt, n=normalizer: distill.normalized_log_probs(logits, xx, mask_id, n)
    _, x_out = distill.teacher_targets(fn, x, t, dt, None, num_steps=1, mask_id=mask_id,
                                       eps=1e-5, noise=noise, normalizer=normalizer)
    assert bool(x_out[0, 0] != mask_id) == revealed


def test_bad_normalizer_names_the_key():
  cfg = load_config("shakespeare", "tiny,distill_pgm")
  cfg.distill.teacher_workdir = "/nonexistent"
  assert cfg.distill.normalizer == "ours"
  cfg.distill.normalizer = "softmax"
  with pytest.raises(ValueError, match=r"config\.distill\.normalizer must be one of") as err:
    experiment.validate(cfg)
  assert "\n" not in str(err.value)
