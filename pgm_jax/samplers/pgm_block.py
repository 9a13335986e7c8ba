"""Block PGM samplers: blocks left to right with a KV cache, PGM steps inside a block.

For block k (positions k*b .. k*b + b - 1), every sampler runs the same plan: a random
order of the block's unknown positions and a count schedule (`uniform` over
`steps_per_block` steps), or, with `rule="threshold"` (config.sample.sampler =
confidence-threshold), every unknown position of the block queried at each step and
revealed by `samplers.common.threshold_reveal` (at least one per step; the block's last
allowed step reveals the rest). Draws are keyed by (sequence, position, step) as in every
PGM sampler, so the executions give the same tokens:

  * block-efficient: the cache holds the clean stream of finished blocks (every encoder
    layer's keys and values, and GroupSwap's and every decoder layer's keys and values of
    the encoder outputs). A step runs the encoder on the block's known tokens only (reading
    the cache) and the decoder on the positions being revealed; when the block is complete
    one clean pass over its b tokens appends it to the cache.
  * block-naive: no cache; every step runs the training layout on the whole canvas (the
    full recomputation the cached sampler is tested against, token for token).

Variable length: a sequence is finished after the first block that holds `eos_id`; the run
stops when every sequence is finished or after `max_len` positions (the canvas length),
and `SampleResult.lengths` cuts each sample after its first EOS.

Compilation: the cache is read through its first `n_cache` slots, rounded up to a bucket of
`bucket_size` positions, so a run compiles at most L / bucket step programs per query size
and as many clean-pass programs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgm_jax.core import sharding
from pgm_jax.ops.masks import CLEAN_GROUP
from pgm_jax.samplers.common import (THRESHOLD_SAMPLER, TRACE_COUNTS, Prompt, SampleResult,
                                     device_put_fn, filtered_log_probs, keyed_gumbel_argmax,
                                     lowered_flops, params_mesh_context, round_up,
                                     threshold_log_probs, threshold_reveal)
from pgm_jax.samplers.pgm import make_schedule, random_orders

BLOCK_SAMPLERS = ("block-efficient", "block-naive", THRESHOLD_SAMPLER)
# Executions of each sampler: (cached?, reveal rule). confidence-threshold runs cached; its
# uncached twin (the tests' oracle) is `block_sample(..., execution="naive")`.
_EXECUTIONS = {"block-efficient": (True, "count"), "block-naive": (False, "count"),
               THRESHOLD_SAMPLER: (True, "threshold")}

TRACE_COUNTS.setdefault("pgm_block", 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockState:
  canvas: jax.Array     # [B, Lp] output tokens (MASK where unknown); Lp = blocks * b
  known_tok: jax.Array  # [B, b] the current block's known tokens, packed
  known_pos: jax.Array  # [B, b] their positions
  known_len: jax.Array  # [B]
  enc_cache: tuple      # per encoder layer (k, v) [B, Lp, heads, head_dim]
  dec_cache: tuple      # GroupSwap + per decoder layer (k, v) [B, Lp, heads, head_dim]


def steps_per_block(steps: int, length: int, block_len: int) -> int:
  """`steps` sampling steps for the whole sequence, spread evenly over its blocks."""
  blocks = -(-length // block_len)
  return max(1, -(-steps // blocks))


def _cache_valid(batch: int, n_cache: int, block: jax.Array, block_len: int):
  return jnp.broadcast_to(jnp.arange(n_cache)[None] < block * block_len, (batch, n_cache))


def _choose(logits, canvas, q_pos, q_valid, key, threshold, force_all, *, rule, mask_id,
            top_p, temperature):
  """(draw, reveal) at the query slots: the keyed draw, revealed where q_valid ("count"), or
  by the threshold rule among the still-unknown positions ("threshold")."""
  rows = jnp.arange(canvas.shape[0])
  if rule == "threshold":
    logp, conf_logp = threshold_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
    unknown = jnp.take_along_axis(canvas, q_pos, axis=1) == mask_id
    return threshold_reveal(logp, q_valid & unknown, key, rows, q_pos, threshold, force_all,
                            conf_logp)
  logp = filtered_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
  return keyed_gumbel_argmax(key, logp, rows, q_pos), q_valid


def _cached_logits(params, st: BlockState, q_pos, *, model, n_cache, block):
  """Encoder on the block's known tokens + cache, decoder on q_pos: logits [B, Q, V]."""
  batch, b = st.known_tok.shape
  cache_valid = _cache_valid(batch, n_cache, block, b)
  known_valid = jnp.arange(b)[None] < st.known_len[:, None]
  enc_cache = tuple((k[:, :n_cache], v[:, :n_cache]) for k, v in st.enc_cache)
  dec_cache = tuple((k[:, :n_cache], v[:, :n_cache]) for k, v in st.dec_cache)
  enc, _ = model.apply({"params": params}, st.known_tok, st.known_pos,
                       jnp.zeros_like(st.known_tok), known_valid, enc_cache, cache_valid,
                       method="encode_cached")
  return model.apply({"params": params}, enc, st.known_pos, known_valid, q_pos, dec_cache,
                     cache_valid, method="decode_cached")


