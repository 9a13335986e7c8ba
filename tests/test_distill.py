"""SDTT distillation: teacher targets, the KL loss, round boundaries, exact resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, restored_state
from pgm_jax import distill, evaluation, experiment, train
from pgm_jax.core import checkpointing

MASK = 4  # the toy vocabulary: tokens 0..3 and MASK


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """The loop tests build the same programs several times (a run, then its resume): a
  persistent compilation cache, for this module only, compiles each once."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(keys[1], 0)
  jax.config.update(keys[2], 0)
  cc.reset_cache()
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  cc.reset_cache()


def _log_softmax(a):
  a = np.asarray(a, np.float64)
  return a - np.log(np.exp(a - a.max()).sum()) - a.max()


SEEN_TIMES = []


def _toy_teacher(x, t=None):
  """Every position predicts logits [m, 0, 0, 0, MASK: -1e6], m = #MASK in its row. Records
  the step times it is called at (a time-conditioned MDLM reads them)."""
  SEEN_TIMES.append(None if t is None else float(np.asarray(t)[0]))
  m = jnp.sum(x == MASK, axis=1).astype(jnp.float32)[:, None, None]
  row = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0])
  logits = m * row + jnp.array([0.0, 0.0, 0.0, 0.0, -1e6])
  return jax.nn.log_softmax(jnp.broadcast_to(logits, x.shape + (5,)), axis=-1)


def test_teacher_targets_hand_computed():
  # t = 0.9, dt = 0.2, 3 steps: 0.9 -> 0.7 -> 0.5 -> 0.3. On the log-linear schedule the
  # reveal probabilities are dt / t_j: 2/9, 2/7 and 0.4.
  x_t = jnp.array([[1, MASK, MASK, MASK, MASK, MASK, 2]])
  # Position: 1 is revealed at step 0, 2 at step 1, 3 at step 2 (u = 0.39 < 0.4),
  # 4 stays masked (u = 0.41 > 0.4), 5 stays masked (u = 0.9 throughout).
  u = np.full((3, 1, 7), 0.9, np.float32)
  u[0, 0, 1] = 0.2   # < 2/9
  u[1, 0, 2] = 0.28  # < 2/7
  u[2, 0, 3] = 0.39
  u[2, 0, 4] = 0.41
  g = np.zeros((3, 1, 7, 5), np.float32)
  g[1, 0, 2, 3] = 10.0  # position 2 draws token 3 (the others draw argmax = token 0)
  noise = [(jnp.asarray(u[j]), jnp.asarray(g[j])) for j in range(3)]
  SEEN_TIMES.clear()
  target, x_end = distill.teacher_targets(_toy_teacher, x_t, jnp.array([0.9]), 0.2, None,
                                          num_steps=3, mask_id=MASK, eps=1e-5, noise=noise)
  np.testing.assert_array_equal(np.asarray(x_end), [[1, 0, 3, 0, MASK, MASK, 2]])
  np.testing.assert_allclose(SEEN_TIMES, [0.9, 0.7, 0.5], rtol=1e-6)  # each step's own t
  # Masked counts at the start of the steps: 5, 4, 3. A token's target is the prediction
  # of the step that revealed it; never-revealed tokens take the last step's (m = 3).
  expected = {1: _log_softmax([5, 0, 0, 0, -1e6]), 2: _log_softmax([4, 0, 0, 0, -1e6]),
              3: _log_softmax([3, 0, 0, 0, -1e6]), 4: _log_softmax([3, 0, 0, 0, -1e6]),
              5: _log_softmax([3, 0, 0, 0, -1e6])}
  for pos, want in expected.items():
    np.testing.assert_allclose(np.asarray(target[0, pos, :MASK]), want[:MASK], atol=1e-6,
                               err_msg=f"position {pos}")

  # The case: 2 steps from t = 0.75 with dt = 0.25 (reveal 1/3, then 1/2); the
  # end time is clipped at 0 when t < 2 dt, so a third step would reveal everything.
  u2 = np.full((2, 1, 7), 0.9, np.float32)
  u2[0, 0, 1], u2[1, 0, 2] = 0.33, 0.49
  noise2 = [(jnp.asarray(u2[j]), jnp.zeros((1, 7, 5))) for j in range(2)]
  target2, x2 = distill.teacher_targets(_toy_teacher, x_t, jnp.array([0.75]), 0.25, None,
                                        num_steps=2, mask_id=MASK, eps=1e-5, noise=noise2)
  np.testing.assert_array_equal(np.asarray(x2), [[1, 0, 0, MASK, MASK, MASK, 2]])
  np.testing.assert_allclose(np.asarray(target2[0, 1, :MASK]),
                             _log_softmax([5, 0, 0, 0, -1e6])[:MASK], atol=1e-6)
  for pos in (2, 3, 4, 5):
    np.testing.assert_allclose(np.asarray(target2[0, pos, :MASK]),
                               _log_softmax([4, 0, 0, 0, -1e6])[:MASK], atol=1e-6)
  _, x3 = distill.teacher_targets(_toy_teacher, x_t, jnp.array([0.3]), 0.25, None,
                                  num_steps=2, mask_id=MASK, eps=1e-5, noise=noise2)
  assert not np.any(np.asarray(x3) == MASK)


