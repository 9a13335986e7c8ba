"""PGM samplers (method §4), compiled a bounded number of times.

PGM. Every PGM sampler is "a reveal order + a count schedule + an execution":
  * order:     a random permutation of the unknown positions of each sequence;
  * schedule:  counts[k, b] = how many of the next positions in the order sequence b
               reveals at step k. `uniform` gives ceil((k+1)N/S) - ceil(kN/S) (the
               reference's m = L/S per step, m-1 on the last). `binomial` gives
               Binomial(L, 1/S) clipped to what remains, plus a final pass for the
               leftovers (the reference's `efficient-non-uniform`). `ancestral` gives
               Binomial(remaining, (a_s - a_t)/(1 - a_t)) on linspace(1, eps, S+1)
               (MDLM's ancestral rule) plus a final reveal step (the reference's `naive`).
               Revealing each masked token independently with probability p is the
               same as drawing Binomial(remaining, p) and revealing that many from a
               uniformly random order.
  * execution: `efficient` encodes only the packed clean tokens and decodes only the
               positions being revealed; `naive` runs the training layout at full length.
Both executions give the same tokens for the same order, schedule and key: noise is
keyed by (sequence, position, step). Tests check this.

`confidence-threshold` (Fast-dLLM's threshold parallel decoding) has no order and no
schedule: each step the decoder queries EVERY unknown position, draws a token at each and
reveals those whose draw has probability >= threshold, at least the most confident one
per sequence (`common.threshold_reveal`); step `steps` reveals all that remain, and the
run stops when every sequence is complete. Its counts are data-dependent, so the host
reads the remaining counts after each step to pick the next shapes. Its naive execution
(`execution="naive"`, the training layout at full length) is the oracle the efficient one
is tested against, token for token.

Compilation. The efficient encoder's input grows every step. We pad it to the next
multiple of `bucket_size` tokens and hide the padding with a valid-length mask. The
query count is padded the same way: exactly for the uniform schedule, to a power of
two otherwise. So a whole run compiles at most (L / bucket_size) x (#query sizes)
programs, however many steps it takes. Padding costs a few percent of the FLOPs (XLA
cost analysis; see `bench.py`). `confidence-threshold` pads its query count (every unknown
position) to a multiple of `bucket_size` too: along a run the encoder length only grows and
the query count only shrinks, so a run compiles at most about 2 L / bucket_size programs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgm_jax import objectives
from pgm_jax.core import sharding
from pgm_jax.ops import AttentionMask
from pgm_jax.samplers.common import (THRESHOLD_SAMPLER, TRACE_COUNTS, PackedCanvas, Prompt,
                                     SampleResult, check_threshold, device_put_fn,
                                     filtered_log_probs, keyed_gumbel_argmax, lowered_flops,
                                     params_mesh_context, reveal_packed, round_up,
                                     threshold_log_probs, threshold_reveal)

PGM_SAMPLERS = ("efficient-uniform", "efficient-non-uniform", "naive", THRESHOLD_SAMPLER)
THRESHOLD_EXECUTIONS = ("efficient", "naive")
SCHEDULES = ("uniform", "binomial", "ancestral")


# ----------------------------------------------------------------------------
# Orders and schedules (host side, numpy: they fix the program shapes).
# ----------------------------------------------------------------------------

def random_orders(rng: np.random.Generator, known: np.ndarray) -> np.ndarray:
  """order[b, :n_unknown[b]] = unknown positions in a random order; padded with 0."""
  batch, length = known.shape
  order = np.zeros((batch, length), np.int32)
  for b in range(batch):
    unknown = np.flatnonzero(~known[b])
    order[b, :len(unknown)] = rng.permutation(unknown)
  return order


def make_schedule(kind: str, remaining: np.ndarray, steps: int, rng: np.random.Generator,
                  length: int, eps: float = 1e-5) -> np.ndarray:
  """counts[k, b] (int32 [K, B]); every row of counts.T sums to remaining[b]."""
  remaining = np.asarray(remaining, np.int64)
  if kind == "uniform":
    k = np.arange(steps + 1)[:, None]
    cum = -(-k * remaining[None, :] // steps)  # ceil(k N / S)
    return np.diff(cum, axis=0).astype(np.int32)
  rows, left = [], remaining.copy()
  if kind == "binomial":
    for _ in range(steps):
      c = np.minimum(rng.binomial(length, 1.0 / steps, size=left.shape), left)
      rows.append(c)
      left = left - c
  elif kind == "ancestral":
    ts = np.linspace(1.0, eps, steps + 1)
    for k in range(steps):
      a_t, a_s = objectives.alpha(ts[k]), objectives.alpha(ts[k + 1])
      c = rng.binomial(left, (a_s - a_t) / (1.0 - a_t))
      rows.append(c)
      left = left - c
  else:
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
  if left.any():
    rows.append(left)  # the final pass / reveal step fills the leftovers
  return np.stack(rows).astype(np.int32)


def _pow2(n: int, cap: int) -> int:
  return min(cap, 1 << max(0, (n - 1).bit_length()))


# ----------------------------------------------------------------------------
# PGM: efficient execution.
# ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PGMState:
  canvas: jax.Array     # [B, L] output tokens (MASK where unknown)
  clean_tok: jax.Array  # [B, L] packed clean tokens (first clean_len valid)
  clean_pos: jax.Array  # [B, L] their original positions
  clean_len: jax.Array  # [B]
  order: jax.Array      # [B, L] unknown positions in reveal order
  cursor: jax.Array     # [B] how many of `order` are revealed


def _pgm_efficient_step(params, st: PGMState, counts_B, key, *, model, n_enc: int,
                        n_query: int, mask_id: int, top_p: float, temperature: float):
  TRACE_COUNTS["pgm_efficient"] += 1
  batch, length = st.canvas.shape
  enc_tok, enc_pos = st.clean_tok[:, :n_enc], st.clean_pos[:, :n_enc]
  mask = AttentionMask.packed(st.clean_len, n_enc)
  enc = model.apply({"params": params}, enc_tok, enc_pos, mask, method="encode")
  j = jnp.arange(n_query)[None, :]
  q_idx = jnp.minimum(st.cursor[:, None] + j, length - 1)
  q_pos = jnp.take_along_axis(st.order, q_idx, axis=1)
  q_valid = j < counts_B[:, None]
  logits = model.apply({"params": params}, enc, enc_pos, q_pos, mask, method="decode")
  logp = filtered_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
  draw = keyed_gumbel_argmax(key, logp, jnp.arange(batch), q_pos)
  rows = jnp.arange(batch)[:, None]
  write = jnp.where(q_valid, st.clean_len[:, None] + j, length)  # out of range: dropped
  return PGMState(
      canvas=st.canvas.at[rows, jnp.where(q_valid, q_pos, length)].set(draw, mode="drop"),
      clean_tok=st.clean_tok.at[rows, write].set(draw, mode="drop"),
      clean_pos=st.clean_pos.at[rows, write].set(q_pos, mode="drop"),
      clean_len=st.clean_len + counts_B,
      order=st.order,
      cursor=st.cursor + counts_B)


_STATIC = ("model", "n_enc", "n_query", "mask_id", "top_p", "temperature")
_pgm_efficient_step_jit = jax.jit(_pgm_efficient_step, static_argnames=_STATIC,
                                  donate_argnames=("st",))


def _packed_known(prompt: Prompt):
  """(tokens, positions) int32 [B, L] of each sequence's known tokens, packed first."""
  batch, length = prompt.known.shape
  clean_tok = np.zeros((batch, length), np.int32)
  clean_pos = np.zeros((batch, length), np.int32)
  for b in range(batch):
    pos = np.flatnonzero(prompt.known[b])
    clean_tok[b, :len(pos)] = prompt.tokens[b, pos]
    clean_pos[b, :len(pos)] = pos
  return clean_tok, clean_pos