def _reveal(st: BlockState, q_pos, reveal, draw):
  """Writes the revealed draws to the canvas and appends them to the known tokens."""
  batch, b = st.known_tok.shape
  length = st.canvas.shape[1]
  rows = jnp.arange(batch)[:, None]
  slot = st.known_len[:, None] + jnp.cumsum(reveal, axis=1) - 1
  write = jnp.where(reveal, slot, b)  # out of range: dropped
  return dataclasses.replace(
      st, canvas=st.canvas.at[rows, jnp.where(reveal, q_pos, length)].set(draw, mode="drop"),
      known_tok=st.known_tok.at[rows, write].set(draw, mode="drop"),
      known_pos=st.known_pos.at[rows, write].set(q_pos, mode="drop"),
      known_len=st.known_len + reveal.sum(1).astype(jnp.int32))


def _efficient_step(params, st: BlockState, q_pos, q_valid, key, block, threshold, force_all,
                    *, model, n_cache, rule, mask_id, top_p, temperature):
  TRACE_COUNTS["pgm_block"] += 1
  logits = _cached_logits(params, st, q_pos, model=model, n_cache=n_cache, block=block)
  draw, reveal = _choose(logits, st.canvas, q_pos, q_valid, key, threshold, force_all,
                         rule=rule, mask_id=mask_id, top_p=top_p, temperature=temperature)
  return _reveal(st, q_pos, reveal, draw)


def _commit(params, st: BlockState, block, *, model, n_cache):
  """One clean pass over the finished block: its keys and values join the caches, and the
  next block starts with its prompt tokens (set by the caller) as the known tokens."""
  TRACE_COUNTS["pgm_block"] += 1
  batch, b = st.known_tok.shape
  start = block * b
  tokens = jax.lax.dynamic_slice_in_dim(st.canvas, start, b, axis=1)
  pos = jnp.broadcast_to(start + jnp.arange(b, dtype=jnp.int32)[None], (batch, b))
  cache_valid = _cache_valid(batch, n_cache, block, b)
  enc_cache = tuple((k[:, :n_cache], v[:, :n_cache]) for k, v in st.enc_cache)
  enc, enc_kv = model.apply({"params": params}, tokens, pos,
                            jnp.full((batch, b), CLEAN_GROUP, jnp.int32),
                            jnp.ones((batch, b), bool), enc_cache, cache_valid,
                            method="encode_cached")
  dec_kv = model.apply({"params": params}, enc, pos, method="decoder_keys_values")

  def append(cache, new):
    return tuple((jax.lax.dynamic_update_slice_in_dim(k, nk.astype(k.dtype), start, axis=1),
                  jax.lax.dynamic_update_slice_in_dim(v, nv.astype(v.dtype), start, axis=1))
                 for (k, v), (nk, nv) in zip(cache, new))

  return dataclasses.replace(st, enc_cache=append(st.enc_cache, enc_kv),
                             dec_cache=append(st.dec_cache, dec_kv))