@pytest.mark.parametrize("loss", ["kl-bwd", "kl-fwd"])
def test_divergence_matches_numpy(loss):
  rng = np.random.default_rng(0)
  s_logits = rng.normal(size=(2, 6, 5)) * 3
  t_logits = rng.normal(size=(2, 6, 5)) * 3
  s_logits[..., MASK] = t_logits[..., MASK] = -1e6
  weight = rng.random((2, 6)) < 0.5
  s = jax.nn.log_softmax(jnp.asarray(s_logits, jnp.float32), axis=-1)
  t = jax.nn.log_softmax(jnp.asarray(t_logits, jnp.float32), axis=-1)
  total, count = distill.divergence(s, t, jnp.asarray(weight), loss)
  ps = np.exp(np.apply_along_axis(_log_softmax, -1, s_logits[..., :MASK]))
  pt = np.exp(np.apply_along_axis(_log_softmax, -1, t_logits[..., :MASK]))
  p, q = (ps, pt) if loss == "kl-bwd" else (pt, ps)
  per_token = (p * (np.log(p) - np.log(q))).sum(-1)
  assert int(count) == weight.sum()
  np.testing.assert_allclose(float(total) / float(count), per_token[weight].mean(), rtol=1e-5)
  # The MASK entry (probability 0 in both) contributes nothing, and gradients are finite.
  grad = jax.grad(lambda a: distill.divergence(jax.nn.log_softmax(a, -1), t,
                                               jnp.asarray(weight), loss)[0])(
                                                   jnp.asarray(s_logits, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grad)))


# ----------------------------------------------------------------------------
# The step and the loop, on the tiny Shakespeare model.
# ----------------------------------------------------------------------------

