"""SDTT: Self-Distillation Through Time, for a PGM or an MDLM (method §8).

A student learns to match, in one network pass, what its teacher produces in
`config.distill.teacher_steps` (2) ancestral steps of size dt. Every
`config.distill.round_steps` steps the student is copied into the teacher and dt grows
by `teacher_steps`, so each round halves the number of sampling steps the student needs.
Distillation is chosen by config (`config.distill.enabled`, the `distill_*` presets) and
runs in the ordinary training loop (`--mode=train`): the same checkpoints, metrics, mesh
and preemption handling. The state (`DistillState`) also holds the teacher's weights, the
round and dt, so that a resume is exact.

One step (`distill_step`; the teacher's passes run in the same jitted program, outside
the differentiated function):
  1. t is antithetic over the global batch on [eps, 1] (eps = config.distill.sampling_eps,
     1e-5); x_t: each token becomes MASK w.p. 1 - alpha(t) (log-linear schedule).
  2. The teacher runs `teacher_steps` ancestral steps from t: step j goes from t - j dt
     to t - (j + 1) dt, predicts log p(x0) everywhere and reveals each MASK w.p.
     (alpha_s - alpha_t) / (1 - alpha_t), with a token drawn from that prediction.
     The target of a masked token is the teacher's log p(x0) at the step that revealed
     it; a token still masked at the end takes the last step's prediction.
  3. The student runs once on x_t. Loss "kl-bwd" = KL(student || teacher) at the masked
     positions, float32, averaged over those tokens of the whole global batch, whatever
     config.train.grad_accum_steps ("kl-fwd" = KL(teacher || student)).
Both networks run in the naive layout: a PGM gets groups [x == MASK] (the clean tokens
form group 0, which is all a masked position can see), an MDLM reads x with its MASKs.

What we took from the reference (jdeschena/pgm, branch text_distill_sdtt,
core/distill/multi_round_partition.py and multi_round_sdtt.py), restated:
  * Teacher and student both start from one pre-trained checkpoint, and the student's
    EMA restarts from it. We load the checkpoint's EMA weights (the weights its eval and
    samplers use; `config.ckpt.init_params_from` does the same).
  * At a round boundary the teacher takes the student's raw weights, not the EMA; the EMA
    and the optimizer state carry on (the reference's `use_ema_on_growth=False` and
    `reset_optimizer_on_growth=False`). The boundary falls at the start of every step
    whose index (optimizer steps done so far) is a positive multiple of round_steps.
  * dt of round r (1-based) = (1 - eps) / initial_steps * teacher_steps^(r - 1).
  * The teacher's reveal is MDLM's ancestral rule on the log-linear schedule (eps 1e-3),
    and times are clipped below at the sampling eps.
  * A token's target is the prediction of the step at which it changed; tokens never
    revealed take the last step's. MASK never carries probability mass.
  * kl-bwd is torch's `kl_div(teacher, student, log_target=True, reduction="batchmean")`
    over the masked tokens, i.e. sum_v p_s (log p_s - log p_t) / #masked.
The normaliser (config.distill.normalizer): ours ("ours") leaves MASK out of the softmax, so
the student's and the teacher's log p(x0) at a masked position sum to one over the tokens.
The reference's `_subs_parameterization` sets logit[MASK] = -inf, then writes 0 at x_t's own
token (`scatter(index=xt, value=0.0)`, meant for the unmasked positions); at a masked
position x_t is MASK, so logit[MASK] becomes 0 again and the log-softmax keeps exp(0) in its
normaliser before log p[MASK] is set to -1e7. Their probabilities over the tokens thus sum
to Z / (Z + 1) < 1 (Z = sum_v exp(logit_v)), in the student, in the teacher's targets and
in the teacher's reveal step (their q_xs: token v gets p_v (alpha_s - alpha_t), MASK gets
1 - alpha_s, so a position is revealed w.p. P (alpha_s - alpha_t) / (P (alpha_s - alpha_t)
+ 1 - alpha_s), P = sum_v p_v). "reference" reproduces all three (`normalized_log_probs`,
`teacher_targets`); docs/distillation.md measures the difference.
Where we differ: the reference places its teacher's step times at
t * linspace(1, 0, k) + (1 - t) * (t - k dt). That does not give steps of size dt from t:
at t = 0.5 the two steps start at about 0.75 and 0.25. We follow the spec instead. Step j
runs from t - j dt to t - (j + 1) dt, and the end time is clipped at 0, where every
remaining MASK is revealed. With gradient accumulation, each microbatch draws its own
teacher noise, so the draws differ from an unsplit batch; their distribution does not.
"""