def _naive_step(params, canvas, q_pos, q_valid, key, block, threshold, force_all, *, model,
                block_len, rule, mask_id, top_p, temperature):
  """The training layout on the whole canvas: the current block's unknown positions are
  group 1, everything else group 0 (only the block's own groups and the clean stream of
  earlier blocks reach its predictions)."""
  TRACE_COUNTS["pgm_block"] += 1
  batch, length = canvas.shape
  in_block = (jnp.arange(length) // block_len) == block
  group = (in_block[None] & (canvas == mask_id)).astype(jnp.int32)
  logits = model.apply({"params": params}, canvas, group, train=False)
  logits = jnp.take_along_axis(logits, q_pos[..., None], axis=1)
  draw, reveal = _choose(logits, canvas, q_pos, q_valid, key, threshold, force_all, rule=rule,
                         mask_id=mask_id, top_p=top_p, temperature=temperature)
  rows = jnp.arange(batch)[:, None]
  return canvas.at[rows, jnp.where(reveal, q_pos, length)].set(draw, mode="drop")


_STEP_STATIC = ("model", "n_cache", "rule", "mask_id", "top_p", "temperature")
_efficient_step_jit = jax.jit(_efficient_step, static_argnames=_STEP_STATIC,
                              donate_argnames=("st",))
_commit_jit = jax.jit(_commit, static_argnames=("model", "n_cache"), donate_argnames=("st",))
_naive_step_jit = jax.jit(_naive_step, static_argnames=("model", "block_len", "rule", "mask_id",
                                                        "top_p", "temperature"))


def block_sample(params, prompt: Prompt, *, model, sampler: str, steps: int, seed: int,
                 mask_id: int, eos_id: Optional[int] = None, top_p: float = 1.0,
                 temperature: float = 1.0, bucket_size: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None,
                 measure_flops: bool = False, execute: bool = True, threshold: float = 0.9,
                 execution: str = "auto") -> SampleResult:
  """Runs a block PGM sampler (module docstring) on `prompt` ([B, max_len]; position 0 is a
  known BOS). `steps` is the budget for the whole sequence (`steps_per_block` per block).
  measure_flops: XLA cost analysis of every program as executed (the bench); execute=False
  only counts (abstract params are then enough; no EOS stop). threshold: the
  confidence-threshold sampler's. execution: "auto" (the sampler's), "cached" or "naive"
  (the full recomputation, e.g. of confidence-threshold, for tests)."""
  if sampler not in BLOCK_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {BLOCK_SAMPLERS} for the block "
                     f"PGM, got {sampler!r}")
  cfg = model.config
  b = cfg.block_len
  batch, length = prompt.known.shape
  if not prompt.known[:, 0].all():
    raise ValueError("block PGM sampling needs a known BOS at position 0")
  if length % b:
    raise ValueError(f"config.sample.max_len={length} must be a multiple of "
                     f"config.model.block_len={b}")
  num_blocks = length // b
  known = np.asarray(prompt.known, bool)
  tokens0 = np.where(known, prompt.tokens, mask_id).astype(np.int32)
  per_block = steps_per_block(steps, length, b)
  rng = np.random.default_rng(seed)
  bucket = bucket_size or max(b, length // 16)

  put = device_put_fn(params, batch)
  key = put(jax.random.key(seed))
  efficient, rule = _EXECUTIONS[sampler]
  if execution not in ("auto", "cached", "naive"):
    raise ValueError(f"execution must be auto, cached or naive, got {execution!r}")
  efficient = efficient if execution == "auto" else execution == "cached"
  if rule == "threshold" and not execute:
    raise ValueError("the confidence-threshold sampler's passes depend on the weights: "
                     "it cannot be counted without executing it")
  static = dict(model=model, rule=rule, mask_id=mask_id, top_p=top_p, temperature=temperature)
  threshold_dev = put(np.float32(threshold))
  seq_passes = np.zeros((batch,), np.int64)
  traces_before = TRACE_COUNTS["pgm_block"]
  if efficient:
    head_dim = cfg.hidden // cfg.num_heads
    zeros = lambda: np.zeros((batch, length, cfg.num_heads, head_dim), cfg.compute_dtype)
    st = BlockState(canvas=put(tokens0), known_tok=put(np.zeros((batch, b), np.int32)),
                    known_pos=put(np.zeros((batch, b), np.int32)),
                    known_len=put(np.zeros((batch,), np.int32)),
                    enc_cache=tuple((put(zeros()), put(zeros())) for _ in range(cfg.enc_layers)),
                    dec_cache=tuple((put(zeros()), put(zeros()))
                                    for _ in range(cfg.dec_layers + 1)))
  else:
    canvas = put(tokens0)
  done = np.zeros((batch,), bool)
  canvas_host = tokens0.copy()
  flops = 0.0 if measure_flops else None
  cost: dict = {}

  def count(name, jitted, *args, **kw):
    """Adds the lowered cost of one program call (cached per static shape)."""
    nonlocal flops
    if measure_flops:
      key_ = (name,) + tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, int)))
      if key_ not in cost:
        cost[key_] = lowered_flops(jitted, params, *args, **kw)
      flops += cost[key_]

  passes, step_index = 0, 0
  start_time = time.perf_counter()
  with params_mesh_context(params):
    for block in range(num_blocks):
      lo, hi = block * b, (block + 1) * b
      block_known = known[:, lo:hi]
      if efficient:
        # The block's prompt tokens are its first known tokens (packed).
        ktok = np.zeros((batch, b), np.int32)
        kpos = np.zeros((batch, b), np.int32)
        klen = block_known.sum(1).astype(np.int32)
        for r in range(batch):
          p = lo + np.flatnonzero(block_known[r])
          ktok[r, :len(p)] = tokens0[r, p]
          kpos[r, :len(p)] = p
        st = dataclasses.replace(st, known_tok=put(ktok), known_pos=put(kpos),
                                 known_len=put(klen))
      n_unknown = (~block_known).sum(1)
      block_order = lo + random_orders(rng, block_known)  # the block's unknown positions
      if rule == "threshold":  # every position of the block, each step; the rule picks
        block_order = np.broadcast_to(lo + np.arange(b, dtype=np.int32), (batch, b)).copy()
        counts = np.full((per_block, batch), b, np.int32) * (n_unknown > 0)[None]
        n_query = b
      else:
        counts = make_schedule("uniform", n_unknown, per_block, rng, b)
        n_query = max(1, -(-b // per_block))
      cursor = np.zeros((batch,), np.int64)
      n_cache = round_up(lo, bucket, length)
      block_dev = put(np.int32(block))
      left = n_unknown.copy()
      for s, counts_k in enumerate(counts):
        if int(counts_k.max()) == 0 or (rule == "threshold" and not (left[~done] > 0).any()):
          continue
        force_all = put(np.bool_(s == len(counts) - 1))
        seq_passes += (left > 0) & ~done
        j = np.arange(n_query)[None]
        idx = np.minimum(cursor[:, None] + j, b - 1)
        q_pos = np.take_along_axis(block_order, idx, axis=1)
        q_valid = (j < counts_k[:, None]) & ~done[:, None]
        step_key = jax.random.fold_in(key, step_index)
        if efficient:
          args = (st, put(q_pos), put(q_valid), step_key, block_dev, threshold_dev, force_all)
          count("step", _efficient_step_jit, *args, n_cache=n_cache, **static)
          if execute:
            st = _efficient_step_jit(params, *args, n_cache=n_cache, **static)
        else:
          args = (canvas, put(q_pos), put(q_valid), step_key, block_dev, threshold_dev,
                  force_all)
          count("naive", _naive_step_jit, *args, block_len=b, **static)
          if execute:
            canvas = _naive_step_jit(params, *args, block_len=b, **static)
        if rule == "count":  # the threshold rule queries the whole block every step
          cursor += counts_k
        passes += 1
        if rule == "threshold":  # what is left decides whether the block needs another step
          block_now = sharding.host_value((st.canvas if efficient else canvas)[:, lo:hi])
          left = (block_now == mask_id).sum(1)
        step_index += 1
        if progress is not None:
          progress(min(step_index, num_blocks * per_block), num_blocks * per_block)
      if efficient and block + 1 < num_blocks:
        count("commit", _commit_jit, st, block_dev, model=model, n_cache=n_cache)
        if execute:
          st = _commit_jit(params, st, block_dev, model=model, n_cache=n_cache)
      if not execute:
        continue
      canvas_block = sharding.host_value((st.canvas if efficient else canvas)[:, lo:hi])
      canvas_host[:, lo:hi] = np.where(done[:, None], canvas_host[:, lo:hi], canvas_block)
      if eos_id is not None:  # position 0 holds BOS, which may be the EOS id (GPT-2)
        done |= (canvas_block[:, 1 if block == 0 else 0:] == eos_id).any(1)
        if done.all():
          break
  tokens = canvas_host[:, :length]
  lengths = np.full((batch,), length, np.int64)
  if eos_id is not None:
    for r in range(batch):
      hits = np.flatnonzero(tokens[r, 1:] == eos_id)
      if len(hits):
        lengths[r] = hits[0] + 2  # through the first EOS after BOS
  return SampleResult(tokens=tokens, sampler=sampler, steps=steps, passes=passes,
                      compiles=TRACE_COUNTS["pgm_block"] - traces_before,
                      seconds=time.perf_counter() - start_time, lengths=lengths,
                      flops_per_seq=None if flops is None else flops / batch,
                      seq_passes=seq_passes)
