"""Pure, jit-able pieces of training: state, optimizer, losses, train and eval steps.

`train_step(state, batch, rng, *, model, config)` is a pure function of its inputs
(per-step randomness is `fold_in(rng, state.step)`), so it is unit-testable and the
same function runs on one CPU or sharded over a pod (jit with explicit shardings).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from flax import struct

from pgm_jax import families


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


@struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  nll: clu_metrics.Average.from_output("nll")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


SCHEDULES = ("constant", "cosine_tail")


def learning_rate_schedule(opt_config, num_steps: int | None = None):
  """Linear warmup from 0 to lr over warmup_steps, then constant (the text reference), or,
  with opt.schedule = "cosine_tail" (the image reference), constant until the last
  opt.decay_fraction of opt.decay_end steps (None: `num_steps`, config.train.num_steps), then a
  cosine decay floored at opt.min_lr_fraction * lr."""
  warmup = max(int(opt_config.warmup_steps), 0)
  schedule = opt_config.get("schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"config.opt.schedule must be one of {SCHEDULES}, got {schedule!r}")
  if schedule == "cosine_tail":
    return _cosine_tail_schedule(opt_config, warmup, num_steps)
  if warmup == 0:
    return optax.constant_schedule(opt_config.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, opt_config.lr, warmup),
       optax.constant_schedule(opt_config.lr)], [warmup])


def _cosine_tail_schedule(opt_config, warmup: int, num_steps: int | None):
  end = opt_config.get("decay_end")
  lr, end = float(opt_config.lr), int(num_steps if end is None else end)
  fraction, floor = float(opt_config.decay_fraction), float(opt_config.min_lr_fraction)
  if end <= 0 or not 0.0 < fraction <= 1.0 or not 0.0 <= floor <= 1.0:
    raise ValueError(f"config.opt: cosine_tail needs decay_end > 0 (got {end}), decay_fraction "
                     f"in (0, 1] (got {fraction}) and min_lr_fraction in [0, 1] (got {floor})")
  decay_steps = fraction * end
  start = end - decay_steps

  def schedule(count):
    c = jnp.asarray(count, jnp.float32)
    warm = lr * c / max(warmup, 1)
    progress = jnp.clip((c - start) / decay_steps, 0.0, 1.0)
    tail = jnp.maximum(0.5 * lr * (1.0 + jnp.cos(jnp.pi * progress)), floor * lr)
    return jnp.where(c < warmup, warm, jnp.where(c > start, tail, lr))

  return schedule


def make_optimizer(opt_config, num_steps: int | None = None) -> optax.GradientTransformation:
  parts = []
  if opt_config.grad_clip and opt_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(opt_config, num_steps), b1=opt_config.b1,
                           b2=opt_config.b2, eps=opt_config.eps,
                           weight_decay=opt_config.weight_decay))
  return optax.chain(*parts)


def init_state(rng, *, model, tx, batch_size: int, seq_len: int) -> TrainState:
  """Boxed (logically partitioned) initial state; jit it with out_shardings. The model's
  family (`model.config.kind`) gives the dummy inputs."""
  args, kwargs = families.get(model.config.kind).init_args(batch_size, seq_len)
  params = model.init({"params": rng}, *args, **kwargs)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(lambda x: x, params))


OBJECTIVES = ("auto", "complement-mdlm")


def loss_terms(params, batch, t_B, noise_u_BxL, dropout_rng, *, model, mask_id: int,
               train: bool, sampling_eps: float, objective: str = "auto",
               attend_to_padding: bool = False):
  """LossTerms of one (micro)batch, from the family of `model` (`model.config.kind`).

  `noise_u_BxL` (uniform [0, 1)) decides the partition / the masked tokens:
  token i is in group 1 (masked) iff u_i < 1 - alpha(t). Drawing it for the whole
  global batch makes gradient accumulation exact (same draws for any split).
  objective: "auto" (the family's own) or "complement-mdlm" (an MDLM trained on x_t and
  its complement; in eval, train=False, it is scored as the MDLM it is).
  attend_to_padding: the model attends to pad tokens (they get groups / noise like any
  token) and `valid` masks them only in the loss: the reference's LM1B behaviour.
  """
  rngs = {"dropout": dropout_rng} if train else {}
  return families.get(model.config.kind).loss_terms(
      params, batch, t_B, noise_u_BxL, rngs, model=model, mask_id=mask_id, train=train,
      sampling_eps=sampling_eps, objective=objective, attend_to_padding=attend_to_padding)


def objective_options(config) -> dict:
  """The loss_terms keywords a config sets (config.train.objective,
  config.data.attend_to_padding)."""
  return dict(objective=config.train.get("objective", "auto"),
              attend_to_padding=bool(config.data.get("attend_to_padding", False)))


def keep_batch_sharded(x_AxBx):
  """Microbatches [accum, B/accum, ...]: keep dim 1 sharded over the batch mesh axes.

  Without the constraint the partitioner may shard the reshaped leading (accumulation)
  dimension instead, so that each device holds whole microbatches and accumulation
  saves no memory. No-op outside a mesh context (see `experiment.with_mesh`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in ("data", "fsdp") if a in (mesh.axis_names or ()))
  if not axes:
    return x_AxBx
  spec = jax.sharding.PartitionSpec(None, axes, *([None] * (x_AxBx.ndim - 2)))
  return jax.lax.with_sharding_constraint(x_AxBx, spec)


