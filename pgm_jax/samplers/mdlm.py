"""MDLM samplers (method §1): `ddpm`, `ddpm_cache` and `confidence-threshold`.

`ddpm` runs the denoiser every step. `ddpm_cache` reuses the previous step's p(x0) when
nothing changed (no time conditioning). Both take S ancestral steps on
linspace(1, eps, S+1) and then a final reveal step. The whole run is one
`lax.fori_loop` program, and the number of denoiser passes is counted on device.

`confidence-threshold` (Fast-dLLM's threshold parallel decoding): each step runs the
denoiser on the whole sequence and reveals, by `common.threshold_reveal`, every masked
position whose draw has probability >= threshold, at least the most confident one per
sequence; step S reveals all that remain. One `lax.while_loop` program that stops when
every sequence is complete (a time-conditioned denoiser gets t = the masked fraction).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pgm_jax import objectives
from pgm_jax.core import sharding
from pgm_jax.samplers.common import (THRESHOLD_SAMPLER, TRACE_COUNTS, Prompt, SampleResult,
                                     check_threshold, device_put_fn, filtered_log_probs,
                                     lowered_flops, params_mesh_context, threshold_log_probs,
                                     threshold_reveal)

MDLM_SAMPLERS = ("ddpm_cache", "ddpm", THRESHOLD_SAMPLER)


def _mdlm_logits(params, x, t=None, *, model):
  """The denoiser's logits in the model's compute dtype: that is the dtype they are
  computed in (the output projection runs in it), so the cast loses nothing, and the
  `ddpm_cache` cache is half the size of a float32 one (3.3 GB instead of 6.6 GB at
  B 32, L 1024, V 50258). `t` is read only by a time-conditioned model (sigma(t))."""
  sigma = None
  if getattr(model.config, "time_conditioning", False):
    sigma = jnp.full((x.shape[0],), objectives.sigma(t), jnp.float32)
  logits = model.apply({"params": params}, x, train=False, sigma_B=sigma)
  return logits.astype(model.config.compute_dtype)


def _mdlm_update(x, logits, key, k, reveal_prob, *, mask_id: int, top_p: float = 1.0,
                 temperature: float = 1.0):
  """One ancestral update: draw x0 everywhere from SUBS p(x0 | x), reveal each MASK w.p.
  reveal_prob.

  The float32 log-probabilities and the Gumbel noise are made one sequence at a time
  (`lax.map`), so the update holds [L, V], not [B, L, V], float32 temporaries.
  """
  base = jax.random.fold_in(key, 2 * k)

  def draw_one(args):
    b, x_L, logits_LxV = args
    logp = objectives.subs_log_probs(logits_LxV[None], x_L[None], mask_id)[0]
    if top_p < 1.0 or temperature != 1.0:
      # Filter only where masked; unmasked rows are carry-over one-hots.
      filtered = filtered_log_probs(logp, mask_id, top_p=top_p, temperature=temperature)
      logp = jnp.where((x_L == mask_id)[:, None], filtered, logp)
    gumbel = jax.random.gumbel(jax.random.fold_in(base, b), logp.shape, jnp.float32)
    return jnp.argmax(logp + gumbel, axis=-1).astype(jnp.int32)

  draw = jax.lax.map(draw_one, (jnp.arange(x.shape[0]), x, logits))
  u = jax.random.uniform(jax.random.fold_in(key, 2 * k + 1), x.shape)
  reveal = (x == mask_id) & (u < reveal_prob)
  return jnp.where(reveal, draw, x)


def _mdlm_run(params, x0, key, *, model, steps: int, cache: bool, mask_id: int, eps: float,
              top_p: float, temperature: float):
  TRACE_COUNTS["mdlm"] += 1
  batch, length = x0.shape
  timesteps = jnp.linspace(1.0, eps, steps + 1)
  # A time-conditioned denoiser changes with t: its output is never reused (as the
  # reference's cache, which is only used without time conditioning).
  cache = cache and not getattr(model.config, "time_conditioning", False)
  update = lambda x, logits, k, p: _mdlm_update(x, logits, key, k, p, mask_id=mask_id,
                                                top_p=top_p, temperature=temperature)

  def body(k, carry):
    x, logits_cache, fresh, passes = carry
    t, s = timesteps[k], timesteps[k + 1]
    recompute = jnp.logical_or(~fresh, not cache)
    logits = jax.lax.cond(recompute, lambda x: _mdlm_logits(params, x, t, model=model),
                          lambda _: logits_cache, x)
    a_t, a_s = objectives.alpha(t), objectives.alpha(s)
    x_new = update(x, logits, k, (a_s - a_t) / (1.0 - a_t))
    unchanged = jnp.all(x_new == x)
    return x_new, logits, unchanged, passes + recompute.astype(jnp.int32)

  vocab = model.config.vocab_size
  init = (x0, jnp.zeros((batch, length, vocab), model.config.compute_dtype), jnp.array(False),
          jnp.array(0, jnp.int32))
  x, logits_cache, fresh, passes = jax.lax.fori_loop(0, steps, body, init)
  # Final reveal step (alpha_s = 1): every remaining MASK is drawn.
  recompute = jnp.logical_or(~fresh, not cache)
  logits = jax.lax.cond(recompute, lambda x: _mdlm_logits(params, x, timesteps[-1], model=model),
                        lambda _: logits_cache, x)
  x = update(x, logits, steps, 1.0)
  return x, passes + recompute.astype(jnp.int32)


_mdlm_run_jit = jax.jit(_mdlm_run, static_argnames=("model", "steps", "cache", "mask_id", "eps",
                                                     "top_p", "temperature"))
_mdlm_update_jit = jax.jit(_mdlm_update, static_argnames=("mask_id", "top_p", "temperature"))
_mdlm_logits_jit = jax.jit(_mdlm_logits, static_argnames=("model",))


def _mdlm_threshold_step(params, x, key, k, threshold, force_all, *, model, mask_id: int,
                         top_p: float, temperature: float):
  """One confidence-threshold step: a denoiser pass on the whole sequence, then the shared
  reveal rule over its masked positions, one sequence at a time (`lax.map`: [L, V], not
  [B, L, V], float32 temporaries). Draws are keyed by (step, sequence, position)."""
  batch, length = x.shape
  t_B = jnp.mean((x == mask_id).astype(jnp.float32), axis=1)  # read only if time conditioned
  logits = _mdlm_logits(params, x, t_B, model=model)
  step_key = jax.random.fold_in(key, k)
  positions = jnp.arange(length)[None, :]

  def one(args):
    b, x_L, logits_LxV = args
    logp, conf_logp = threshold_log_probs(logits_LxV[None], mask_id, top_p=top_p,
                                          temperature=temperature)
    draw, reveal = threshold_reveal(logp, (x_L == mask_id)[None], step_key, b[None],
                                    positions, threshold, force_all, conf_logp)
    return jnp.where(reveal[0], draw[0], x_L)

  return jax.lax.map(one, (jnp.arange(batch), x, logits))


def _mdlm_threshold_run(params, x0, key, threshold, steps, *, model, mask_id: int,
                        top_p: float, temperature: float):
  """The whole confidence-threshold run: at most `steps` passes (the last one reveals all
  that remain), stopping when no sequence has a MASK left. Returns (tokens, passes,
  passes per sequence)."""
  TRACE_COUNTS["mdlm"] += 1
  step = lambda x, k: _mdlm_threshold_step(params, x, key, k, threshold, k + 1 >= steps,
                                           model=model, mask_id=mask_id, top_p=top_p,
                                           temperature=temperature)

  def cond(carry):
    x, k, _ = carry
    return (k < steps) & jnp.any(x == mask_id)

  def body(carry):
    x, k, seq_passes = carry
    seq_passes = seq_passes + jnp.any(x == mask_id, axis=1).astype(jnp.int32)
    return step(x, k), k + 1, seq_passes

  init = (x0, jnp.array(0, jnp.int32), jnp.zeros((x0.shape[0],), jnp.int32))
  return jax.lax.while_loop(cond, body, init)


_THRESHOLD_STATIC = ("model", "mask_id", "top_p", "temperature")
_mdlm_threshold_run_jit = jax.jit(_mdlm_threshold_run, static_argnames=_THRESHOLD_STATIC)
_mdlm_threshold_step_jit = jax.jit(_mdlm_threshold_step, static_argnames=_THRESHOLD_STATIC)


def mdlm_sample(params, prompt: Prompt, *, model, sampler: str, steps: int, seed: int,
                mask_id: int, top_p: float = 1.0, temperature: float = 1.0, eps: float = 1e-5,
                measure_flops: bool = False, execute: bool = True,
                threshold: float = 0.9) -> SampleResult:
  """MDLM `ddpm` / `ddpm_cache` / `confidence-threshold` (reads `threshold`); known prompt
  tokens start unmasked and never change.

  With execute=False nothing runs: the pass count comes from `mdlm_passes` (the
  reveal process alone) and FLOPs from lowering, so paper-size costs can be
  computed on a CPU (not for `confidence-threshold`, whose passes depend on the model).
  """
  if sampler not in MDLM_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {MDLM_SAMPLERS} for MDLM, "
                     f"got {sampler!r}")
  if sampler == THRESHOLD_SAMPLER:
    return _mdlm_threshold_sample(params, prompt, model=model, steps=steps, seed=seed,
                                  mask_id=mask_id, top_p=top_p, temperature=temperature,
                                  threshold=check_threshold(threshold),
                                  measure_flops=measure_flops, execute=execute)
  batch = prompt.known.shape[0]
  put = device_put_fn(params, batch)
  x0 = put(np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32))
  traces_before = TRACE_COUNTS["mdlm"]
  cache = sampler == "ddpm_cache" and not getattr(model.config, "time_conditioning", False)
  static = dict(model=model, steps=steps, cache=cache, mask_id=mask_id,
                eps=eps, top_p=top_p, temperature=temperature)
  start = time.perf_counter()
  if execute:
    with params_mesh_context(params):
      x, passes = _mdlm_run_jit(params, x0, put(jax.random.key(seed)), **static)
    tokens, passes = sharding.host_value(x), int(sharding.host_value(passes))
  else:
    tokens = np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32)
    passes = mdlm_passes(prompt.known, steps, seed, static["cache"], eps)
  seconds = time.perf_counter() - start
  flops = None
  if measure_flops:
    # Denoiser passes x cost of one pass, plus the sampling work of every step.
    pass_flops = lowered_flops(_mdlm_logits_jit, params, x0, 1.0, model=model)
    vocab = model.config.vocab_size
    logits = jax.ShapeDtypeStruct((1,) + x0.shape[1:] + (vocab,), model.config.compute_dtype)
    # The update loops over sequences and XLA costs a loop body once: cost one sequence.
    update_flops = batch * lowered_flops(
        _mdlm_update_jit, x0[:1], logits, jax.random.key(seed), 0, 0.5, mask_id=mask_id,
        top_p=top_p, temperature=temperature)
    flops = (int(passes) * pass_flops + (steps + 1) * update_flops) / batch
  return SampleResult(tokens=np.asarray(tokens), sampler=sampler, steps=steps,
                      passes=int(passes), compiles=TRACE_COUNTS["mdlm"] - traces_before,
                      flops_per_seq=flops, seconds=seconds)


def _mdlm_threshold_sample(params, prompt: Prompt, *, model, steps, seed, mask_id, top_p,
                           temperature, threshold, measure_flops, execute) -> SampleResult:
  if not execute:
    raise ValueError(f"mdlm_sample: {THRESHOLD_SAMPLER!r} reveals data-dependent counts: its "
                     f"passes are known only by running it (execute=True)")
  if steps < 1:
    raise ValueError(f"config.sample.steps={steps} must be >= 1")
  batch = prompt.known.shape[0]
  put = device_put_fn(params, batch)
  x0 = put(np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32))
  key, thr = put(jax.random.key(seed)), put(np.float32(threshold))
  static = dict(model=model, mask_id=mask_id, top_p=top_p, temperature=temperature)
  traces_before = TRACE_COUNTS["mdlm"]
  start = time.perf_counter()
  with params_mesh_context(params):
    x, passes, seq_passes = _mdlm_threshold_run_jit(params, x0, key, thr,
                                                    put(np.int32(steps)), **static)
    tokens = sharding.host_value(x)
    passes, seq_passes = int(sharding.host_value(passes)), sharding.host_value(seq_passes)
  seconds = time.perf_counter() - start
  flops = None
  if measure_flops:
    # XLA costs a loop body once, and the reveal loops over sequences: cost one step
    # (denoiser pass + reveal) of one sequence, times the passes.
    flops = passes * lowered_flops(_mdlm_threshold_step_jit, params, x0[:1], key, 0, thr,
                                   False, **static)
  return SampleResult(tokens=np.asarray(tokens), sampler=THRESHOLD_SAMPLER, steps=steps,
                      passes=passes, compiles=TRACE_COUNTS["mdlm"] - traces_before,
                      flops_per_seq=flops, seconds=seconds,
                      seq_passes=np.asarray(seq_passes, np.int64))


def mdlm_passes(prompt_known: np.ndarray, steps: int, seed: int, cache: bool,
                eps: float = 1e-5) -> int:
  """Denoiser passes of an MDLM run, from the reveal process alone.

  Which tokens are revealed does not depend on the network (only on the uniform draws),
  so the number of passes of `ddpm_cache` can be computed without running it.
  Used for paper-size FLOP accounting; uses numpy draws, so it matches `mdlm_sample`
  in distribution, not draw for draw.
  """
  rng = np.random.default_rng(seed)
  masked = ~prompt_known.copy()
  ts = np.linspace(1.0, eps, steps + 1)
  passes, fresh = 0, False
  for k in range(steps):
    if not cache or not fresh:
      passes += 1
    a_t, a_s = objectives.alpha(ts[k]), objectives.alpha(ts[k + 1])
    reveal = masked & (rng.random(masked.shape) < (a_s - a_t) / (1.0 - a_t))
    fresh = not reveal.any()
    masked &= ~reveal
  return passes + (1 if (not cache or not fresh) else 0)
