"""The training loop (importable: `main.py` and Colab both call it).

    train_and_evaluate(config, workdir) -> dict of final metrics

Evaluation (`--mode=eval`) is `pgm_jax.evaluation.evaluate`, sampling (`--mode=sample`)
`pgm_jax.sample.sample`; all of them start from `pgm_jax.experiment`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from pgm_jax import distill, steps
from pgm_jax.core import checkpointing, config_lib, fileio, sharding, throughput
from pgm_jax.data import pipeline
from pgm_jax.evaluation import perplexity
from pgm_jax import experiment
from pgm_jax.core.metric_writers import MetricWriter
from pgm_jax import sample as sample_lib


# A NaN this many steps after a resume is blamed on the restored checkpoint first.
RESUME_SUSPECT_STEPS = 3


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf; nothing after the last good checkpoint was saved."""


class _StopAgreement:
  """Agrees across processes on SIGTERM (which may reach only some hosts), without a
  blocking all-gather.

  Called once per step, right after the train step is dispatched, with this process's
  flag: it dispatches a tiny jitted max of every process's flag (one element per device,
  replicated result) and returns the result dispatched one step earlier. That result is
  ready by then (it was queued behind the previous step, whose loss the loop reads
  anyway) and it is the same on every process, so all processes stop after the same step,
  at most two steps after the signal.
  """

  def __init__(self, mesh):
    self._sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    self._shape = (mesh.size,)
    self._any = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))
    self._pending = None

  def __call__(self, requested: bool) -> bool:
    previous = self._pending
    local = np.full((1,), requested, np.int32)
    flags = jax.make_array_from_callback(self._shape, self._sharding, lambda _: local)
    self._pending = self._any(flags)
    return previous is not None and bool(jax.device_get(previous))


def make_train_step(setup: experiment.Setup):
  """The train step jitted with explicit in/out shardings, donating the state: SDTT's
  `distill.distill_step` when config.distill.enabled.

  Also what `--mode=plan` lowers and compiles ahead of time (pgm_jax/tools/plan.py).
  """
  step_fn = (distill.distill_step if config_lib.distill_enabled(setup.config)
             else steps.train_step)
  return jax.jit(
      experiment.with_mesh(setup.mesh, functools.partial(step_fn, model=setup.model, tx=setup.tx,
                                               config=setup.config, mask_id=setup.mask_id)),
      in_shardings=(setup.state_shardings, setup.batch_sharding,
                    sharding.replicated(setup.mesh)),
      out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
      donate_argnums=(0,))


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint and stop after this step.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _StepProfiler:
  """config.train.profile_steps = (start, stop): a jax.profiler trace of steps start..stop
  (inclusive; step N is the one after which the state has N updates, as in the log), written
  to `logdir` (WORKDIR/tensorboard) as plugins/profile/<run>/<host>.xplane.pb, where
  TensorBoard's profile plugin finds it. Only process 0 traces (every process runs the same
  SPMD program; one trace per slice keeps the run folder to one host). A run that resumes
  inside the window traces from its first step; `close` (always called) ends a trace that
  training, an error or a SIGTERM stop cut short."""

  def __init__(self, window, logdir: str, enabled: bool):
    self._window = window if enabled else None
    self._logdir = logdir
    self.active = False

  def before(self, next_step: int) -> None:
    """Called before dispatching step `next_step`."""
    if self._window is None or self.active:
      return
    start, stop = self._window
    if start <= next_step <= stop:
      logging.info("Profiling steps %d..%d into %s", next_step, stop, self._logdir)
      jax.profiler.start_trace(self._logdir)
      self.active = True

  def after(self, step: int, metrics) -> None:
    """Called after dispatching step `step` (its `metrics` not yet ready)."""
    if self.active and step >= self._window[1]:
      jax.block_until_ready(metrics)  # the trace holds the last step's device work
      self.close()
      self._window = None

  def close(self) -> None:
    if not self.active:
      return
    self.active = False
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except
      # Never hide the error that is ending training (close runs in a finally).
      logging.warning("jax.profiler.stop_trace failed: %s", e)
      return
    logging.info("Profile written under %s (TensorBoard: the Profile tab)", self._logdir)


