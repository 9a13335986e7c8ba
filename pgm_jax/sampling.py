"""Samplers for PGM and MDLM (spec sections 1 and 5), compiled a bounded number of times.

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

Compilation. The efficient encoder's input grows every step. We pad it to the next
multiple of `bucket_size` tokens and hide the padding with a valid-length mask. The
query count is padded the same way: exactly for the uniform schedule, to a power of
two otherwise. So a whole run compiles at most (L / bucket_size) x (#query sizes)
programs, however many steps it takes. Padding costs a few percent of the FLOPs (XLA
cost analysis; see `bench.py`).

MDLM. `ddpm` runs the denoiser every step. `ddpm_cache` reuses the previous step's
p(x0) when nothing changed (no time conditioning). Both take S ancestral steps on
linspace(1, eps, S+1) and then a final reveal step. The whole run is one
`lax.fori_loop` program, and the number of denoiser passes is counted on device.

Categorical draws are Gumbel-max in log space and in float32. This is the same
exponential race the reference runs in float64, argmax(p / E) = argmax(log p - log E),
written in log space so that small probabilities do not underflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pgm_jax import objectives, sharding
from pgm_jax.ops import AttentionMask

PGM_SAMPLERS = ("efficient-uniform", "efficient-non-uniform", "naive")
MDLM_SAMPLERS = ("ddpm_cache", "ddpm")
AR_SAMPLERS = ("ar",)
SCHEDULES = ("uniform", "binomial", "ancestral")

# Trace counters (one increment per compilation of a sampler program).
TRACE_COUNTS = {"pgm_efficient": 0, "pgm_naive": 0, "mdlm": 0, "ar": 0}


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


def parse_prompt(text: str, tokenizer, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompt text -> (tokens [L], known [L]).

  Plain text is a prefix: the rest of the sequence is generated. `[[N]]` inserts N
  positions to generate (infilling), e.g. "To be, or not[[12]]the question". Text
  after the last gap is known; the positions after it, up to L, are generated.
  """
  import re  # pylint: disable=g-import-not-at-top
  tokens = np.zeros(length, np.int32)
  known = np.zeros(length, bool)
  tokens[0], known[0] = tokenizer.bos_id, True
  cursor = 1
  for piece in re.split(r"(\[\[\d+\]\])", text):
    if not piece:
      continue
    gap = re.fullmatch(r"\[\[(\d+)\]\]", piece)
    if gap:
      cursor += int(gap.group(1))
      continue
    ids = tokenizer.encode(piece)
    if cursor + len(ids) > length:
      raise ValueError(f"config.sample.prompt: prompt needs {cursor + len(ids)} positions, "
                       f"more than config.data.seq_len={length}")
    tokens[cursor:cursor + len(ids)] = ids
    known[cursor:cursor + len(ids)] = True
    cursor += len(ids)
  if cursor > length:
    raise ValueError(f"config.sample.prompt: gaps reach position {cursor}, beyond "
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
  """log-softmax after logit[MASK] = -inf, temperature and nucleus (top-p) filtering."""
  logits = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  if temperature != 1.0:
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


def _round_up(n: int, multiple: int, cap: int) -> int:
  return min(cap, -(-n // multiple) * multiple)


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


def _params_mesh(params):
  """The device mesh the params are sharded over, or None (e.g. a plain single-device array)."""
  shard = getattr(jax.tree.leaves(params)[0], "sharding", None)
  return shard.mesh if isinstance(shard, jax.sharding.NamedSharding) else None


def _device_put_fn(params) -> Callable:
  """How the samplers put host values (numpy arrays, keys) on devices: `jnp.asarray` on one
  process; with several, global arrays replicated over the params' mesh (every process
  computes the same host values), so no program mixes host-local and global inputs."""
  mesh = _params_mesh(params)
  if jax.process_count() == 1 or mesh is None:
    return jnp.asarray
  return lambda x: sharding.put_replicated(x, mesh)


def params_mesh_context(params):
  """The params' device mesh as the abstract mesh while the sampler programs are traced
  (when they span several devices), so that the attention op wraps its Pallas kernels in
  `jax.shard_map`: Mosaic compiles a kernel in a multi-device program only that way.
  A no-op for single-device params (and on CPU, where attention is dense XLA)."""
  mesh = _params_mesh(params)
  if mesh is None or mesh.size == 1:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _initial_state(prompt: Prompt, order: np.ndarray, mask_id: int,
                   put: Callable = jnp.asarray) -> PGMState:
  batch, length = prompt.known.shape
  clean_tok = np.zeros((batch, length), np.int32)
  clean_pos = np.zeros((batch, length), np.int32)
  for b in range(batch):
    pos = np.flatnonzero(prompt.known[b])
    clean_tok[b, :len(pos)] = prompt.tokens[b, pos]
    clean_pos[b, :len(pos)] = pos
  canvas = np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32)
  return PGMState(canvas=put(canvas), clean_tok=put(clean_tok), clean_pos=put(clean_pos),
                  clean_len=put(prompt.known.sum(1).astype(np.int32)),
                  order=put(np.asarray(order, np.int32)),
                  cursor=put(np.zeros((batch,), np.int32)))


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
               progress: Optional[Callable[[int, int], None]] = None) -> SampleResult:
  """Runs a PGM sampler (see module docstring). Returns tokens and accounting."""
  if sampler not in PGM_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {PGM_SAMPLERS} for a PGM, "
                     f"got {sampler!r}")
  batch, length = prompt.known.shape
  bucket = bucket_size or max(8, length // 16)
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


def _flops(jitted, *args, **static) -> float:
  return float(jitted.lower(*args, **static).cost_analysis().get("flops", 0.0))


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
  put = _device_put_fn(params)
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
    n_enc = _round_up(int(clean_len.max()), bucket, length)
    n_query = max_count if uniform else _pow2(max_count, length)
    static = dict(model=model, n_enc=n_enc, n_query=n_query, mask_id=mask_id, top_p=top_p,
                  temperature=temperature)
    counts_dev = put(counts_k)
    step_key = jax.random.fold_in(key, k)
    if measure_flops:
      if (n_enc, n_query) not in cost_cache:
        cost_cache[(n_enc, n_query)] = _flops(_pgm_efficient_step_jit, params, st, counts_dev,
                                              step_key, **static)
      flops += cost_cache[(n_enc, n_query)]
    if exact_flops:
      if max_count not in exact_cost:
        lower_at = lambda n, m=max_count: _flops(
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
  put = _device_put_fn(params)
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
        per_step = _flops(_pgm_naive_step_jit, params, canvas, ranks_dev, cursor, counts_dev,
                          step_key, **static)
      flops += per_step
    canvas, cursor = _pgm_naive_step_jit(params, canvas, ranks_dev, cursor, counts_dev,
                                         step_key, **static)
    passes += 1
    if progress is not None:
      progress(k + 1, len(counts))
  return sharding.host_value(canvas), flops, None, passes


# ----------------------------------------------------------------------------
# MDLM: ancestral sampling with an optional p(x0) cache.
# ----------------------------------------------------------------------------

def _mdlm_logits(params, x, *, model):
  """The denoiser's logits in the model's compute dtype: that is the dtype they are
  computed in (the output projection runs in it), so the cast loses nothing, and the
  `ddpm_cache` cache is half the size of a float32 one (3.3 GB instead of 6.6 GB at
  B 32, L 1024, V 50258)."""
  logits = model.apply({"params": params}, x, train=False)
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
  denoise = lambda x: _mdlm_logits(params, x, model=model)
  update = lambda x, logits, k, p: _mdlm_update(x, logits, key, k, p, mask_id=mask_id,
                                                top_p=top_p, temperature=temperature)

  def body(k, carry):
    x, logits_cache, fresh, passes = carry
    recompute = jnp.logical_or(~fresh, not cache)
    logits = jax.lax.cond(recompute, denoise, lambda _: logits_cache, x)
    t, s = timesteps[k], timesteps[k + 1]
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
  logits = jax.lax.cond(recompute, denoise, lambda _: logits_cache, x)
  x = update(x, logits, steps, 1.0)
  return x, passes + recompute.astype(jnp.int32)


_mdlm_run_jit = jax.jit(_mdlm_run, static_argnames=("model", "steps", "cache", "mask_id", "eps",
                                                     "top_p", "temperature"))
_mdlm_update_jit = jax.jit(_mdlm_update, static_argnames=("mask_id", "top_p", "temperature"))
_mdlm_logits_jit = jax.jit(_mdlm_logits, static_argnames=("model",))


def mdlm_sample(params, prompt: Prompt, *, model, sampler: str, steps: int, seed: int,
                mask_id: int, top_p: float = 1.0, temperature: float = 1.0, eps: float = 1e-5,
                measure_flops: bool = False, execute: bool = True) -> SampleResult:
  """MDLM `ddpm` / `ddpm_cache`; known prompt tokens start unmasked and never change.

  With execute=False nothing runs: the pass count comes from `mdlm_passes` (the
  reveal process alone) and FLOPs from lowering, so paper-size costs can be
  computed on a CPU.
  """
  if sampler not in MDLM_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {MDLM_SAMPLERS} for MDLM, "
                     f"got {sampler!r}")
  batch = prompt.known.shape[0]
  put = _device_put_fn(params)
  x0 = put(np.where(prompt.known, prompt.tokens, mask_id).astype(np.int32))
  traces_before = TRACE_COUNTS["mdlm"]
  static = dict(model=model, steps=steps, cache=sampler == "ddpm_cache", mask_id=mask_id,
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
    pass_flops = _flops(_mdlm_logits_jit, params, x0, model=model)
    vocab = model.config.vocab_size
    logits = jax.ShapeDtypeStruct((1,) + x0.shape[1:] + (vocab,), model.config.compute_dtype)
    # The update loops over sequences and XLA costs a loop body once: cost one sequence.
    update_flops = batch * _flops(_mdlm_update_jit, x0[:1], logits, jax.random.key(seed), 0,
                                  0.5, mask_id=mask_id, top_p=top_p, temperature=temperature)
    flops = (int(passes) * pass_flops + (steps + 1) * update_flops) / batch
  return SampleResult(tokens=np.asarray(tokens), sampler=sampler, steps=steps,
                      passes=int(passes), compiles=TRACE_COUNTS["mdlm"] - traces_before,
                      flops_per_seq=flops, seconds=seconds)


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


# ----------------------------------------------------------------------------
# AR baseline: left to right with a KV cache.
# ----------------------------------------------------------------------------

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


def ar_sample(params, prompt: Prompt, *, model, sampler: str = "ar", steps: int = 0,
              seed: int, mask_id: int, top_p: float = 1.0, temperature: float = 1.0
              ) -> SampleResult:
  """Left-to-right sampling with a KV cache: L-1 single-token passes, one program.

  Known prompt tokens are kept (a left-to-right model conditions on the known tokens
  before each position; later known tokens are not seen when earlier ones are drawn).
  `steps` is ignored (an AR model takes one step per token).
  """
  if sampler not in AR_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {AR_SAMPLERS} for the AR "
                     f"baseline, got {sampler!r}")
  batch, length = prompt.known.shape
  put = _device_put_fn(params)
  x0 = put(np.where(prompt.known, prompt.tokens, 0).astype(np.int32))
  before = TRACE_COUNTS["ar"]
  start = time.perf_counter()
  with params_mesh_context(params):
    x = _ar_run_jit(params, x0, put(prompt.known), put(jax.random.key(seed)), model=model,
                    mask_id=mask_id, top_p=top_p, temperature=temperature)
  tokens = sharding.host_value(x)
  return SampleResult(tokens=tokens, sampler=sampler, steps=length - 1, passes=length - 1,
                      compiles=TRACE_COUNTS["ar"] - before,
                      seconds=time.perf_counter() - start)


__all__ = ["PGM_SAMPLERS", "AR_SAMPLERS", "ar_sample", "MDLM_SAMPLERS", "Prompt", "SampleResult", "make_prompt",
           "parse_prompt", "unconditional_prompt", "pgm_sample", "mdlm_sample",
           "make_schedule", "random_orders", "filtered_log_probs", "mdlm_passes",
           "TRACE_COUNTS"]
