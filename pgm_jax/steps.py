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

from pgm_jax import objectives


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


def init_state(rng, *, model, tx, batch_size: int, seq_len: int, kind: str) -> TrainState:
  """Boxed (logically partitioned) initial state; jit it with out_shardings."""
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  if kind == "pgm":
    variables = model.init({"params": rng}, tokens, tokens)
  elif kind == "pgm_image":
    variables = model.init({"params": rng}, tokens, tokens, labels)
  elif kind == "maskgit":  # codes only: position 0 of a batch is BOS
    variables = model.init({"params": rng}, tokens[:, 1:], labels)
  else:  # sigma is read only by a time-conditioned MDLM
    variables = model.init({"params": rng}, tokens, sigma_B=jnp.zeros((batch_size,)))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(lambda x: x, params))


def stratified_times(rng, batch: int, *, groups: int, sampling_eps: float, antithetic: bool):
  """t for a batch made of `groups` equal slices, each stratified on its own."""
  rngs = jax.random.split(rng, groups)
  per = batch // groups
  ts = jax.vmap(lambda r: objectives.sample_times(r, per, sampling_eps=sampling_eps,
                                                  antithetic=antithetic))(rngs)
  return ts.reshape(batch)


OBJECTIVES = ("auto", "complement-mdlm")


def loss_terms(params, batch, t_B, noise_u_BxL, dropout_rng, *, model, mask_id: int,
               kind: str, train: bool, sampling_eps: float, objective: str = "auto",
               attend_to_padding: bool = False):
  """LossTerms of one (micro)batch for a PGM, an MDLM or an AR model.

  `noise_u_BxL` (uniform [0, 1)) decides the partition / the masked tokens:
  token i is in group 1 (masked) iff u_i < 1 - alpha(t). Drawing it for the whole
  global batch makes gradient accumulation exact (same draws for any split).
  objective: "auto" (the kind's own) or "complement-mdlm" (an MDLM trained on x_t and
  its complement; in eval, train=False, it is scored as the MDLM it is).
  attend_to_padding: the model attends to pad tokens (they get groups / noise like any
  token) and `valid` masks them only in the loss: the reference's LM1B behaviour.
  """
  tokens = batch["tokens"]
  valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
  rngs = {"dropout": dropout_rng} if train else {}
  if kind in objectives.IMAGE_KINDS:
    return _image_loss_terms(params, tokens, batch["labels"], valid, t_B, noise_u_BxL, rngs,
                             model=model, mask_id=mask_id, kind=kind, train=train)
  model_valid = None if attend_to_padding else valid
  group = objectives.groups_from_uniform(noise_u_BxL, t_B, sampling_eps)
  time_conditioned = getattr(model.config, "time_conditioning", False)
  # The models return log p(target) [B, L] directly (`targets_BxL`): the float32
  # [B, L, V] logits are never materialised (chunked by config.model.loss_chunk_len);
  # logit[MASK] is the model config's mask_id (the same id as `mask_id`).
  if kind == "pgm":
    logp = model.apply({"params": params}, tokens, group, model_valid, train=train,
                       rngs=rngs, targets_BxL=tokens, mask_logit=-jnp.inf)
    return objectives.pgm_loss_terms_from_log_probs(logp, group, t_B, valid)
  if kind == "ar":  # no noise: next-token prediction on the clean sequence
    logp = model.apply({"params": params}, tokens, model_valid, train=train, rngs=rngs,
                       targets_BxL=objectives.next_token_targets(tokens),
                       mask_logit=-jnp.inf)
    return objectives.ar_loss_terms_from_log_probs(logp[:, :-1], valid)
  is_masked = group.astype(bool)
  if objective == "complement-mdlm" and train:
    views = objectives.complement_mdlm_views(tokens, is_masked, mask_id)
    both = lambda x: None if x is None else jnp.concatenate([x, x], axis=0)
    sigma = None
    if time_conditioned:
      sigma = jnp.concatenate([objectives.sigma(t_B, sampling_eps),
                               objectives.sigma(1.0 - t_B, sampling_eps)])
    logp = model.apply({"params": params}, views, both(model_valid), train=train, rngs=rngs,
                       targets_BxL=both(tokens), mask_logit=objectives.NEG_INF_MDLM,
                       sigma_B=sigma)
    return objectives.complement_mdlm_loss_terms_from_log_probs(logp, is_masked, t_B, valid)
  x_t = jnp.where(is_masked, mask_id, tokens)
  sigma = objectives.sigma(t_B, sampling_eps) if time_conditioned else None
  logp = model.apply({"params": params}, x_t, model_valid, train=train, rngs=rngs,
                     targets_BxL=tokens, mask_logit=objectives.NEG_INF_MDLM, sigma_B=sigma)
  return objectives.mdlm_loss_terms_from_log_probs(logp, is_masked, t_B, valid)