def _initial_state(prompt: Prompt, order: np.ndarray, mask_id: int,
                   put: Callable = jnp.asarray) -> PGMState:
  batch, _ = prompt.known.shape
  clean_tok, clean_pos = _packed_known(prompt)
  canvas = np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32)
  return PGMState(canvas=put(canvas), clean_tok=put(clean_tok), clean_pos=put(clean_pos),
                  clean_len=put(prompt.known.sum(1).astype(np.int32)),
                  order=put(np.asarray(order, np.int32)),
                  cursor=put(np.zeros((batch,), np.int32)))


def pgm_plan(sampler: str, prompt: Prompt, steps: int, seed: int, *,
             schedule: Optional[np.ndarray] = None, order: Optional[np.ndarray] = None):
  """(order, counts) for a PGM sampler; explicit `schedule`/`order` override the draw."""
  rng = np.random.default_rng(seed)
  batch, length = prompt.known.shape
  if not prompt.known[:, 0].all():
    raise ValueError("PGM sampling needs a known BOS at position 0 (the encoder needs a "
                     "clean token)")
  order = random_orders(rng, prompt.known) if order is None else np.asarray(order, np.int32)
  if schedule is None:
    kind = {"efficient-uniform": "uniform", "efficient-non-uniform": "binomial",
            "naive": "ancestral"}[sampler]
    schedule = make_schedule(kind, (~prompt.known).sum(1), steps, rng, length)
  return order, np.asarray(schedule, np.int32)


