"""Training and evaluation loops (importable: `main.py` and Colab both call these).

    train_and_evaluate(config, workdir) -> dict of final metrics
    evaluate(config, workdir)           -> {"val_ppl": ..., ...}, also WORKDIR/eval.json
"""
from __future__ import annotations

import dataclasses
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

from pgm_jax import checkpointing, config_lib, sampling, sharding, steps
from pgm_jax import input_pipeline, tokenizers
from pgm_jax.metric_writers import MetricWriter
from pgm_jax.models import build_model, model_config_from


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass
class Setup:
  """Everything derived from a config, shared by train, eval and sampling."""
  config: Any
  tokenizer: Any
  mesh: jax.sharding.Mesh
  model_cfg: Any
  model: Any
  tx: Any
  state_shardings: Any        # TrainState of NamedSharding
  abstract_state: Any         # TrainState of ShapeDtypeStruct (with shardings)
  batch_sharding: Any
  data_parallel: int

  @property
  def mask_id(self) -> int:
    return self.tokenizer.mask_id


def make_setup(config, devices=None) -> Setup:
  """Validates the config and builds the model, optimizer, mesh and shardings.

  `devices`: the devices of the mesh (default: all, `jax.devices()`).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  data_parallel = sharding.data_parallel_size(mesh)
  config_lib.validate(config, num_devices=mesh.size, data_parallel=data_parallel,
                      mesh_shape=dict(mesh.shape))
  tokenizer = tokenizers.get_tokenizer(config.data)
  model_cfg = model_config_from(config, vocab_size=tokenizer.vocab_size,
                                mask_id=tokenizer.mask_id)
  if not 1 <= config.sample.steps <= config.data.seq_len - 1:
    raise ValueError(f"config.sample.steps={config.sample.steps} must be in "
                     f"[1, config.data.seq_len - 1 = {config.data.seq_len - 1}]")
  if config.attn.impl == "pallas":
    from pgm_jax.ops import pallas_attention  # pylint: disable=g-import-not-at-top
    pallas_attention.check_block_sizes(config.data.seq_len, config.data.seq_len,
                                       config.attn.block_q, config.attn.block_kv)
  sampler = config_lib.resolve_sampler(config)
  allowed = {"pgm": sampling.PGM_SAMPLERS, "mdlm": sampling.MDLM_SAMPLERS,
             "ar": sampling.AR_SAMPLERS}[model_cfg.kind]
  if sampler not in allowed:
    raise ValueError(f"config.sample.sampler={sampler!r} is not a {model_cfg.kind} sampler; "
                     f"use one of {allowed} or 'auto'")
  model = build_model(model_cfg)
  tx = steps.make_optimizer(config.opt)
  boxed = jax.eval_shape(_boxed_init_fn(model, tx, config), jax.random.key(0))
  rules = sharding.logical_rules(config.mesh)
  state_shardings = sharding.shardings_from_boxed(boxed, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      steps.unbox(boxed), state_shardings)
  return Setup(config=config, tokenizer=tokenizer, mesh=mesh, model_cfg=model_cfg, model=model,
               tx=tx, state_shardings=state_shardings, abstract_state=abstract_state,
               batch_sharding=sharding.batch_sharding(mesh), data_parallel=data_parallel)


def _abspath(path: str) -> str:
  """Absolute local path; URLs (gs://...) are left alone (they are shared by all hosts)."""
  return path if "://" in path else os.path.abspath(path)


def _write_text(path: str, text: str) -> None:
  """Writes a small file (local or gs://). Call it from process 0 only."""
  epath.Path(path).write_text(text, encoding="utf-8")


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


def with_mesh(mesh, fn):
  """`fn` traced under `mesh` as the abstract mesh, so that the attention op can wrap its
  Pallas kernels in `jax.shard_map` (batch over data/fsdp, heads over tensor)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def make_train_step(setup: Setup):
  """The train step jitted with explicit in/out shardings, donating the state.

  Also what `--mode=plan` lowers and compiles ahead of time (pgm_jax/plan.py).
  """
  return jax.jit(
      with_mesh(setup.mesh, functools.partial(steps.train_step, model=setup.model, tx=setup.tx,
                                               config=setup.config, mask_id=setup.mask_id)),
      in_shardings=(setup.state_shardings, setup.batch_sharding,
                    sharding.replicated(setup.mesh)),
      out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
      donate_argnums=(0,))


def abstract_batch(setup: Setup, batch_size: int | None = None) -> dict:
  """ShapeDtypeStructs (with the batch sharding) of one global training batch."""
  b = setup.config.train.batch_size if batch_size is None else batch_size
  shape = (b, setup.config.data.seq_len)
  return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding),
          "valid": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=setup.batch_sharding)}


def _boxed_init_fn(model, tx, config):
  """rng -> boxed (logically partitioned) TrainState; shapes do not depend on the
  dummy input length (RoPE, no position table), so 8 tokens keep init cheap."""
  return functools.partial(steps.init_state, model=model, tx=tx, batch_size=1,
                           seq_len=min(config.data.seq_len, 8), kind=config.model.kind)


def init_state(setup: Setup, rng):
  """Sharded fresh init: abstract shapes -> shardings -> jit(init, out_shardings)."""
  init_fn = _boxed_init_fn(setup.model, setup.tx, setup.config)
  return jax.jit(lambda r: steps.unbox(init_fn(r)), out_shardings=setup.state_shardings)(rng)


def eval_params(state) -> Any:
  return state.ema_params


def make_eval_fn(setup: Setup):
  fn = functools.partial(steps.eval_step, model=setup.model, config=setup.config,
                         mask_id=setup.mask_id, data_parallel=setup.data_parallel)
  return jax.jit(with_mesh(setup.mesh, fn),
                 in_shardings=(setup.state_shardings.params, setup.batch_sharding,
                               sharding.replicated(setup.mesh)),
                 out_shardings=sharding.replicated(setup.mesh))  # host-readable everywhere


def run_validation(setup: Setup, params, eval_fn=None) -> dict:
  """Validation perplexity exp(total NLL / total valid tokens) over the val split."""
  config = setup.config
  eval_fn = eval_fn or make_eval_fn(setup)
  it = input_pipeline.build_eval_iterator(
      config.data, setup.tokenizer, batch_size=config.eval.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=config.eval.get("max_batches"))
  base = jax.random.key(config.eval.seed)
  if jax.process_count() > 1:  # a global key: the params span processes
    base = sharding.put_replicated(base, setup.mesh)
  nll_total, tokens_total, batches = 0.0, 0.0, 0
  pending = []
  for i, local in enumerate(it):
    batch = sharding.global_batch(local, setup.batch_sharding)
    pending.append(eval_fn(params, batch, jax.random.fold_in(base, i)))
    batches += 1
  for nll, count in jax.device_get(pending):
    nll_total += float(nll)
    tokens_total += float(count)
  if tokens_total == 0:
    raise ValueError("config.data: the validation split produced no tokens")
  nll = nll_total / tokens_total
  return {"val_nll": nll, "val_ppl": math.exp(min(nll, 700.0)), "val_tokens": tokens_total,
          "val_batches": batches}


def generate_samples(setup: Setup, params, *, num_samples: int, num_steps: int, seed: int,
                     sampler: str | None = None, prompts: tuple[str, ...] = (),
                     progress=None) -> list[dict]:
  """Samples as dicts {text, tokens, sampler, steps, seed, prompt}, in batches of
  config.sample.batch_size (each batch seeded with seed + batch index)."""
  cfg = setup.config
  sampler = sampler or config_lib.resolve_sampler(cfg)
  length = cfg.data.seq_len
  out = []
  batch_size = max(1, min(cfg.sample.batch_size, num_samples))
  for first in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - first)
    batch_prompts = [prompts[(first + i) % len(prompts)] for i in range(n)] if prompts else []
    prompt = sampling.make_prompt(batch_prompts, n, setup.tokenizer, length)
    batch_seed = seed + first // batch_size
    common = dict(model=setup.model, sampler=sampler, steps=num_steps, seed=batch_seed,
                  mask_id=setup.mask_id, top_p=cfg.sample.top_p,
                  temperature=cfg.sample.temperature)
    if setup.model_cfg.kind == "pgm":
      result = sampling.pgm_sample(params, prompt, bucket_size=cfg.sample.bucket_size,
                                   progress=progress, **common)
    elif setup.model_cfg.kind == "ar":
      result = sampling.ar_sample(params, prompt, **common)
    else:
      result = sampling.mdlm_sample(params, prompt, **common)
    for i, row in enumerate(result.tokens):
      out.append({"text": setup.tokenizer.decode(row.tolist()), "tokens": row.tolist(),
                  "sampler": sampler, "steps": num_steps, "seed": batch_seed,
                  "index": first + i, "prompt": batch_prompts[i] if batch_prompts else "",
                  "known": np.flatnonzero(prompt.known[i]).tolist()})
  return out


def read_prompts(config) -> tuple[str, ...]:
  prompts = []
  if config.sample.prompt:
    prompts.append(config.sample.prompt)
  path = config.sample.get("prompt_file")
  if path:
    if not os.path.isfile(path):
      raise ValueError(f"config.sample.prompt_file: {path} does not exist")
    with open(path, encoding="utf-8") as f:
      prompts.extend(line.rstrip("\n") for line in f if line.strip())
  return tuple(prompts)


def restore_eval_params(setup: Setup, workdir: str):
  """(step, EMA params) of the latest checkpoint in `workdir` (clear error if none)."""
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  step = checkpointing.latest_step(ckpt_dir)
  if step is None:
    raise ValueError(f"--workdir: no checkpoint found in {ckpt_dir}")
  manager = checkpointing.make_manager(ckpt_dir, read_only=True)
  try:
    state, _ = checkpointing.restore(manager, step, setup.abstract_state)
  finally:
    manager.close()
  return step, eval_params(state)


def sample(config, workdir: str) -> list[dict]:
  """--mode=sample: EMA weights of the latest checkpoint -> WORKDIR/samples.jsonl."""
  setup = make_setup(config)
  step, params = restore_eval_params(setup, workdir)
  prompts = read_prompts(config)
  sampler = config_lib.resolve_sampler(config)
  started = time.time()

  def progress(k, total):
    if k == total or k % max(1, total // 8) == 0:
      elapsed = time.time() - started
      logging.info("sampling step %d/%d | %.1fs elapsed", k, total, elapsed)

  samples = generate_samples(setup, params, num_samples=config.sample.num_samples,
                             num_steps=config.sample.steps, seed=config.sample.seed,
                             sampler=sampler, prompts=prompts, progress=progress)
  seconds = time.time() - started
  if jax.process_index() == 0:
    path = os.path.join(workdir, "samples.jsonl")
    _write_text(path, "".join(json.dumps(dict(s, checkpoint_step=step)) + "\n"
                              for s in samples))
    logging.info("%d samples (%s, %d steps) in %.1fs written to %s", len(samples), sampler,
                 config.sample.steps, seconds, path)
  return samples


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


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def restore_or_init(setup: Setup, manager, train_iter, rng):
  """Resume order: workdir latest > ckpt.restore_from > ckpt.init_params_from > fresh."""
  ckpt = setup.config.ckpt
  latest = manager.latest_step()
  if latest is not None:
    logging.info("Resuming from %s/%d", manager.directory, latest)
    state, _ = checkpointing.restore(manager, latest, setup.abstract_state, train_iter)
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
  state = init_state(setup, rng)
  if ckpt.get("init_params_from"):
    src_dir = ckpt.init_params_from
    if not epath.Path(src_dir).is_dir():
      raise ValueError(f"config.ckpt.init_params_from: {src_dir} does not exist")
    params = checkpointing.restore_params(src_dir, setup.abstract_state.params)
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
  """Trains `config` in `workdir` (resuming automatically) and returns final metrics."""
  setup = make_setup(config)
  t_cfg = config.train
  workdir = _abspath(workdir)
  is_host0 = jax.process_index() == 0
  train_iter = input_pipeline.build_train_iterator(
      config.data, setup.tokenizer, seed=config.seed, batch_size=t_cfg.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  if is_host0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), config.ckpt)
  rng = jax.random.key(config.seed)
  state = restore_or_init(setup, manager, train_iter, jax.random.fold_in(rng, 0))
  # A global, replicated key (made by a jitted fn, so it is valid on multi-host meshes too):
  # a single-device key would need a transfer into the step, which the guard forbids.
  train_rng = jax.jit(lambda: jax.random.fold_in(jax.random.key(config.seed), 1),
                      out_shardings=sharding.replicated(setup.mesh))()
  start_step = int(jax.device_get(state.step))
  if is_host0:
    _write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  writer = MetricWriter(workdir, just_logging=not is_host0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
  logging.info("model=%s params=%.2fM vocab=%d seq_len=%d devices=%d mesh=%s",
               config.model.kind, n_params / 1e6, setup.tokenizer.vocab_size,
               config.data.seq_len, setup.mesh.size, dict(setup.mesh.shape))

  step_fn = make_train_step(setup)
  eval_fn = make_eval_fn(setup)

  last_saved = manager.latest_step()
  history: dict[str, Any] = {}
  accumulated = None
  prev_metrics = None
  timer_start, timer_step = time.time(), start_step
  step = start_step

  def check_finite(metrics, at_step):
    loss = float(jax.device_get(metrics.loss.total))
    if not math.isfinite(loss):
      where = (f"step {last_saved} in {manager.directory}" if last_saved is not None
               else "none (no checkpoint was written)")
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

  agree_to_stop = _StopAgreement(setup.mesh) if jax.process_count() > 1 else None
  try:
    with _Preemption() as preemption:
      while step < t_cfg.num_steps:
        local = next(train_iter)
        batch = sharding.global_batch(local, setup.batch_sharding)
        with jax.transfer_guard("disallow"):
          state, metrics = step_fn(state, batch, train_rng)
        step += 1
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
          scalars["train/tokens_per_s"] = rate * t_cfg.batch_size * config.data.seq_len
          writer.write_scalars(step, scalars)
          logging.info("step %d/%d | loss %.4f | %.2f steps/s | ETA %s", step, t_cfg.num_steps,
                       scalars["train/loss"], rate,
                       _format_eta((t_cfg.num_steps - step) / max(rate, 1e-9)))
          history.update(scalars)
          if not math.isfinite(scalars["train/loss"]):
            check_finite(metrics, step)

        if step % t_cfg.eval_every == 0 or step == t_cfg.num_steps:
          val = run_validation(setup, eval_params(state), eval_fn)
          writer.write_scalars(step, {"val/nll": val["val_nll"], "val/ppl": val["val_ppl"]})
          logging.info("step %d | val_ppl %.3f (%d tokens)", step, val["val_ppl"],
                       val["val_tokens"])
          history.update({f"val/{k[4:]}": v for k, v in val.items()})

        if step % config.ckpt.every_steps == 0 or step == t_cfg.num_steps:
          save(step, metrics)
        # SIGTERM may reach only some hosts: agree on it before anyone saves and stops, or
        # the others hang (one step late, without blocking: see _StopAgreement).
        stop = (preemption.requested if agree_to_stop is None else
                agree_to_stop(preemption.requested))
        if stop:
          save(step, metrics)
          manager.wait_until_finished()
          logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
          history["preempted"] = True
          return history
    if prev_metrics is not None:
      check_finite(prev_metrics, step)
    if step > 0:
      save(step, None)
    manager.wait_until_finished()

    if config.train.num_final_samples > 0:
      # Every process runs the sampler (params are global arrays); only process 0 writes.
      samples = generate_samples(setup, eval_params(state),
                                 num_samples=config.train.num_final_samples,
                                 num_steps=config.sample.steps, seed=config.sample.seed)
      path = os.path.join(workdir, f"samples_step{step}.txt")
      if is_host0:
        _write_text(path, "".join(
            f"=== sample {i} ({config.model.kind}, {s['sampler']}, {s['steps']} steps) "
            f"===\n{s['text']}\n\n" for i, s in enumerate(samples)))
      writer.write_texts(step, {f"samples/{i}": s["text"] for i, s in enumerate(samples)})
      for i, s in enumerate(samples):
        logging.info("sample %d: %s", i, s["text"][:500].replace("\n", " / "))
      logging.info("Samples written to %s", path)
      history["samples"] = [s["text"] for s in samples]
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  history["step"] = step
  return history


def evaluate(config, workdir: str) -> dict:
  """Restores the latest checkpoint's EMA weights and computes validation perplexity."""
  setup = make_setup(config)
  if config.eval.gen_ppl and not config.eval.get("judge_workdir"):
    raise ValueError("config.eval.gen_ppl=True needs config.eval.judge_workdir (the workdir "
                     "of a trained AR judge, e.g. configs/shakespeare.py:ar)")
  step, params = restore_eval_params(setup, workdir)
  result = run_validation(setup, params)
  result.update(step=step, model=config.model.kind, seq_len=config.data.seq_len)
  if config.eval.gen_ppl:
    result.update(generation_metrics(setup, params, config.eval.judge_workdir))
  if jax.process_index() == 0:
    _write_text(os.path.join(workdir, "eval.json"), json.dumps(result, indent=2))
  return result


def generation_metrics(setup: Setup, params, judge_workdir: str) -> dict:
  """Samples config.eval.gen_num_samples sequences and scores them (gen PPL, entropy).

  Throughput is measured on a second pass over the same work, after compilation.
  """
  from pgm_jax import evaluation  # pylint: disable=g-import-not-at-top
  cfg = setup.config
  judge = evaluation.load_judge(judge_workdir)
  sampler = config_lib.resolve_sampler(cfg)
  kw = dict(num_samples=cfg.eval.gen_num_samples, num_steps=cfg.sample.steps,
            seed=cfg.sample.seed, sampler=sampler)
  generate_samples(setup, params, **dict(kw, num_samples=min(kw["num_samples"],
                                                              cfg.sample.batch_size)))
  started = time.perf_counter()
  samples = generate_samples(setup, params, **kw)
  seconds = time.perf_counter() - started
  texts = [s["text"] for s in samples]
  out = {"sampler": sampler, "steps": cfg.sample.steps, "gen_num_samples": len(samples),
         "judge_workdir": judge_workdir, "judge_step": judge.step,
         "entropy": evaluation.mean_entropy([s["tokens"] for s in samples]),
         "throughput": len(samples) * (cfg.data.seq_len - 1) / seconds,
         "throughput_unit": "generated tokens/s (after compilation)"}
  out.update(judge.score_texts(texts))
  if judge.same_tokenizer(setup.tokenizer):
    out.update(judge.score_tokens([s["tokens"] for s in samples]))
  return out


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out

