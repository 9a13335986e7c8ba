"""Gradient accumulation is exact on padded batches: any config.train.grad_accum_steps gives
the update (and the logged loss / NLL) of grad_accum_steps=1 on the same global batch, even
when the microbatches hold very different numbers of valid tokens (LM1B-style padding).
The global-batch denominator comes from `Family.loss_token_count`, which must agree with
the count `loss_terms` returns for every family."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_family
from conftest import load_config
from pgm_jax import distill, experiment, families, steps

# Valid lengths of the 8 rows (seq_len 32): microbatches of 2 rows hold 64, 4, 40, 17 valid
# tokens; of 4 rows 68 and 57. Per-microbatch means would weight them very differently.
LENGTHS = (32, 32, 3, 1, 32, 8, 16, 1)


def _config(kind, accum, preset="tiny"):
  cfg = load_config("shakespeare", preset if preset != "tiny" else f"tiny,{kind}")
  cfg.model.dropout = 0.0
  cfg.train.batch_size = len(LENGTHS)
  cfg.train.grad_accum_steps = accum
  cfg.opt.warmup_steps = 0
  return cfg


def _padded_batch(seq_len, vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (len(LENGTHS), seq_len)).astype(np.int32)
  valid = np.arange(seq_len)[None, :] < np.asarray(LENGTHS)[:, None]
  return {"tokens": np.where(valid, tokens, 0).astype(np.int32), "valid": valid}


def _random_params(params, seed=3, scale=0.2):
  """Non-zero everywhere (the output layers are zero-initialised, which would make every
  token's loss log V and hide the weighting)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])


def _run(step, kind, accums, preset="tiny", teacher=False):
  setup = experiment.make_setup(_config(kind, 1, preset))
  state = experiment.init_state(setup, jax.random.key(0))
  state = state.replace(params=_random_params(state.params))
  if teacher:
    state = state.replace(teacher_params=_random_params(state.params, seed=4))
  batch = _padded_batch(setup.config.data.seq_len, setup.model_cfg.vocab_size - 1)
  outs = {}
  for accum in accums:
    cfg = _config(kind, accum, preset)
    fn = jax.jit(functools.partial(step, model=setup.model, tx=setup.tx, config=cfg,
                                   mask_id=setup.mask_id))
    new_state, metrics = jax.device_get(fn(state, batch, jax.random.key(1)))
    outs[accum] = (new_state.params, {k: float(v) for k, v in metrics.compute().items()})
  return outs


def _assert_same_step(outs, metric_names):
  params_1, metrics_1 = outs[1]
  for accum, (params, metrics) in outs.items():
    for name in metric_names:
      np.testing.assert_allclose(metrics[name], metrics_1[name], rtol=1e-5,
                                 err_msg=f"{name}, grad_accum_steps={accum}")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                 err_msg=f"params, grad_accum_steps={accum}")


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
@pytest.mark.slow
def test_padded_accumulation_is_the_global_batch_mean(kind):
  """grad_accum_steps 1 and 4 on a padded batch (2 rows per microbatch: 64, 4, 40 and 17 tokens): the same updated parameters (Adam's first
  step is ~ lr * sign(grad), so the grads' direction per element must match), grad norm,
  loss and NLL."""
  outs = _run(steps.train_step, kind, (1, 4))
  _assert_same_step(outs, ("loss", "nll", "grad_norm"))
  # The step moved the parameters (the comparison is not between two unchanged trees).
  setup = experiment.make_setup(_config(kind, 1))
  before = _random_params(experiment.init_state(setup, jax.random.key(0)).params)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(outs[1][0]), jax.tree.leaves(before))]
  assert max(moved) > 1e-5


@pytest.mark.slow
def test_padded_distill_accumulation_is_the_global_batch_mean(monkeypatch):
  """SDTT: the KL is averaged over the masked valid tokens of the global batch for any
  grad_accum_steps. The teacher's ancestral draws are per microbatch (docs/distillation.md),
  so the teacher's target is taken as its one-pass prediction here, which no draw enters."""
  monkeypatch.setattr(distill, "teacher_targets",
                      lambda logp_fn, x, t, dt, key, **kw: (logp_fn(x, t), x))
  outs = _run(distill.distill_step, "pgm", (1, 2), preset="tiny,distill_pgm", teacher=True)
  _assert_same_step(outs, ("loss", "grad_norm", "masked_tokens"))


_IMAGE = {"pgm_image": "tiny", "maskgit": "tiny,maskgit"}


_SLOW = ("pgm", "pgm_block", "pgm_image", "maskgit")  # their model's first trace takes 10 s or more


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in _SLOW else k
                                  for k in families.KINDS + ("unigram",)])
def test_loss_token_count_is_the_count_of_loss_terms(kind, monkeypatch):
  """`Family.loss_token_count` (computed without the model) equals the num_tokens of
  `loss_terms` on the same padded batch and draws, for every registered family."""
  if kind == "unigram":
    monkeypatch.setitem(families.REGISTRY, "unigram", toy_family.FAMILY)
  if kind in _IMAGE:
    cfg = load_config("digits", _IMAGE[kind])
  else:
    cfg = load_config("shakespeare", "tiny")
    cfg.model.kind = kind
    cfg.model.block_len = 8  # pgm_block: 4 blocks (the others ignore it)
  setup = experiment.make_setup(cfg)
  family = families.of(cfg)
  params = family.init_params(setup.model, jax.random.key(0))
  seq_len = cfg.data.seq_len
  batch = _padded_batch(seq_len, 2)
  batch["valid"][:, 0] = True  # images: BOS
  if family.is_image:
    batch["labels"] = np.arange(len(LENGTHS), dtype=np.int32) % int(cfg.model.num_classes)
  t_B, batch = family.train_times(jax.random.key(1), batch, cfg)
  noise = jax.random.uniform(jax.random.key(2), batch["tokens"].shape)
  terms = steps.loss_terms(params, batch, t_B, noise, jax.random.key(3), model=setup.model,
                           mask_id=setup.mask_id, train=True,
                           sampling_eps=cfg.train.sampling_eps, **steps.objective_options(cfg))
  count = family.loss_token_count(batch, t_B, noise, sampling_eps=cfg.train.sampling_eps)
  assert float(terms.num_tokens) > 0
  assert float(count) == float(terms.num_tokens)
  assert jnp.asarray(count).dtype == jnp.float32