def ema_decay(decay: float, num_updates):
  """The reference's warm-up: min(decay, (1 + n) / (10 + n))."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def train_step(state: TrainState, batch, rng, *, model, tx, config, mask_id: int):
  """One optimizer step over the global batch (with gradient accumulation).

  t and the noise are drawn once for the whole global batch (t stratified over it, as the
  reference does over its global batch) and each microbatch takes its slice. The loss is
  the global-batch mean: sum of loss_sum over every microbatch / the global batch's
  num_tokens (`Family.loss_token_count`, counted before the microbatches run, since it
  does not depend on the parameters). Each microbatch's gradient is that of its loss_sum
  over the global count and the gradients add up, so any grad_accum_steps gives the
  update of grad_accum_steps=1, however the tokens (padding) fall across microbatches.
  """
  t_cfg = config.train
  step_rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
  batch_size, seq_len = batch["tokens"].shape
  accum = t_cfg.grad_accum_steps
  # t stratified over the batch (text), or r ~ U(0, 1) per image and label dropout.
  family = families.of(config)
  t_B, batch = family.train_times(t_rng, batch, config)
  noise_u_BxL = jax.random.uniform(noise_rng, (batch_size, seq_len))
  # The denominator of the global-batch mean, shared by every microbatch.
  denom = jnp.maximum(family.loss_token_count(batch, t_B, noise_u_BxL,
                                              sampling_eps=t_cfg.sampling_eps), 1.0)

  def micro_loss(params, micro, t_mb, u_mb, r):
    terms = loss_terms(params, micro, t_mb, u_mb, r, model=model, mask_id=mask_id, train=True,
                       sampling_eps=t_cfg.sampling_eps, **objective_options(config))
    return terms.loss_sum / denom, terms.nll_sum / denom

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  split = lambda x: keep_batch_sharded(x.reshape((accum, batch_size // accum) + x.shape[1:]))
  inputs = (jnp.arange(accum), jax.tree.map(split, batch), split(t_B), split(noise_u_BxL))

  def body(carry, inputs):
    grads_acc, loss_acc, nll_acc = carry
    i, micro, t_mb, u_mb = inputs
    (loss, nll), grads = grad_fn(state.params, micro, t_mb, u_mb,
                                 jax.random.fold_in(dropout_rng, i))
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, loss_acc + loss, nll_acc + nll), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  # Sums of the microbatches' shares of the global mean: the global mean and its gradient.
  (grads, loss, nll), _ = jax.lax.scan(body, init, inputs)

  metrics = TrainMetrics.single_from_model_output(
      loss=loss, nll=nll, grad_norm=optax.tree.norm(grads),
      learning_rate=learning_rate_schedule(config.opt, t_cfg.num_steps)(state.step))
  return apply_gradients(state, grads, tx=tx, opt_config=config.opt), metrics


def apply_gradients(state, grads, *, tx, opt_config):
  """Optimizer update, step + 1 and the EMA; other fields of `state` (e.g. a
  distillation state's teacher) are kept as they are."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_step = state.step + 1
  if opt_config.ema_decay > 0:
    d = ema_decay(opt_config.ema_decay, new_step)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  else:
    ema = params
  return state.replace(step=new_step, params=params, opt_state=opt_state, ema_params=ema)


def eval_step(params, batch, rng, *, model, config, mask_id: int, data_parallel: int):
  """(nll_sum, num_tokens) of a validation batch, one random t per sequence.

  As in the reference, t is stratified over each device's slice of the batch. Images: one
  r ~ U(0, 1) per image and the image cross-entropy (`_image_loss_terms`), labels kept.
  """
  batch_size, seq_len = batch["tokens"].shape
  t_rng, noise_rng = jax.random.split(rng)
  t_B = families.of(config).eval_times(t_rng, batch_size, config, data_parallel)
  noise_u_BxL = jax.random.uniform(noise_rng, (batch_size, seq_len))
  terms = loss_terms(params, batch, t_B, noise_u_BxL, None, model=model, mask_id=mask_id,
                     train=False, sampling_eps=config.train.sampling_eps,
                     **objective_options(config))
  return terms.nll_sum, terms.num_tokens


def unbox(tree):
  return nn.meta.unbox(tree)