import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from etils import epath
from flax import struct

from pgm_jax import families, objectives, steps
from pgm_jax.families.base import stratified_times
from pgm_jax.core import checkpointing, config_lib

LOSSES = config_lib.DISTILL_LOSSES
NORMALIZERS = config_lib.DISTILL_NORMALIZERS


@struct.dataclass
class DistillState(steps.TrainState):
  """TrainState (the student: params, opt_state, ema_params) + the teacher and the round."""
  teacher_params: Any
  distill_round: jax.Array   # int32, 1-based
  distill_dt: jax.Array      # float32: the teacher's step size in this round


@struct.dataclass
class DistillMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  masked_tokens: clu_metrics.Average.from_output("masked_tokens")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")
  distill_round: clu_metrics.LastValue.from_output("distill_round")
  distill_dt: clu_metrics.LastValue.from_output("distill_dt")


def initial_dt(config) -> float:
  d = config.distill
  return (1.0 - d.sampling_eps) / d.initial_steps


def student_steps(config, distill_round: int) -> float:
  """Sampling steps whose step size the student of `distill_round` was trained to take:
  teacher_steps * dt = (1 - eps) / (initial_steps / teacher_steps^round)."""
  d = config.distill
  return d.initial_steps / d.teacher_steps ** distill_round


def init_state(rng, *, base_init: Callable, config) -> DistillState:
  """`base_init(rng)` (a TrainState, possibly boxed) + a teacher equal to the student."""
  st = base_init(rng)
  return DistillState(step=st.step, params=st.params, opt_state=st.opt_state,
                      ema_params=st.ema_params,
                      teacher_params=jax.tree.map(lambda x: x, st.params),
                      distill_round=jnp.ones((), jnp.int32),
                      distill_dt=jnp.asarray(initial_dt(config), jnp.float32))


# ----------------------------------------------------------------------------
# Pure pieces: log-probabilities, teacher targets, divergence.
# ----------------------------------------------------------------------------

def normalized_log_probs(logits_BxLxV, x_BxL, mask_id: int, normalizer: str = "ours"):
  """float32 log p(x0) [B, L, V] from logits, log p[MASK] = -1e6 (finite, so that
  0 * (log p_s - log p_t) at the MASK entry is 0, not NaN).

  "ours": MASK out of the softmax (logit[MASK] = -1e6 first). "reference": at the masked
  positions of x (x == MASK) logit[MASK] = 0 stays in the normaliser, as the reference's
  `_subs_parameterization` (module docstring), so the token probabilities sum to < 1 there;
  the unmasked positions are as "ours" (every loss and target reads masked positions only).
  """
  logits = jnp.asarray(logits_BxLxV).astype(jnp.float32)
  if normalizer == "ours":
    return jax.nn.log_softmax(logits.at[..., mask_id].set(objectives.NEG_INF_MDLM), axis=-1)
  if normalizer != "reference":
    raise ValueError(f"config.distill.normalizer must be one of {NORMALIZERS}, "
                     f"got {normalizer!r}")
  mask_logit = jnp.where(x_BxL == mask_id, 0.0, objectives.NEG_INF_MDLM)
  logp = jax.nn.log_softmax(logits.at[..., mask_id].set(mask_logit), axis=-1)
  return logp.at[..., mask_id].set(objectives.NEG_INF_MDLM)


def log_probs(params, x_BxL, valid_BxL, *, model, mask_id: int, train: bool,
              rngs: Optional[dict] = None, t_B=None, normalizer: str = "ours"):
  """float32 log p(x0) [B, L, V] in the naive layout, the MASK positions of `x_BxL` hidden
  (the family's `predict_hidden`: a PGM's group 1, an MDLM's x_t); logit[MASK] = -1e6
  (finite, so that 0 * (log p_s - log p_t) at the MASK entry is 0, not NaN). `valid_BxL` is
  the attention's key validity (None: attend to every position); `t_B` is read only by a
  time-conditioned MDLM (sigma(t), as its sampler passes it). `normalizer`:
  `normalized_log_probs`."""
  sigma = None
  if getattr(model.config, "time_conditioning", False) and t_B is not None:
    sigma = objectives.sigma(t_B)
  logits = families.get(model.config.kind).predict_hidden(
      params, x_BxL, x_BxL == mask_id, valid_BxL, model=model, mask_id=mask_id, sigma_B=sigma,
      train=train, rngs=rngs or {})
  return normalized_log_probs(logits, x_BxL, mask_id, normalizer)