def distill_config(kind, teacher_workdir, **overrides):
  cfg = load_config("shakespeare", f"tiny,distill_{kind}")
  cfg.distill.teacher_workdir = teacher_workdir
  cfg.distill.round_steps = 2
  cfg.distill.initial_steps = 64
  cfg.train.num_steps = 5
  cfg.train.num_final_samples = 0
  cfg.opt.warmup_steps = 0          # the first step moves the student
  cfg.train.eval_every = 1000
  cfg.eval.max_batches = 1
  cfg.ckpt.every_steps = 1000
  cfg.ckpt.keep_every = None
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def make_teacher(kind, workdir):
  """A teacher checkpoint: random weights (no zero-initialised gates or output layer, so
  that predictions depend on the context) and EMA != params (the test sees which is
  read)."""
  cfg = load_config("shakespeare", f"tiny,{kind}")
  abstract = experiment.make_setup(cfg).abstract_state   # shapes only: nothing is compiled
  rng = np.random.default_rng(7)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(np.float32),
                        abstract.params)
  state = state.replace(params=params,
                        ema_params=jax.tree.map(lambda p: p + np.float32(0.01), params))
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), cfg.ckpt)
  checkpointing.save(manager, 0, state, wait=True)
  manager.close()
  return jax.device_get(state.ema_params)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_student_equals_teacher_at_round_start(tmp_path):
  teacher_dir = str(tmp_path / "teacher")
  teacher_ema = make_teacher("pgm", teacher_dir)
  cfg = distill_config("pgm", teacher_dir)
  setup = experiment.make_setup(cfg)
  # Round 1 starts from the teacher checkpoint's EMA weights, in student, EMA and teacher.
  manager = checkpointing.make_manager(str(tmp_path / "empty"), cfg.ckpt)
  state = train.restore_or_init(setup, manager, None, jax.random.key(0))
  manager.close()
  for tree in (state.params, state.ema_params, state.teacher_params):
    assert_trees_equal(tree, teacher_ema)
  assert int(state.distill_round) == 1
  np.testing.assert_allclose(float(state.distill_dt), (1 - 1e-5) / 64, rtol=1e-6)

  step_fn = train.make_train_step(setup)
  batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(
               0, 2000, (cfg.train.batch_size, cfg.data.seq_len)), jnp.int32),
           "valid": jnp.ones((cfg.train.batch_size, cfg.data.seq_len), bool)}
  batch = jax.device_put(batch, setup.batch_sharding)
  rng = jax.device_put(jax.random.key(1), jax.sharding.NamedSharding(
      setup.mesh, jax.sharding.PartitionSpec()))
  # Steps 0 and 1 (round 1): the teacher stays the checkpoint, the student moves.
  for _ in range(2):
    state, metrics = step_fn(state, batch, rng)
    assert np.isfinite(float(metrics.loss.compute()))
    assert_trees_equal(state.teacher_params, teacher_ema)
    assert int(state.distill_round) == 1
  student = jax.device_get(state.params)
  student_ema = jax.device_get(state.ema_params)
  with pytest.raises(AssertionError):
    assert_trees_equal(student, teacher_ema)
  # Step 2 = round_steps starts round 2: the student's raw weights (not its EMA) become the
  # teacher before the update, and dt doubles.
  state, metrics = step_fn(state, batch, rng)
  assert_trees_equal(state.teacher_params, student)
  with pytest.raises(AssertionError):
    assert_trees_equal(state.teacher_params, student_ema)
  assert int(state.distill_round) == 2
  np.testing.assert_allclose(float(state.distill_dt), 2 * (1 - 1e-5) / 64, rtol=1e-6)
  computed = metrics.compute()
  assert float(computed["distill_round"]) == 2.0
  np.testing.assert_allclose(float(computed["distill_dt"]), 2 * (1 - 1e-5) / 64, rtol=1e-6)
  # Step 3 (mid-round 2): the teacher is kept, the student moves on.
  state, _ = step_fn(state, batch, rng)
  assert_trees_equal(state.teacher_params, student)
  with pytest.raises(AssertionError):
    assert_trees_equal(state.params, student)

  # The held-out loss (distill_table.py --heldout_batches): a model against its own targets
  # is ~0 when the teacher's steps reveal nothing (tiny dt), > 0 when they reveal tokens;
  # it counts the masked valid tokens.
  loss_fn = jax.jit(lambda s, t, dt: distill.heldout_loss(
      s, t, batch["tokens"], batch["valid"], dt, jax.random.key(3), model=setup.model,
      config=cfg, mask_id=setup.mask_id))
  total0, count0 = loss_fn(teacher_ema, teacher_ema, 1e-9)
  total1, count1 = loss_fn(teacher_ema, teacher_ema, 0.25)
  assert float(count0) == float(count1) > 0
  assert abs(float(total0)) / float(count0) < 1e-5
  assert float(total1) / float(count1) > 1e-3