def pgm_sample(params, prompt: Prompt, *, model, sampler: str, steps: int, seed: int,
               mask_id: int, top_p: float = 1.0, temperature: float = 1.0,
               bucket_size: int = 0, schedule: Optional[np.ndarray] = None,
               order: Optional[np.ndarray] = None, measure_flops: bool = False,
               exact_flops: bool = False, execute: bool = True,
               progress: Optional[Callable[[int, int], None]] = None,
               threshold: float = 0.9, execution: Optional[str] = None) -> SampleResult:
  """Runs a PGM sampler (see module docstring). Returns tokens and accounting.

  `threshold` and `execution` ("efficient", the default, or "naive") are read by
  `confidence-threshold` only."""
  if sampler not in PGM_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {PGM_SAMPLERS} for a PGM, "
                     f"got {sampler!r}")
  batch, length = prompt.known.shape
  bucket = bucket_size or max(8, length // 16)
  if sampler == THRESHOLD_SAMPLER:
    return _pgm_threshold_sample(
        params, prompt, model=model, steps=steps, seed=seed, mask_id=mask_id, top_p=top_p,
        temperature=temperature, bucket=bucket, threshold=check_threshold(threshold),
        execution=execution or "efficient", schedule=schedule, order=order,
        measure_flops=measure_flops, exact_flops=exact_flops, execute=execute,
        progress=progress)
  if execution is not None:
    raise ValueError(f"pgm_sample: execution={execution!r} is for {THRESHOLD_SAMPLER!r}; "
                     f"the {sampler!r} sampler names its execution itself")
  order, counts = pgm_plan(sampler, prompt, steps, seed, schedule=schedule, order=order)
  key = jax.random.key(seed)
  traces_before = dict(TRACE_COUNTS)
  start = time.perf_counter()
  with params_mesh_context(params):
    tokens, flops, exact, passes = _pgm_run(
        params, prompt, order, counts, key, sampler=sampler, model=model, mask_id=mask_id,
        top_p=top_p, temperature=temperature, bucket=bucket, measure_flops=measure_flops,
        exact_flops=exact_flops, execute=execute, progress=progress)
  seconds = time.perf_counter() - start
  compiles = sum(TRACE_COUNTS[k] - traces_before[k] for k in TRACE_COUNTS)
  return SampleResult(tokens=tokens, sampler=sampler, steps=steps, passes=passes,
                      compiles=compiles, flops_per_seq=None if flops is None else flops / batch,
                      exact_flops_per_seq=None if exact is None else exact / batch,
                      seconds=seconds)


def _pgm_run(params, prompt, order, counts, key, *, sampler, model, mask_id, top_p,
             temperature, bucket, measure_flops, exact_flops, execute, progress):
  if sampler == "naive":
    return _pgm_naive_run(params, prompt, order, counts, key, model=model, mask_id=mask_id,
                          top_p=top_p, temperature=temperature,
                          measure_flops=measure_flops, progress=progress)
  return _pgm_efficient_run(
      params, prompt, order, counts, key, model=model, mask_id=mask_id, top_p=top_p,
      temperature=temperature, bucket=bucket, uniform=(sampler == "efficient-uniform"),
      measure_flops=measure_flops, exact_flops=exact_flops, execute=execute,
      progress=progress)


class _QuadraticCost:
  """XLA FLOPs of the efficient step as a function of the encoder length n.

  For a fixed query count, every op's cost is a polynomial of degree <= 2 in n
  (projections and MLPs linear, attention scores quadratic), so three lowerings
  give the exact cost at every n without lowering each shape.
  """

  def __init__(self, lower_at: Callable[[int], float], length: int):
    ns = sorted({max(1, length // 4), max(2, length // 2), length})
    if len(ns) < 3:
      ns = [1, 2, 3]
    self.ns = np.asarray(ns, np.float64)
    self.coef = np.polyfit(self.ns, [lower_at(int(n)) for n in ns], 2)

  def __call__(self, n: int) -> float:
    return float(np.polyval(self.coef, n))


def _pgm_efficient_run(params, prompt, order, counts, key, *, model, mask_id, top_p,
                       temperature, bucket, uniform, measure_flops, exact_flops, execute,
                       progress):
  batch, length = prompt.known.shape
  put = device_put_fn(params, batch)
  st = _initial_state(prompt, order, mask_id, put)
  key = put(key)
  clean_len = prompt.known.sum(1).astype(np.int64)
  flops = 0.0 if measure_flops else None
  exact = 0.0 if exact_flops else None
  cost_cache: dict = {}
  exact_cost: dict = {}
  passes = 0
  for k, counts_k in enumerate(counts):
    max_count = int(counts_k.max())
    if max_count == 0:
      continue
    n_enc = round_up(int(clean_len.max()), bucket, length)
    n_query = max_count if uniform else _pow2(max_count, length)
    static = dict(model=model, n_enc=n_enc, n_query=n_query, mask_id=mask_id, top_p=top_p,
                  temperature=temperature)
    counts_dev = put(counts_k)
    step_key = jax.random.fold_in(key, k)
    if measure_flops:
      if (n_enc, n_query) not in cost_cache:
        cost_cache[(n_enc, n_query)] = lowered_flops(
            _pgm_efficient_step_jit, params, st, counts_dev, step_key, **static)
      flops += cost_cache[(n_enc, n_query)]
    if exact_flops:
      if max_count not in exact_cost:
        lower_at = lambda n, m=max_count: lowered_flops(
            _pgm_efficient_step_jit, params, st, counts_dev, step_key,
            **dict(static, n_enc=n, n_query=m))
        exact_cost[max_count] = _QuadraticCost(lower_at, length)
      exact += exact_cost[max_count](int(clean_len.max()))
    if execute:
      st = _pgm_efficient_step_jit(params, st, counts_dev, step_key, **static)
    clean_len += counts_k
    passes += 1
    if progress is not None:
      progress(k + 1, len(counts))
  tokens = sharding.host_value(st.canvas)
  return tokens, flops, exact, passes


# ----------------------------------------------------------------------------
# PGM: naive execution (training layout, full length).
# ----------------------------------------------------------------------------

def _pgm_naive_step(params, canvas, ranks, cursor, counts_B, key, *, model, mask_id: int,
                    top_p: float, temperature: float):
  """ranks[b, p]: index of position p in the reveal order (L for known positions)."""
  TRACE_COUNTS["pgm_naive"] += 1
  batch, length = canvas.shape
  group = (canvas == mask_id).astype(jnp.int32)  # unknown positions form group 1
  logits = model.apply({"params": params}, canvas, group, train=False)
  logp = filtered_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
  positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
  draw = keyed_gumbel_argmax(key, logp, jnp.arange(batch), positions)
  reveal = (group == 1) & (ranks >= cursor[:, None]) & (ranks < (cursor + counts_B)[:, None])
  return jnp.where(reveal, draw, canvas), cursor + counts_B


_pgm_naive_step_jit = jax.jit(_pgm_naive_step,
                              static_argnames=("model", "mask_id", "top_p", "temperature"))


def _pgm_naive_run(params, prompt, order, counts, key, *, model, mask_id, top_p, temperature,
                   measure_flops, progress):
  batch, length = prompt.known.shape
  put = device_put_fn(params, batch)
  canvas = put(np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32))
  ranks = np.full((batch, length), length, np.int32)
  n_unknown = (~prompt.known).sum(1)
  for b in range(batch):
    ranks[b, order[b, :n_unknown[b]]] = np.arange(n_unknown[b])
  ranks_dev = put(ranks)
  cursor = put(np.zeros((batch,), np.int32))
  key = put(key)
  static = dict(model=model, mask_id=mask_id, top_p=top_p, temperature=temperature)
  flops = 0.0 if measure_flops else None
  per_step = None
  passes = 0
  for k, counts_k in enumerate(counts):
    if int(counts_k.max()) == 0:
      continue
    counts_dev, step_key = put(counts_k), jax.random.fold_in(key, k)
    if measure_flops:
      if per_step is None:
        per_step = lowered_flops(_pgm_naive_step_jit, params, canvas, ranks_dev, cursor,
                                 counts_dev, step_key, **static)
      flops += per_step
    canvas, cursor = _pgm_naive_step_jit(params, canvas, ranks_dev, cursor, counts_dev,
                                         step_key, **static)
    passes += 1
    if progress is not None:
      progress(k + 1, len(counts))
  return sharding.host_value(canvas), flops, None, passes


# ----------------------------------------------------------------------------
# PGM: confidence-threshold decoding (efficient, and naive as its oracle).
# ----------------------------------------------------------------------------

ThresholdState = PackedCanvas  # confidence-threshold's state (samplers.common)


def _threshold_state(prompt: Prompt, mask_id: int, put: Callable) -> ThresholdState:
  batch, length = prompt.known.shape
  clean_tok, clean_pos = _packed_known(prompt)
  rem_pos = np.zeros((batch, length), np.int32)
  for b in range(batch):
    unknown = np.flatnonzero(~prompt.known[b])
    rem_pos[b, :len(unknown)] = unknown
  canvas = np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32)
  return ThresholdState(canvas=put(canvas), clean_tok=put(clean_tok), clean_pos=put(clean_pos),
                        clean_len=put(prompt.known.sum(1).astype(np.int32)),
                        rem_pos=put(rem_pos),
                        rem_len=put((~prompt.known).sum(1).astype(np.int32)))


def _pgm_threshold_step(params, st: ThresholdState, key, threshold, force_all, *, model,
                        n_enc: int, n_query: int, mask_id: int, top_p: float,
                        temperature: float):
  """Efficient: the encoder on the packed known tokens, the decoder on every unknown
  position (the first n_query of rem_pos; the slots past rem_len are padding)."""
  TRACE_COUNTS["pgm_efficient"] += 1
  batch = st.canvas.shape[0]
  enc_tok, enc_pos = st.clean_tok[:, :n_enc], st.clean_pos[:, :n_enc]
  mask = AttentionMask.packed(st.clean_len, n_enc)
  enc = model.apply({"params": params}, enc_tok, enc_pos, mask, method="encode")
  q_pos = st.rem_pos[:, :n_query]
  candidate = jnp.arange(n_query)[None, :] < st.rem_len[:, None]
  logits = model.apply({"params": params}, enc, enc_pos, q_pos, mask, method="decode")
  logp, conf_logp = threshold_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
  draw, reveal = threshold_reveal(logp, candidate, key, jnp.arange(batch), q_pos, threshold,
                                  force_all, conf_logp)
  return reveal_packed(st, q_pos, draw, reveal)


_THRESHOLD_STATIC = ("model", "n_enc", "n_query", "mask_id", "top_p", "temperature")
_pgm_threshold_step_jit = jax.jit(_pgm_threshold_step, static_argnames=_THRESHOLD_STATIC,
                                  donate_argnames=("st",))


def _pgm_threshold_naive_step(params, canvas, key, threshold, force_all, *, model,
                              mask_id: int, top_p: float, temperature: float):
  """Naive: the training layout at full length, the unknown positions as group 1."""
  TRACE_COUNTS["pgm_naive"] += 1
  batch, length = canvas.shape
  group = canvas == mask_id
  logits = model.apply({"params": params}, canvas, group.astype(jnp.int32), train=False)
  logp, conf_logp = threshold_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
  positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
  draw, reveal = threshold_reveal(logp, group, key, jnp.arange(batch), positions, threshold,
                                  force_all, conf_logp)
  canvas = jnp.where(reveal, draw, canvas)
  return canvas, (canvas == mask_id).sum(axis=1).astype(jnp.int32)


_pgm_threshold_naive_step_jit = jax.jit(
    _pgm_threshold_naive_step, static_argnames=("model", "mask_id", "top_p", "temperature"),
    donate_argnames=("canvas",))


def _pgm_threshold_sample(params, prompt: Prompt, *, model, steps, seed, mask_id, top_p,
                          temperature, bucket, threshold, execution, schedule, order,
                          measure_flops, exact_flops, execute, progress) -> SampleResult:
  """confidence-threshold: at most `steps` passes, fewer when every sequence is complete
  earlier; step `steps` (the cap) reveals everything that remains."""
  if execution not in THRESHOLD_EXECUTIONS:
    raise ValueError(f"pgm_sample: execution={execution!r} must be one of "
                     f"{THRESHOLD_EXECUTIONS}")
  if schedule is not None or order is not None:
    raise ValueError(f"pgm_sample: {THRESHOLD_SAMPLER!r} has no order or schedule to set")
  if not execute or exact_flops:
    raise ValueError(f"pgm_sample: {THRESHOLD_SAMPLER!r} reveals data-dependent counts: it "
                     f"must run (execute=True), and has no padding-free FLOP count")
  if steps < 1:
    raise ValueError(f"config.sample.steps={steps} must be >= 1")
  if not prompt.known[:, 0].all():
    raise ValueError("PGM sampling needs a known BOS at position 0 (the encoder needs a "
                     "clean token)")
  batch, length = prompt.known.shape
  put = device_put_fn(params, batch)
  key, thr = put(jax.random.key(seed)), put(np.float32(threshold))
  static = dict(model=model, mask_id=mask_id, top_p=top_p, temperature=temperature)
  remaining = (~prompt.known).sum(1).astype(np.int64)
  seq_passes = np.zeros((batch,), np.int64)
  flops = 0.0 if measure_flops else None
  cost_cache: dict = {}
  traces_before = dict(TRACE_COUNTS)
  start = time.perf_counter()
  with params_mesh_context(params):
    if execution == "efficient":
      st = _threshold_state(prompt, mask_id, put)
    else:
      st = put(np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32))
    k = 0
    while remaining.max(initial=0) > 0:
      args = (params, st, jax.random.fold_in(key, k), thr, put(np.bool_(k + 1 >= steps)))
      if execution == "efficient":
        shapes = dict(static, n_enc=round_up(int((length - remaining).max()), bucket, length),
                      n_query=round_up(int(remaining.max()), bucket, length))
        fn = _pgm_threshold_step_jit
      else:
        shapes, fn = static, _pgm_threshold_naive_step_jit
      if measure_flops:
        cache_key = (shapes.get("n_enc"), shapes.get("n_query"))
        if cache_key not in cost_cache:
          cost_cache[cache_key] = lowered_flops(fn, *args, **shapes)
        flops += cost_cache[cache_key]
      seq_passes += remaining > 0
      if execution == "efficient":
        st = fn(*args, **shapes)
        remaining = sharding.host_value(st.rem_len).astype(np.int64)
      else:
        st, rem_dev = fn(*args, **shapes)
        remaining = sharding.host_value(rem_dev).astype(np.int64)
      k += 1
      if progress is not None:
        progress(k, steps)
    tokens = sharding.host_value(st.canvas if execution == "efficient" else st)
  seconds = time.perf_counter() - start
  compiles = sum(TRACE_COUNTS[name] - traces_before[name] for name in TRACE_COUNTS)
  return SampleResult(tokens=tokens, sampler=THRESHOLD_SAMPLER, steps=steps, passes=k,
                      compiles=compiles, flops_per_seq=None if flops is None else flops / batch,
                      seconds=seconds, seq_passes=seq_passes)