def teacher_targets(logp_fn: Callable, x_t_BxL, t_B, dt, key, *, num_steps: int,
                    mask_id: int, eps: float, noise: Optional[Sequence] = None,
                    normalizer: str = "ours"):
  """The teacher's targets: (log p [B, L, V], x after the steps [B, L]).

  `logp_fn(x, t_B) -> [B, L, V]` is the teacher at time t_B (only a time-conditioned
  MDLM reads it). Step j runs from t - j dt to t - (j+1) dt;
  each masked position takes step j's prediction while it is still masked at the start
  of step j, so it ends with the prediction of the step that revealed it (or of the last
  step). `noise`: optional per-step (uniform [B, L], Gumbel [B, L, V]) pairs instead of
  draws from `key` (tests). normalizer="reference": the reveal probability of a position
  is the reference's, P (a_s - a_t) / (P (a_s - a_t) + 1 - a_s) with P = sum_v p_v < 1 (the
  module docstring); "ours": (a_s - a_t) / (1 - a_t), the same formula at P = 1.
  """
  x = x_t_BxL
  target = None
  for j in range(num_steps):
    t_j = jnp.maximum(t_B - j * dt, eps)
    logp = logp_fn(x, t_j)
    masked = x == mask_id
    target = logp if target is None else jnp.where(masked[..., None], logp, target)
    s_j = jnp.maximum(t_B - (j + 1) * dt, 0.0)
    a_t, a_s = objectives.alpha(t_j), objectives.alpha(s_j)
    p_reveal = jnp.clip((a_s - a_t) / (1.0 - a_t), 0.0, 1.0)[:, None]
    if normalizer == "reference":
      mass = jnp.exp(jax.nn.logsumexp(logp, axis=-1))  # [B, L]
      gain = mass * (a_s - a_t)[:, None]
      p_reveal = jnp.clip(gain / jnp.maximum(gain + (1.0 - a_s)[:, None], 1e-30), 0.0, 1.0)
    if noise is None:
      u_key, g_key = jax.random.split(jax.random.fold_in(key, j))
      u = jax.random.uniform(u_key, x.shape)
      gumbel = jax.random.gumbel(g_key, logp.shape, jnp.float32)
    else:
      u, gumbel = noise[j]
    draw = jnp.argmax(logp + gumbel, axis=-1).astype(x.dtype)
    x = jnp.where(masked & (u < p_reveal), draw, x)
  return target, x


def divergence(student_logp, teacher_logp, weight_BxL, loss: str):
  """(sum over weighted positions, number of them) of the per-token divergence, float32.

  kl-bwd: sum_v p_s (log p_s - log p_t) = KL(student || teacher);
  kl-fwd: sum_v p_t (log p_t - log p_s) = KL(teacher || student).
  """
  s = student_logp.astype(jnp.float32)
  t = teacher_logp.astype(jnp.float32)
  if loss == "kl-bwd":
    per_token = jnp.sum(jnp.exp(s) * (s - t), axis=-1)
  elif loss == "kl-fwd":
    per_token = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  else:
    raise ValueError(f"config.distill.loss must be one of {LOSSES}, got {loss!r}")
  weight = weight_BxL.astype(bool)
  return jnp.sum(jnp.where(weight, per_token, 0.0)), weight.sum().astype(jnp.float32)


# ----------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------

def advance_round(state: DistillState, round_steps: int, teacher_steps: int) -> DistillState:
  """At the start of a step whose index is a positive multiple of round_steps: the
  student's raw weights become the teacher, the round + 1, dt x teacher_steps."""
  advance = (state.step > 0) & (state.step % round_steps == 0)
  teacher = jax.tree.map(lambda p, t: jnp.where(advance, p, t), state.params,
                         state.teacher_params)
  return state.replace(
      teacher_params=teacher,
      distill_round=state.distill_round + advance.astype(jnp.int32),
      distill_dt=jnp.where(advance, state.distill_dt * teacher_steps, state.distill_dt))


