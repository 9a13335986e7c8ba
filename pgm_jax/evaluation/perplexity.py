"""Validation perplexity: exp(total NLL / total valid tokens) over the validation split,
with each model family's ELBO (MDLM and PGM) or exact likelihood (AR)."""
from __future__ import annotations

import functools
import math

import jax

from pgm_jax import experiment, steps
from pgm_jax.core import sharding
from pgm_jax.data import pipeline


def make_eval_fn(setup: experiment.Setup):
  fn = functools.partial(steps.eval_step, model=setup.model, config=setup.config,
                         mask_id=setup.mask_id, data_parallel=setup.data_parallel)
  return jax.jit(experiment.with_mesh(setup.mesh, fn),
                 in_shardings=(setup.state_shardings.params, setup.batch_sharding,
                               sharding.replicated(setup.mesh)),
                 out_shardings=sharding.replicated(setup.mesh))  # host-readable everywhere


def run_validation(setup: experiment.Setup, params, eval_fn=None, source=None) -> dict:
  """Validation perplexity exp(total NLL / total valid tokens) over the val split, or over
  `source` (a grain.MapDataset of example dicts, e.g. a zero-shot set)."""
  config = setup.config
  eval_fn = eval_fn or make_eval_fn(setup)
  it = pipeline.build_eval_iterator(
      config.data, setup.tokenizer, batch_size=config.eval.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=config.eval.get("max_batches"), source=source)
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