def _evaluated_steps(workdir: str) -> set:
  """The steps that metrics.jsonl holds a validation row for."""
  steps = set()
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # a line cut by a crash
        if isinstance(row, dict) and "val/ppl" in row and "step" in row:
          steps.add(int(row["step"]))
  except OSError:
    pass
  return steps


def _eval_missed_at_resume(workdir: str, start_step: int, t_cfg) -> bool:
  """Whether the resumed step is an eval step whose eval never ran (decided by process 0,
  whose metrics.jsonl it is, and shared: the eval is collective)."""
  due = start_step > 0 and (start_step % t_cfg.eval_every == 0 or start_step == t_cfg.num_steps)
  missed = due and start_step not in _evaluated_steps(workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
  return missed


# Progress/ETA by hand, not clu.periodic_actions.ReportProgress/Profile: clu.periodic_actions
# imports clu.metric_writers, which imports TensorFlow unconditionally (+1.5 GB; not a dependency).
def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def restore_or_init(setup: experiment.Setup, manager, train_iter, rng):
  """Resume order: workdir latest > ckpt.restore_from > ckpt.init_params_from > fresh.
  Distillation starts fresh runs from config.distill.teacher_workdir instead."""
  ckpt = setup.config.ckpt
  restored = checkpointing.restore_latest(manager, setup.abstract_state, train_iter,
                                          move_bad=True)
  if restored is not None:
    step, state, _ = restored
    logging.info("Resumed from %s/%d", manager.directory, step)
    return state
  if ckpt.get("restore_from"):
    src_dir = ckpt.restore_from
    if not epath.Path(src_dir).is_dir():
      raise ValueError(f"config.ckpt.restore_from: {src_dir} does not exist")
    if (epath.Path(src_dir) / "checkpoints").is_dir():
      src_dir = os.path.join(src_dir, "checkpoints")
    src = checkpointing.make_manager(src_dir, read_only=True)
    step = src.latest_step()
    if step is None:
      raise ValueError(f"config.ckpt.restore_from: no checkpoint in {src_dir}")
    logging.info("Restoring full state from %s/%d", src_dir, step)
    state, _ = checkpointing.restore(src, step, setup.abstract_state, train_iter)
    return state
  if config_lib.distill_enabled(setup.config):
    return distill.start_from_teacher(setup)
  state = experiment.init_state(setup, rng)
  if ckpt.get("init_params_from"):
    src_dir = ckpt.init_params_from
    if not epath.Path(src_dir).is_dir():
      raise ValueError(f"config.ckpt.init_params_from: {src_dir} does not exist")
    params = checkpointing.restore_params(src_dir, setup.abstract_state.params,
                                          flag="config.ckpt.init_params_from")
    logging.info("Initialised params (EMA weights) from %s", src_dir)
    # Jitted with the state's shardings: an eager tx.init would put Optax's `count` on one
    # device, and the train step may not transfer it.
    ema_params, opt_state = jax.jit(
        lambda p: (jax.tree.map(jnp.copy, p), setup.tx.init(p)),
        out_shardings=(setup.state_shardings.ema_params, setup.state_shardings.opt_state))(
            params)
    state = state.replace(params=params, ema_params=ema_params, opt_state=opt_state)
  return state


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming automatically) and returns final metrics.

  One writer per workdir: process 0 holds `fileio.WorkdirLock` for the whole run, so a
  second job on a workdir that a live job holds is refused in one line naming the holder
  (a local workdir; an object-store URL cannot be locked this way)."""
  setup = experiment.make_setup(config)
  if setup.family.is_image:
    pipeline.check_label_classes(config.data, config.model.num_classes)
  fileio.check_writable_dir(workdir)  # every process: each writes its checkpoint shards
  workdir = experiment.abspath(workdir)
  lock, refusal = None, None
  if jax.process_index() == 0 and not fileio.is_url(workdir):
    try:
      lock = fileio.WorkdirLock(workdir)
    except ValueError as e:
      refusal = e
  if jax.process_count() > 1:  # every process learns process 0's answer: none waits alone
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    held = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is None)))
    if not held and refusal is None:
      refusal = ValueError(f"--workdir={workdir} is in use by another job (process 0 found "
                           f"{os.path.join(workdir, fileio.LOCK_NAME)} held)")
  if refusal is not None:
    raise refusal
  try:
    return _train_and_evaluate(config, workdir, setup)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str, setup: experiment.Setup) -> dict:
  t_cfg = config.train
  is_host0 = jax.process_index() == 0
  train_iter = pipeline.build_train_iterator(
      config.data, setup.tokenizer, seed=config.seed, batch_size=t_cfg.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), config.ckpt)
  rng = jax.random.key(config.seed)
  state = restore_or_init(setup, manager, train_iter, jax.random.fold_in(rng, 0))
  # A global, replicated key (made by a jitted fn, so it is valid on multi-host meshes too):
  # a single-device key would need a transfer into the step, which the guard forbids.
  train_rng = jax.jit(lambda: jax.random.fold_in(jax.random.key(config.seed), 1),
                      out_shardings=sharding.replicated(setup.mesh))()
  start_step = int(jax.device_get(state.step))
  if is_host0:
    experiment.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  writer = MetricWriter(workdir, just_logging=not is_host0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("model=%s params=%.2fM vocab=%d seq_len=%d devices=%d mesh=%s",
               config.model.kind, n_params / 1e6, setup.tokenizer.vocab_size,
               config.data.seq_len, setup.mesh.size, dict(setup.mesh.shape))

  step_fn = make_train_step(setup)
  eval_fn = perplexity.make_eval_fn(setup)

  # MFU: the analytic FLOPs of one optimizer step (the count --mode=plan reports) over the
  # chips' dense bf16 peak; no peak known (CPU, an unlisted chip) -> no train/mfu.
  tokens_per_step = t_cfg.batch_size * config.data.seq_len
  flops_per_step = setup.family.train_flops(setup.model_cfg, setup.abstract_state.params,
                                            int(t_cfg.batch_size),
                                            int(config.data.seq_len))["total"]
  device_kind = setup.mesh.devices.flat[0].device_kind
  peak = throughput.peak_flops_per_chip(device_kind, t_cfg.get("peak_flops_per_chip"))
  logging.info("model FLOPs/step %.4g (analytic); peak %s FLOP/s per chip (%s)",
               flops_per_step, "unknown" if peak is None else f"{peak:.4g}", device_kind)
  profiler = _StepProfiler(config_lib.profile_window(t_cfg),
                           os.path.join(workdir, "tensorboard"), enabled=is_host0)

  last_saved = manager.latest_step()
  history: dict[str, Any] = {}
  accumulated = None
  prev_metrics = None
  timer_start, timer_step = time.time(), start_step
  step = start_step

  def check_finite(metrics, at_step):
    loss = float(jax.device_get(metrics.loss.total))
    if math.isfinite(loss):
      return
    where = (f"step {last_saved} in {manager.directory}" if last_saved is not None
             else "none (no checkpoint was written)")
    if start_step > 0 and at_step - start_step <= RESUME_SUSPECT_STEPS:
      # Right after a resume the restored step is as likely a culprit as the learning rate:
      # damage that no checksum covered (a step saved before checksums existed).
      earlier = [s for s in manager.all_steps() if s < start_step]
      previous = (f"the previous kept step is {max(earlier)}: move {manager.directory}/"
                  f"{start_step} aside to resume from it" if earlier
                  else "no earlier step is kept")
      raise NonFiniteLossError(
          f"non-finite training loss ({loss}) at step {at_step}, {at_step - start_step} "
          f"step(s) after resuming; stopping without saving. Last checkpoint: {where}, which "
          f"may be damaged if the config did not change ({previous}); else try a lower "
          f"config.opt.lr or config.opt.grad_clip.")
    raise NonFiniteLossError(
        f"non-finite training loss ({loss}) at step {at_step}; stopping without saving. "
        f"Last good checkpoint: {where}. Try a lower config.opt.lr or config.opt.grad_clip.")

  def save(at_step, metrics):
    """Saves `at_step` unless it is already saved (Orbax refuses a second save of a step:
    a stop or the end of training may land on a checkpoint step)."""
    nonlocal last_saved
    if at_step == last_saved:
      return
    if metrics is not None:
      check_finite(metrics, at_step)
    checkpointing.save(manager, at_step, state, train_iter)
    last_saved = at_step

  def run_eval(at_step):
    val = perplexity.run_validation(setup, experiment.eval_params(state), eval_fn)
    writer.write_scalars(at_step, {"val/nll": val["val_nll"], "val/ppl": val["val_ppl"]})
    logging.info("step %d | val_ppl %.3f (%d tokens)", at_step, val["val_ppl"],
                 val["val_tokens"])
    history.update({f"val/{k[4:]}": v for k, v in val.items()})

  agree_to_stop = _StopAgreement(setup.mesh) if jax.process_count() > 1 else None
  try:
    with _Preemption() as preemption:
      if _eval_missed_at_resume(workdir, start_step, t_cfg):
        # A stop (SIGTERM) on an eval step saved the step and skipped its eval: run it now,
        # or a run stopped on its last step would never report its final val PPL.
        logging.info("Step %d was saved without its evaluation: evaluating it now.", start_step)
        run_eval(start_step)
      while step < t_cfg.num_steps:
        local = next(train_iter)
        batch = sharding.global_batch(local, setup.batch_sharding)
        profiler.before(step + 1)
        with jax.transfer_guard("disallow"):
          state, metrics = step_fn(state, batch, train_rng)
        step += 1
        profiler.after(step, metrics)
        if step == start_step + 1:
          # Exclude compilation from the throughput and ETA.
          jax.block_until_ready(metrics)
          timer_start, timer_step = time.time(), step
        # Never block on the step just dispatched: look at the previous one.
        if prev_metrics is not None:
          check_finite(prev_metrics, step - 1)
        prev_metrics = metrics
        accumulated = metrics if accumulated is None else accumulated.merge(metrics)

        if step % t_cfg.log_every == 0 or step == t_cfg.num_steps:
          scalars = {f"train/{k}": v for k, v in jax.device_get(accumulated.compute()).items()}
          accumulated = None
          now = time.time()
          rate = (step - timer_step) / max(now - timer_start, 1e-9)
          timer_start, timer_step = now, step
          scalars["train/steps_per_s"] = rate
          scalars["train/tokens_per_s"] = rate * tokens_per_step
          scalars["train/tokens_per_s_per_chip"] = rate * tokens_per_step / setup.mesh.size
          mfu = ""
          if peak is not None:
            scalars["train/mfu"] = throughput.mfu(flops_per_step, rate, peak, setup.mesh.size)
            mfu = f" | MFU {100 * scalars['train/mfu']:.1f}%"
          writer.write_scalars(step, scalars)
          logging.info("step %d/%d | loss %.4f | %.2f steps/s | %.0f tokens/s/chip%s | ETA %s",
                       step, t_cfg.num_steps, scalars["train/loss"], rate,
                       scalars["train/tokens_per_s_per_chip"], mfu,
                       _format_eta((t_cfg.num_steps - step) / max(rate, 1e-9)))
          history.update(scalars)
          if not math.isfinite(scalars["train/loss"]):
            check_finite(metrics, step)

        # Save before the eval of the same step: an eval that crashes (or is cut short by
        # a preemption) cannot cost checkpoint N.
        if step % config.ckpt.every_steps == 0 or step == t_cfg.num_steps:
          save(step, metrics)

        # One process knows its own SIGTERM at once and skips a (long) eval to stop sooner;
        # several processes must all run the eval or none (it is collective).
        stopping = agree_to_stop is None and preemption.requested
        if (step % t_cfg.eval_every == 0 or step == t_cfg.num_steps) and not stopping:
          run_eval(step)

        # SIGTERM may reach only some hosts: agree on it before anyone saves and stops, or
        # the others hang (one step late, without blocking: see _StopAgreement). save()
        # skips a step that is already saved, so a stop on a checkpoint step saves once.
        stop = (preemption.requested if agree_to_stop is None else
                agree_to_stop(preemption.requested))
        if stop:
          save(step, metrics)
          checkpointing.wait(manager)
          logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
          history["preempted"] = True
          return history
      profiler.close()  # training ended inside the window: the samples are not traced
      if prev_metrics is not None:
        check_finite(prev_metrics, step)
      if step > 0:
        save(step, None)
      checkpointing.wait(manager)

      # After the loop SIGTERM still only sets the flag (exit 0, nothing saved twice); a
      # preempted job skips the end-of-training samples. Several processes sample
      # collectively and the signal may reach only some: all must decide alike.
      final = config.train.num_final_samples > 0 and not sharding.any_process([preemption.requested])[0]
      # A SIGTERM stops the final samples between sampler steps and batches (the checkpoint
      # is already saved); several processes agree on it at each check (every process makes
      # the same checks, so they stop at the same one).
      if agree_to_stop is None:
        should_stop = lambda: preemption.requested
      else:
        agree_to_stop_sampling = _StopAgreement(setup.mesh)
        should_stop = lambda: agree_to_stop_sampling(preemption.requested)
      if final:
        logging.info("Final samples: %d, %d sampler steps each (SIGTERM stops them; the "
                     "checkpoint of step %d is saved)", config.train.num_final_samples,
                     config.sample.steps, step)
      try:
        if final and setup.family.is_image:
          # A PNG grid (one row per class) and the codes: samples_step<N>.{png,npz}.
          history["samples"] = sample_lib.sample_images(
              config, workdir, setup=setup, params=experiment.eval_params(state), step=step,
              prefix=f"samples_step{step}", should_stop=should_stop)
          final = False
        elif final:
          # Every process runs the sampler (params are global arrays); only process 0 writes.
          samples = sample_lib.generate_samples(
              setup, experiment.eval_params(state), num_samples=config.train.num_final_samples,
              num_steps=config.sample.steps, seed=config.sample.seed, should_stop=should_stop)
      except sample_lib.SamplingStopped as e:
        logging.warning("SIGTERM during the final samples: %s; none written (the checkpoint of "
                        "step %d is saved).", e, step)
        history["preempted"] = True
        final = False
      if final:
        path = os.path.join(workdir, f"samples_step{step}.txt")
        if is_host0:
          experiment.write_text(path, "".join(
              f"=== sample {i} ({config.model.kind}, {s['sampler']}, {s['steps']} steps) "
              f"===\n{s['text']}\n\n" for i, s in enumerate(samples)))
        writer.write_texts(step, {f"samples/{i}": s["text"] for i, s in enumerate(samples)})
        for i, s in enumerate(samples):
          logging.info("sample %d: %s", i, s["text"][:500].replace("\n", " / "))
        logging.info("Samples written to %s", path)
        history["samples"] = [s["text"] for s in samples]
  finally:
    profiler.close()
    checkpointing.wait(manager)
    manager.close()
    writer.close()
  history["step"] = step
  return history


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out

