"""AR baseline sampler: left to right with a KV cache, one program for the whole run."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pgm_jax.core import sharding
from pgm_jax.samplers.common import (TRACE_COUNTS, Prompt, SampleResult, device_put_fn,
                                     filtered_log_probs, keyed_gumbel_argmax, lowered_flops,
                                     params_mesh_context)

AR_SAMPLERS = ("ar",)


def _ar_run(params, x0, known, key, *, model, mask_id: int, top_p: float, temperature: float):
  TRACE_COUNTS["ar"] += 1
  batch, length = x0.shape
  cache_shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32),
                         decode=True)["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
  seq_ids = jnp.arange(batch)

  def body(i, carry):
    x, cache = carry
    token = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
    logits, variables = model.apply({"params": params, "cache": cache}, token, decode=True,
                                    positions_BxL=jnp.full((batch, 1), i), mutable=["cache"])
    logp = filtered_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
    draw = keyed_gumbel_argmax(key, logp, seq_ids, jnp.full((batch, 1), i + 1))[:, 0]
    keep = jax.lax.dynamic_slice_in_dim(known, i + 1, 1, axis=1)[:, 0]
    current = jax.lax.dynamic_slice_in_dim(x, i + 1, 1, axis=1)[:, 0]
    nxt = jnp.where(keep, current, draw)
    return jax.lax.dynamic_update_slice_in_dim(x, nxt[:, None], i + 1, axis=1), variables["cache"]

  x, _ = jax.lax.fori_loop(0, length - 1, body, (x0, cache))
  return x


_ar_run_jit = jax.jit(_ar_run, static_argnames=("model", "mask_id", "top_p", "temperature"))


def _ar_token_step(params, cache, token_Bx1, i, *, model):
  """One token through the KV-cached model (what each iteration of `_ar_run` computes)."""
  logits, variables = model.apply({"params": params, "cache": cache}, token_Bx1, decode=True,
                                  positions_BxL=jnp.full(token_Bx1.shape, i), mutable=["cache"])
  return logits, variables["cache"]


def ar_token_step_flops(params, model, batch: int, length: int) -> float:
  """XLA FLOPs of one cached token step at a full-length cache (`_ar_run` attends over all
  `length` cache slots at every step, masked), for the bench's FLOP count."""
  cache_shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32),
                         decode=True)["cache"])
  return lowered_flops(jax.jit(_ar_token_step, static_argnames=("model",)), params,
                       cache_shapes, jax.ShapeDtypeStruct((batch, 1), jnp.int32),
                       jax.ShapeDtypeStruct((), jnp.int32), model=model)


def ar_sample(params, prompt: Prompt, *, model, sampler: str = "ar", steps: int = 0,
              seed: int, mask_id: int, top_p: float = 1.0, temperature: float = 1.0,
              measure_flops: bool = False, execute: bool = True) -> SampleResult:
  """Left-to-right sampling with a KV cache: L-1 single-token passes, one program.

  Known prompt tokens are kept (a left-to-right model conditions on the known tokens
  before each position; later known tokens are not seen when earlier ones are drawn).
  `steps` is ignored (an AR model takes one step per token). measure_flops: (L - 1) x
  `ar_token_step_flops` (the bench); execute=False only counts.
  """
  if sampler not in AR_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {AR_SAMPLERS} for the AR "
                     f"baseline, got {sampler!r}")
  batch, length = prompt.known.shape
  put = device_put_fn(params, batch)
  x0 = put(np.where(prompt.known, prompt.tokens, 0).astype(np.int32))
  before = TRACE_COUNTS["ar"]
  start = time.perf_counter()
  flops = (ar_token_step_flops(params, model, batch, length) * (length - 1) / batch
           if measure_flops else None)
  if not execute:
    return SampleResult(tokens=np.where(prompt.known, prompt.tokens, 0).astype(np.int32),
                        sampler=sampler, steps=length - 1,
                        passes=length - 1, compiles=0, flops_per_seq=flops)
  with params_mesh_context(params):
    x = _ar_run_jit(params, x0, put(prompt.known), put(jax.random.key(seed)), model=model,
                    mask_id=mask_id, top_p=top_p, temperature=temperature)
  tokens = sharding.host_value(x)
  return SampleResult(tokens=tokens, sampler=sampler, steps=length - 1, passes=length - 1,
                      compiles=TRACE_COUNTS["ar"] - before, flops_per_seq=flops,
                      seconds=time.perf_counter() - start)