def objective_options(config) -> dict:
  """The loss_terms keywords a config sets (config.train.objective,
  config.data.attend_to_padding)."""
  return dict(objective=config.train.get("objective", "auto"),
              attend_to_padding=bool(config.data.get("attend_to_padding", False)))


def _image_loss_terms(params, tokens, labels, valid, r_B, noise_u_BxL, rngs, *, model, mask_id,
                      kind, train):
  """Images (method §7), tokens = [BOS] + codes and r_B ~ U(0, 1) per image: a code is in
  group 1 / masked iff its uniform draw is below arccos(r)/(pi/2). Plain cross-entropy with
  logit[MASK] = -1e6: PGM over every code of both groups, MaskGIT over the masked codes."""
  counted = valid[:, 1:].astype(bool)
  if kind == "pgm_image":
    group = objectives.image_groups(noise_u_BxL, r_B)
    logp = model.apply({"params": params}, tokens, group, labels, valid, train=train, rngs=rngs,
                       targets_BxL=tokens, mask_logit=objectives.NEG_INF_MDLM)
    return objectives.image_loss_terms_from_log_probs(logp[:, 1:], counted)
  codes = tokens[:, 1:]
  masked = noise_u_BxL[:, 1:] < objectives.arccos_rate(r_B)[:, None]
  logp = model.apply({"params": params}, jnp.where(masked, mask_id, codes), labels, train=train,
                     rngs=rngs, targets_BxN=codes, mask_logit=objectives.NEG_INF_MDLM)
  return objectives.image_loss_terms_from_log_probs(logp, masked & counted)


def _image_draws(rng, batch, *, config):
  """(r_B ~ U(0, 1), the batch with its labels dropped to the null class w.p.
  config.train.label_dropout) for an image train step."""
  r_rng, drop_rng = jax.random.split(rng)
  batch_size = batch["tokens"].shape[0]
  r_B = jax.random.uniform(r_rng, (batch_size,))
  labels = objectives.drop_labels(batch["labels"], jax.random.uniform(drop_rng, (batch_size,)),
                                  config.train.label_dropout, config.model.num_classes)
  return r_B, dict(batch, labels=labels)


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

  t is drawn once for the whole global batch (stratified over it, as the reference
  does over its global batch) and each microbatch takes its slice.
  """
  t_cfg = config.train
  kind = config.model.kind
  step_rng = jax.random.fold_in(rng, state.step)
  t_rng, noise_rng, dropout_rng = jax.random.split(step_rng, 3)
  batch_size, seq_len = batch["tokens"].shape
  accum = t_cfg.grad_accum_steps
  if kind in objectives.IMAGE_KINDS:  # r ~ U(0, 1) per image (the "t" slot), label dropout
    t_B, batch = _image_draws(t_rng, batch, config=config)
  else:
    t_B = stratified_times(t_rng, batch_size, groups=1, sampling_eps=t_cfg.sampling_eps,
                           antithetic=t_cfg.antithetic)
  noise_u_BxL = jax.random.uniform(noise_rng, (batch_size, seq_len))

  def micro_loss(params, micro, t_mb, u_mb, r):
    terms = loss_terms(params, micro, t_mb, u_mb, r, model=model, mask_id=mask_id, kind=kind,
                       train=True, sampling_eps=t_cfg.sampling_eps, **objective_options(config))
    denom = jnp.maximum(terms.num_tokens, 1.0)
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
  (grads, loss, nll), _ = jax.lax.scan(body, init, inputs)
  grads = jax.tree.map(lambda g: g / accum, grads)
  loss, nll = loss / accum, nll / accum

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
  if config.model.kind in objectives.IMAGE_KINDS:  # r ~ U(0, 1); labels kept (conditional)
    t_B = jax.random.uniform(t_rng, (batch_size,))
  else:
    t_B = stratified_times(t_rng, batch_size, groups=data_parallel,
                           sampling_eps=config.train.sampling_eps,
                           antithetic=config.train.antithetic)
  noise_u_BxL = jax.random.uniform(noise_rng, (batch_size, seq_len))
  terms = loss_terms(params, batch, t_B, noise_u_BxL, None, model=model, mask_id=mask_id,
                     kind=config.model.kind, train=False,
                     sampling_eps=config.train.sampling_eps, **objective_options(config))
  return terms.nll_sum, terms.num_tokens


def unbox(tree):
  return nn.meta.unbox(tree)