def distill_step(state: DistillState, batch, rng, *, model, tx, config, mask_id: int):
  """One SDTT step over the global batch (module docstring); same signature and
  shardings as `steps.train_step`."""
  d = config.distill
  state = advance_round(state, d.round_steps, d.teacher_steps)
  step_rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, teacher_rng, dropout_rng = jax.random.split(step_rng, 4)
  tokens, valid = batch["tokens"], batch["valid"]
  batch_size, seq_len = tokens.shape
  accum = config.train.grad_accum_steps
  t_B = stratified_times(t_rng, batch_size, groups=1, sampling_eps=d.sampling_eps,
                               antithetic=config.train.antithetic)
  # The forward process on the log-linear schedule (eps 1e-3), as in pre-training.
  masked = objectives.groups_from_uniform(jax.random.uniform(noise_rng, (batch_size, seq_len)),
                                          t_B).astype(bool)
  x_t = jnp.where(masked, mask_id, tokens)
  normalizer = d.get("normalizer", "ours")
  logp = lambda params, x, v, **kw: log_probs(params, x, v, model=model, mask_id=mask_id,
                                               normalizer=normalizer, **kw)

  # The reference's LM1B models attend to pads (config.data.attend_to_padding); the loss
  # never counts them.
  attend_all = bool(config.data.get("attend_to_padding", False))
  model_valid = lambda v: None if attend_all else v

  # The mean is over the masked valid tokens of the global batch: each microbatch
  # contributes its sum over that global count, and the gradients add up.
  count = ((x_t == mask_id) & valid.astype(bool)).sum().astype(jnp.float32)
  denom = jnp.maximum(count, 1.0)

  def micro_loss(params, x_mb, valid_mb, t_mb, target_mb, r):
    student = logp(params, x_mb, model_valid(valid_mb), train=True, rngs={"dropout": r},
                   t_B=t_mb)
    weight = (x_mb == mask_id) & valid_mb.astype(bool)
    total, _ = divergence(student, target_mb, weight, d.loss)
    return total / denom

  grad_fn = jax.value_and_grad(micro_loss)
  split = lambda x: steps.keep_batch_sharded(
      x.reshape((accum, batch_size // accum) + x.shape[1:]))
  inputs = (jnp.arange(accum), split(x_t), split(valid), split(t_B))

  def body(carry, inputs):
    grads_acc, loss_acc = carry
    i, x_mb, valid_mb, t_mb = inputs
    teacher_fn = lambda x, t: logp(state.teacher_params, x, model_valid(valid_mb),
                                   train=False, t_B=t)
    target, _ = teacher_targets(teacher_fn, x_mb, t_mb, state.distill_dt,
                                jax.random.fold_in(teacher_rng, i), num_steps=d.teacher_steps,
                                mask_id=mask_id, eps=d.sampling_eps, normalizer=normalizer)
    loss, grads = grad_fn(state.params, x_mb, valid_mb, t_mb, jax.lax.stop_gradient(target),
                          jax.random.fold_in(dropout_rng, i))
    return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  init = (zeros, jnp.zeros((), jnp.float32))
  (grads, loss), _ = jax.lax.scan(body, init, inputs)
  metrics = DistillMetrics.single_from_model_output(
      loss=loss, grad_norm=optax.tree.norm(grads), masked_tokens=count,
      learning_rate=steps.learning_rate_schedule(config.opt)(state.step),
      distill_round=state.distill_round.astype(jnp.float32), distill_dt=state.distill_dt)
  return steps.apply_gradients(state, grads, tx=tx, opt_config=config.opt), metrics


def heldout_loss(student_params, teacher_params, tokens_BxL, valid_BxL, dt, rng, *, model,
                 config, mask_id: int):
  """The distillation loss without a gradient, as `distill_step` draws it (t, x_t, the
  teacher's `teacher_steps` steps of size `dt`): (sum over masked valid tokens, their
  number). On validation batches it tells whether a student learned its round's objective:
  its value must fall below the same loss with the round's teacher as the student."""
  d = config.distill
  batch_size, seq_len = tokens_BxL.shape
  t_rng, noise_rng, teacher_rng = jax.random.split(rng, 3)
  t_B = stratified_times(t_rng, batch_size, groups=1, sampling_eps=d.sampling_eps,
                               antithetic=config.train.antithetic)
  masked = objectives.groups_from_uniform(
      jax.random.uniform(noise_rng, (batch_size, seq_len)), t_B).astype(bool)
  x_t = jnp.where(masked, mask_id, tokens_BxL)
  attend_all = bool(config.data.get("attend_to_padding", False))
  model_valid = None if attend_all else valid_BxL
  normalizer = d.get("normalizer", "ours")
  logp = lambda params, x, t: log_probs(params, x, model_valid, model=model,
                                        mask_id=mask_id,
                                        train=False, t_B=t, normalizer=normalizer)
  target, _ = teacher_targets(lambda x, t: logp(teacher_params, x, t), x_t, t_B, dt,
                              teacher_rng, num_steps=d.teacher_steps, mask_id=mask_id,
                              eps=d.sampling_eps, normalizer=normalizer)
  weight = (x_t == mask_id) & valid_BxL.astype(bool)
  return divergence(logp(student_params, x_t, t_B), target, weight, d.loss)


# ----------------------------------------------------------------------------
# Start from the teacher's checkpoint; what a checkpoint says about its round.
# ----------------------------------------------------------------------------

def _step_dir(directory: str, key: str) -> epath.Path:
  """The latest step folder (absolute) of a workdir, its checkpoints/ folder, or a step
  folder; relative local paths are made absolute against the working directory."""
  path = epath.Path(checkpointing.absolute(directory))
  if not path.is_dir():
    raise ValueError(f"{key}: {directory} does not exist")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "state").is_dir():
    return path
  step = checkpointing.latest_step(os.fspath(path))
  if step is None:
    raise ValueError(f"{key}: no checkpoint found in {directory}")
  return path / str(step)


def start_from_teacher(setup) -> DistillState:
  """A fresh DistillState (step 0, round 1) whose student, EMA and teacher are the EMA
  weights of config.distill.teacher_workdir's latest checkpoint; fresh optimizer state."""
  key = "config.distill.teacher_workdir"
  src = setup.config.distill.get("teacher_workdir")
  if not src:
    raise ValueError(f"config.distill.enabled needs {key}: the workdir of the trained model "
                     f"to distil (or a converted checkpoint)")
  step_dir = _step_dir(src, key)
  manager = checkpointing.make_manager(os.fspath(step_dir.parent), read_only=True)
  try:
    checkpointing.check_compatible(manager, int(step_dir.name),
                                   {"ema_params": setup.abstract_state.params},
                                   subtree="ema_params")
  except ValueError as e:
    raise ValueError(f"{key}: {e}") from None
  finally:
    manager.close()
  params = checkpointing.restore_params(os.fspath(step_dir), setup.abstract_state.params,
                                        flag=key)
  dt = initial_dt(setup.config)

  def build(p):
    copy = lambda: jax.tree.map(jnp.copy, p)
    return DistillState(step=jnp.zeros((), jnp.int32), params=p, opt_state=setup.tx.init(p),
                        ema_params=copy(), teacher_params=copy(),
                        distill_round=jnp.ones((), jnp.int32),
                        distill_dt=jnp.asarray(dt, jnp.float32))

  # Jitted with the state's shardings (an eager tx.init would put Optax's count on one
  # device, and the step may not transfer it).
  return jax.jit(build, out_shardings=setup.state_shardings)(params)


def checkpoint_info(workdir: str, step: int, config=None) -> dict:
  """{distill_round, distill_dt} of a distillation checkpoint, read from the checkpoint
  itself, plus distill_student_steps (`student_steps`) when `config` is a distillation
  config; {} for any other checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step_dir = epath.Path(checkpointing.checkpoint_dir(workdir)) / str(step)
  manager = checkpointing.make_manager(os.fspath(step_dir.parent), read_only=True)
  try:
    meta = manager.item_metadata(step)
  finally:
    manager.close()
  tree = getattr(meta["state"], "tree", meta["state"]) if meta and "state" in meta else {}
  if not isinstance(tree, dict) or "distill_round" not in tree:
    return {}
  target = {"distill_round": jax.ShapeDtypeStruct((), jnp.int32),
            "distill_dt": jax.ShapeDtypeStruct((), jnp.float32)}
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = ocp.PyTreeCheckpointer().restore(
      os.fspath(step_dir / "state"),
      args=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), target)))
  r, dt = int(jax.device_get(restored["distill_round"])), float(
      jax.device_get(restored["distill_dt"]))
  info = {"distill_round": r, "distill_dt": dt}
  if config is not None and config_lib.distill_enabled(config):
    info["distill_student_steps"] = student_steps(config, r)
  return info