@pytest.mark.slow
def test_resume_mid_round_is_exact(tmp_path):
  teacher_dir = str(tmp_path / "teacher")
  make_teacher("mdlm", teacher_dir)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  # round_steps = 2: rounds change at steps 2 and 4; the resumed run stops at step 3,
  # in the middle of round 2, and goes on to step 5 (round 3).
  train.train_and_evaluate(distill_config("mdlm", teacher_dir, **{"train.num_steps": 5}),
                           straight)
  train.train_and_evaluate(distill_config("mdlm", teacher_dir, **{"train.num_steps": 3}),
                           resumed)
  step_mid, state_mid = restored_state(distill_config("mdlm", teacher_dir), resumed)
  assert step_mid == 3 and int(state_mid.distill_round) == 2
  # A different teacher_workdir is not read on resume: the workdir's checkpoint wins.
  train.train_and_evaluate(distill_config("mdlm", str(tmp_path / "nowhere"),
                                          **{"train.num_steps": 5}), resumed)
  cfg = distill_config("mdlm", teacher_dir)
  step_a, state_a = restored_state(cfg, straight)
  step_b, state_b = restored_state(cfg, resumed)
  assert step_a == step_b == 5
  assert int(state_b.distill_round) == 3
  np.testing.assert_allclose(float(state_b.distill_dt), 4 * (1 - 1e-5) / 64, rtol=1e-6)
  assert_trees_equal(state_a, state_b)  # student, EMA, optimizer, teacher, round, dt, step

  # eval.json of the student states its round and dt (and the student's step count).
  result = evaluation.evaluate(cfg, resumed)
  saved = json.load(open(os.path.join(resumed, "eval.json")))
  assert saved["distill_round"] == result["distill_round"] == 3
  np.testing.assert_allclose(saved["distill_dt"], 4 * (1 - 1e-5) / 64, rtol=1e-6)
  assert saved["distill_student_steps"] == 64 / 2 ** 3
  assert np.isfinite(saved["val_ppl"])


@pytest.mark.parametrize("overrides, pattern", [
    ({"distill.loss": "mse"}, r"config\.distill\.loss"),
    ({"distill.teacher_steps": 1}, r"config\.distill\.teacher_steps"),
    ({"train.num_steps": 20, "distill.initial_steps": 8}, r"config\.distill\.initial_steps"),
    ({"model.kind": "ar"}, r"config\.model\.kind"),
])
def test_bad_distill_config_names_the_key(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    experiment.make_setup(distill_config("pgm", "/nonexistent", **overrides))


def test_missing_teacher_names_the_key(tmp_path):
  cfg = distill_config("pgm", str(tmp_path / "missing"), **{"train.num_steps": 1})
  with pytest.raises(ValueError, match=r"config\.distill\.teacher_workdir: .*missing"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))


@pytest.mark.parametrize("preset, model", [
    ("distill_pgm_8_8", dict(kind="pgm", hidden=768, enc_layers=8, dec_layers=8)),
    ("distill_pgm_6_6_dim1024", dict(kind="pgm", hidden=1024, num_heads=16, enc_layers=6)),
    ("distill_mdlm", dict(kind="mdlm", hidden=768, num_layers=12)),
])
def test_owt_presets_are_the_papers_runs(preset, model):
  cfg = load_config("owt", preset)
  for key, value in model.items():
    assert cfg.model[key] == value, key
  assert cfg.distill.enabled and cfg.distill.loss == "kl-bwd"
  assert (cfg.distill.round_steps, cfg.distill.initial_steps, cfg.distill.teacher_steps,
          cfg.distill.sampling_eps) == (10_000, 1024, 2, 1e-5)
  assert (cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay, cfg.opt.ema_decay) == (
      3e-4, 2500, 0.0, 0.9999)
  assert (cfg.train.batch_size, cfg.train.num_steps, cfg.model.dropout) == (128, 50_000, 0.0)
  assert distill.student_steps(cfg, 5) == 32    # 5 rounds: the last student takes 32 steps
  experiment.validate(cfg, num_devices=16, data_parallel=16)
  with pytest.raises(ValueError, match="mutually exclusive"):
    load_config("owt", f"{preset},pgm_6_6")


@pytest.mark.parametrize("preset", ["distill_pgm", "distill_mdlm"])
def test_shakespeare_presets_train_the_students_for_8_and_4_steps(preset):
  """The CPU presets (configs/shakespeare.py _distill says why these values)."""
  cfg = load_config("shakespeare", preset)
  rounds = cfg.train.num_steps // cfg.distill.round_steps
  assert [distill.student_steps(cfg, r) for r in range(1, rounds + 1)] == [8, 4]
  # The EMA averages over about one round, as the paper's 0.9999 over 10k-step rounds.
  assert cfg.opt.ema_decay == 1 - 1 / cfg.distill.round_steps
  assert (cfg.distill.loss, cfg.distill.teacher_steps) == ("kl-bwd", 2)
