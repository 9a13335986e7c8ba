"""What every sampler family shares: prompts, categorical draws, device placement, results.

Prompts carry known tokens at arbitrary positions (prefixes and `[[N]]` infilling gaps).
Categorical draws are Gumbel-max in log space and in float32: the same exponential race
the reference runs in float64, argmax(p / E) = argmax(log p - log E), written in log
space so that small probabilities do not underflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import statistics
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pgm_jax.core import sharding

# Trace counters (one increment per compilation of a sampler program; tests count them).
TRACE_COUNTS = {"pgm_efficient": 0, "pgm_naive": 0, "mdlm": 0, "ar": 0, "image": 0}


# ----------------------------------------------------------------------------
# Prompts (known tokens at arbitrary positions).
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Prompt:
  """tokens[b, i] is known iff known[b, i]; position 0 must hold BOS (known)."""
  tokens: np.ndarray  # int32 [B, L]
  known: np.ndarray   # bool  [B, L]


def unconditional_prompt(batch: int, length: int, bos_id: int) -> Prompt:
  tokens = np.zeros((batch, length), np.int32)
  tokens[:, 0] = bos_id
  known = np.zeros((batch, length), bool)
  known[:, 0] = True
  return Prompt(tokens, known)


_GAP = re.compile(r"\[\[(\d+)\]\]")
_ESCAPES = {"\\[[": "[[", "\\]]": "]]"}


def split_prompt(text: str, key: str = "config.sample.prompt") -> list:
  """Prompt text -> pieces: str (known text) or int (a gap of that many positions).

  `[[N]]` (N a whole number) is a gap; `\\[[` and `\\]]` are literal `[[` and `]]`. Any
  other `[[` or `]]` (e.g. `[[x]]`, `[[5]`, `[[ 5 ]]`) is an error naming `key`.
  """
  pieces, literal, i = [], [], 0
  while i < len(text):
    if text.startswith(("\\[[", "\\]]"), i):
      literal.append(_ESCAPES[text[i:i + 3]])
      i += 3
      continue
    gap = _GAP.match(text, i)
    if gap:
      if literal:
        pieces.append("".join(literal))
        literal = []
      pieces.append(int(gap.group(1)))
      i = gap.end()
      continue
    if text.startswith(("[[", "]]"), i):
      raise ValueError(
          f"{key}: malformed gap {text[i:i + 12]!r} at character {i}: a gap is [[N]] with N a "
          f"whole number; write \\[[ or \\]] for literal brackets")
    literal.append(text[i])
    i += 1
  if literal:
    pieces.append("".join(literal))
  return pieces


def parse_prompt(text: str, tokenizer, length: int,
                 key: str = "config.sample.prompt") -> tuple[np.ndarray, np.ndarray]:
  """Prompt text -> (tokens [L], known [L]).

  Plain text is a prefix: the rest of the sequence is generated. `[[N]]` inserts N
  positions to generate (infilling), e.g. "To be, or not[[12]]the question". Text
  after the last gap is known; the positions after it, up to L, are generated.
  `\\[[` and `\\]]` are literal brackets; any other `[[`/`]]` is an error (split_prompt).
  """
  tokens = np.zeros(length, np.int32)
  known = np.zeros(length, bool)
  tokens[0], known[0] = tokenizer.bos_id, True
  cursor = 1
  for piece in split_prompt(text, key):
    if isinstance(piece, int):
      cursor += piece
      continue
    ids = tokenizer.encode(piece)
    if cursor + len(ids) > length:
      raise ValueError(f"{key}: prompt needs {cursor + len(ids)} positions, "
                       f"more than config.data.seq_len={length}")
    tokens[cursor:cursor + len(ids)] = ids
    known[cursor:cursor + len(ids)] = True
    cursor += len(ids)
  if cursor > length:
    raise ValueError(f"{key}: gaps reach position {cursor}, beyond "
                     f"config.data.seq_len={length}")
  return tokens, known


def make_prompt(texts: Sequence[str], batch: int, tokenizer, length: int) -> Prompt:
  """Cycles over `texts` to fill a batch (an empty list gives unconditional samples)."""
  if not texts:
    return unconditional_prompt(batch, length, tokenizer.bos_id)
  parsed = [parse_prompt(t, tokenizer, length) for t in texts]
  rows = [parsed[i % len(parsed)] for i in range(batch)]
  return Prompt(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))


# ----------------------------------------------------------------------------
# Categorical sampling.
# ----------------------------------------------------------------------------

def filtered_log_probs(logits, mask_id: int, *, top_p: float = 1.0, temperature: float = 1.0):
  """log-softmax after logit[MASK] = -inf, temperature and nucleus (top-p) filtering.

  temperature=0 is greedy: all the mass on the most likely token (ties share it), so a
  Gumbel-max draw returns the argmax. top_p must be in (0, 1] (core.config_lib.validate_sample).
  """
  logits = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  if temperature == 0.0:
    best = jnp.max(logits, axis=-1, keepdims=True)
    logits = jnp.where(logits >= best, 0.0, -jnp.inf)
  elif temperature != 1.0:
    logits = logits / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  if top_p < 1.0:
    sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jnp.exp(sorted_logp), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    keep_sorted = (cum - jnp.exp(sorted_logp)) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logp, jnp.inf), axis=-1, keepdims=True)
    logp = jax.nn.log_softmax(jnp.where(logp >= threshold, logp, -jnp.inf), axis=-1)
  return logp


def keyed_gumbel_argmax(key, logp_BxQxV, seq_ids_B, positions_BxQ):
  """Gumbel-max draw whose noise depends only on (key, sequence id, position)."""
  vocab = logp_BxQxV.shape[-1]

  def one(seq, pos):
    k = jax.random.fold_in(jax.random.fold_in(key, seq), pos)
    return jax.random.gumbel(k, (vocab,), jnp.float32)

  noise = jax.vmap(lambda s, ps: jax.vmap(lambda p: one(s, p))(ps))(seq_ids_B, positions_BxQ)
  return jnp.argmax(logp_BxQxV + noise, axis=-1).astype(jnp.int32)


def keyed_gumbel(key, seq_ids_B, positions_BxQ):
  """One standard Gumbel draw per (sequence id, position), float32 [B, Q]; like
  `keyed_gumbel_argmax`, it does not depend on where the position sits in the batch."""
  def one(seq, pos):
    return jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(key, seq), pos), (),
                             jnp.float32)

  return jax.vmap(lambda s, ps: jax.vmap(lambda p: one(s, p))(ps))(seq_ids_B, positions_BxQ)


# ----------------------------------------------------------------------------
# Confidence-threshold decoding (Fast-dLLM's threshold rule), shared by its samplers.
# ----------------------------------------------------------------------------

THRESHOLD_SAMPLER = "confidence-threshold"


def threshold_log_probs(logits, mask_id: int, *, top_p: float = 1.0, temperature: float = 1.0):
  """(logp, confidence_logp) of a confidence-threshold step: the draw's filtered log-probs
  (`filtered_log_probs`) and those its confidence is read from.

  They are the same array, except at temperature 0: there the filtered distribution puts
  all its mass on the argmax, every confidence would be 1 and every position would be
  revealed in the first pass. Greedy threshold decoding (Fast-dLLM's) draws the argmax and
  scores it by its probability at temperature 1 (top_p filtered), as here.
  """
  logp = filtered_log_probs(logits, mask_id, top_p=top_p, temperature=temperature)
  if temperature != 0.0:
    return logp, logp
  return logp, filtered_log_probs(logits, mask_id, top_p=top_p, temperature=1.0)


def threshold_reveal(logp_BxQxV, candidate_BxQ, key, rows, positions, threshold, force_all,
                     confidence_logp_BxQxV=None):
  """One step of confidence-threshold decoding: which candidates to reveal, with what.

  logp_BxQxV:     float32 filtered log-probs at each query slot (`threshold_log_probs`);
  candidate_BxQ:  bool, the slots that hold a still-unknown position (others: padding);
  key, rows [B], positions [B, Q]: the draw at slot (b, q) is the Gumbel-max draw keyed by
                  (key, rows[b], positions[b, q]) (`keyed_gumbel_argmax`), so it does not
                  depend on the slot layout (the efficient and full-length executions agree);
  threshold:      float in [0, 1] (may be traced);
  force_all:      bool, scalar or [B] (may be traced): reveal every candidate of the row
                  (the step cap's last step);
  confidence_logp_BxQxV: where the confidence is read (default `logp_BxQxV`).
  The confidence of a draw is its probability. A candidate is revealed iff its confidence
  is >= threshold, or force_all, or it is the row's most confident candidate (ties: the
  lowest position), so every row that has a candidate reveals at least one.
  Returns (draw int32 [B, Q], reveal bool [B, Q]); reveal is False off the candidates.
  """
  draw = keyed_gumbel_argmax(key, logp_BxQxV, rows, positions)
  conf_logp = logp_BxQxV if confidence_logp_BxQxV is None else confidence_logp_BxQxV
  conf = jnp.exp(jnp.take_along_axis(conf_logp, draw[..., None], axis=-1)[..., 0])
  conf = jnp.where(candidate_BxQ, conf, -1.0)
  best = jnp.max(conf, axis=1, keepdims=True)
  at_best = candidate_BxQ & (conf == best)
  first = jnp.min(jnp.where(at_best, positions, jnp.iinfo(jnp.int32).max), axis=1,
                  keepdims=True)
  force = jnp.asarray(force_all, bool)
  force = force[:, None] if force.ndim == 1 else force
  reveal = candidate_BxQ & ((conf >= threshold) | force | (at_best & (positions == first)))
  return draw, reveal


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedCanvas:
  """State of the efficient samplers that reveal a data-dependent set of positions each
  step (the image samplers, the PGM's confidence-threshold): the canvas, its known tokens
  packed first (what the encoder reads) and the still-unknown positions in reveal order."""
  canvas: jax.Array     # [B, L] tokens; MASK where unknown
  clean_tok: jax.Array  # [B, L] packed known tokens (first clean_len valid)
  clean_pos: jax.Array  # [B, L] their positions
  clean_len: jax.Array  # [B]
  rem_pos: jax.Array    # [B, L] unknown positions, in reveal order (first rem_len valid)
  rem_len: jax.Array    # [B]


def reveal_packed(st: PackedCanvas, q_pos, draw, selected) -> PackedCanvas:
  """Writes the selected draws into the canvas, appends them to the packed known tokens and
  removes them from the unknown positions (the others keep their order)."""
  batch, length = st.canvas.shape
  n_query = q_pos.shape[1]
  rows = jnp.arange(batch)[:, None]
  sel = selected.astype(jnp.int32)
  n_sel = sel.sum(axis=1)
  canvas = st.canvas.at[rows, jnp.where(selected, q_pos, length)].set(draw, mode="drop")
  write = jnp.where(selected, st.clean_len[:, None] + jnp.cumsum(sel, axis=1) - 1, length)
  clean_tok = st.clean_tok.at[rows, write].set(draw, mode="drop")
  clean_pos = st.clean_pos.at[rows, write].set(q_pos, mode="drop")
  sel_full = jnp.pad(selected, ((0, 0), (0, length - n_query)))
  keep = (jnp.arange(length)[None, :] < st.rem_len[:, None]) & ~sel_full
  perm = jnp.argsort(~keep, axis=1, stable=True)
  return PackedCanvas(canvas=canvas, clean_tok=clean_tok, clean_pos=clean_pos,
                      clean_len=st.clean_len + n_sel,
                      rem_pos=jnp.take_along_axis(st.rem_pos, perm, axis=1),
                      rem_len=st.rem_len - n_sel)


def round_up(n: int, multiple: int, cap: int) -> int:
  """n rounded up to a multiple, at most cap (the samplers' shape buckets)."""
  return min(cap, -(-n // multiple) * multiple)


def check_threshold(threshold, key: str = "config.sample.threshold") -> float:
  """`threshold` as a float, or a one-line error naming `key` unless it is a finite
  number in [0, 1]."""
  ok = isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(
      threshold, bool)
  if not (ok and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
    raise ValueError(f"{key}={threshold!r} must be a finite number in [0, 1] (the "
                     f"{THRESHOLD_SAMPLER} sampler reveals every position whose draw has at "
                     f"least this probability; 0 reveals everything in one pass)")
  return float(threshold)


# ----------------------------------------------------------------------------
# Devices, results, cost.
# ----------------------------------------------------------------------------

def params_mesh(params):
  """The device mesh the params are sharded over, or None (e.g. a plain single-device array)."""
  shard = getattr(jax.tree.leaves(params)[0], "sharding", None)
  return shard.mesh if isinstance(shard, jax.sharding.NamedSharding) else None


def device_put_fn(params, batch: Optional[int] = None) -> Callable:
  """How the samplers put host values (numpy arrays, keys) on devices.

  One device: `jnp.asarray`. On a mesh (several devices or processes) sampling is
  data-parallel: an array whose leading dimension is the `batch` is sharded over the mesh's
  batch axes (`data`, `fsdp`) when their size divides it, so each device samples its own
  rows; everything else (keys, per-step scalars) and a batch they do not divide is
  replicated. Every process computes the same host values and takes its devices' rows, so
  no program mixes host-local and global inputs. Draws are keyed per sequence and
  position, so the samples do not depend on the split."""
  mesh = params_mesh(params)
  if mesh is None or (mesh.size == 1 and jax.process_count() == 1):
    return jnp.asarray
  rows = None
  if batch and batch % sharding.data_parallel_size(mesh) == 0:
    rows = sharding.batch_sharding(mesh)
  elif batch and sharding.data_parallel_size(mesh) > 1:
    _warn_replicated(batch, sharding.data_parallel_size(mesh))

  def put(x):
    if rows is not None and np.ndim(x) >= 1 and np.shape(x)[0] == batch and not (
        isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
      return sharding.put_sharded(x, rows)
    return sharding.put_replicated(x, mesh)

  return put


_WARNED_BATCHES = set()


def _warn_replicated(batch: int, data_parallel: int) -> None:
  if (batch, data_parallel) not in _WARNED_BATCHES:
    _WARNED_BATCHES.add((batch, data_parallel))
    logging.warning("sampling batch of %d is not a multiple of the %d data-parallel devices "
                    "(config.sample.batch_size): every device samples the whole batch",
                    batch, data_parallel)


def params_mesh_context(params):
  """The params' device mesh as the abstract mesh while the sampler programs are traced
  (when they span several devices), so that the attention op wraps its Pallas kernels in
  `jax.shard_map`: Mosaic compiles a kernel in a multi-device program only that way.
  A no-op for single-device params (and on CPU, where attention is dense XLA)."""
  mesh = params_mesh(params)
  if mesh is None or mesh.size == 1:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


@dataclasses.dataclass
class SampleResult:
  tokens: np.ndarray                  # int32 [B, L]
  sampler: str
  steps: int                          # requested steps S
  passes: int                         # network passes actually run
  compiles: int                       # programs traced during this run
  flops_per_seq: Optional[float] = None        # XLA cost analysis, as executed
  exact_flops_per_seq: Optional[float] = None  # same, without any padding
  seconds: float = 0.0
  lengths: Optional[np.ndarray] = None         # int [B]: tokens to keep (variable length)
  # int [B]: the passes run until each sequence was complete (confidence-threshold, where
  # sequences finish at different steps); None: every sequence took all `passes`.
  seq_passes: Optional[np.ndarray] = None

  def passes_per_sequence(self) -> np.ndarray:
    """int [B]: `seq_passes`, or `passes` for every sequence."""
    if self.seq_passes is not None:
      return np.asarray(self.seq_passes)
    return np.full((len(self.tokens),), self.passes, np.int64)


def measure_sampler(run: Callable[[bool], "SampleResult"], *, warmup: int, repeats: int,
                    flops_only: bool):
  """The benches' timing rule. `run(measure)` samples once (measure=True: also lowers for
  FLOPs). Returns (the first result, the median of `repeats` timed runs after `warmup` runs
  in all, or None when flops_only)."""
  first = run(True)
  if flops_only:
    return first, None
  for _ in range(max(warmup - 1, 0)):
    run(False)
  return first, statistics.median(run(False).seconds for _ in range(repeats))


def lowered_flops(jitted, *args, **static) -> float:
  return float(jitted.lower(*args, **static).cost_analysis().get("flops", 0.0))
