"""Image samplers (method §7): Halton and confidence, for the PGM image model and MaskGIT,
with classifier-free guidance.

An image sampler is "an order + a count schedule + a selection rule + an execution". Token
position p >= 1 is grid cell p - 1 (row-major); position 0 is BOS.
  * halton:     the fixed 2D Halton order of the grid (bases 2 and 3). Step k reveals the
                next r_k - r_{k-1} positions of that order, with the cumulative count
                r_k = max(k + 1, floor(N (1 - arccos((k + 1) / S) / (pi / 2)))).
                Logits x temperature_k = linspace(temperature_min, temperature, S)[k],
                x 0.5 on step 0.
  * confidence: step k draws a token at EVERY unknown position, scores it by
                log p(token) + r_temp (1 - k / (S - 1)) Gumbel noise and keeps the best n_k;
                the cumulative count max(k + 1, floor(N (1 - arccos(k / (S - 1)) / (pi / 2))))
                reveals 1 token on step 0 and all that remain on step S - 1. Logits x
                temperature.
  * execution:  "efficient" (PGM): the encoder runs on the packed known tokens only; the
                decoder queries the new positions (halton) or every unknown position
                (confidence: it needs all their confidences). "full": the model runs on the
                whole grid, MASK at the unknown positions (MaskGIT; for the PGM, the training
                layout with the unknown positions as group 1: the oracle that the efficient
                execution is tested against).
Classifier-free guidance: logits = (1 + w_k) cond - w_k uncond with w_k = w k / (S - 1),
from one doubled batch whose second half has the null class. MASK and BOS are never drawn.
Draws are keyed by (step, sequence, position), so both executions give the same tokens for
the same model, order and key (tests check this token for token).

Reference compatibility (`reference_compat`, config.sample.reference_compat; off by
default; docs/images.md "Reproducing the authors' published numbers"): two behaviours of the
authors' samplers (jdeschena/pgm, branch image_pretrain) that ours do not share, on request:
  * "registers_count" (efficient execution, the PGM): their samplers pass the model the count
                of known tokens (`concrete_lengths`: BOS + known codes) as the valid-key count
                of the encoder, after the group-0 registers were put in front of the keys, so
                the last register // 2 known codes (the most recently revealed) are padding in
                every step. Ours counts the registers too (the training layout).
  * "halton_redraw" (halton, full execution, MaskGIT): their MaskGIT Halton sampler writes the
                step's draw at every position of the first r_k of the order
                (`code[mask] = pred_code[mask]`), so the codes revealed earlier are drawn
                again from the model's output at their (unmasked) positions at every step.
                Ours keeps revealed codes fixed.

Compilation: as the text PGM sampler (samplers/pgm.py), the efficient encoder length and
query count are padded to multiples of `bucket_size` (default max(8, L / 16)); along a run
the first only grows and (confidence) the second only shrinks, so a run compiles at most
about 2 L / bucket_size programs whatever S is. The full execution compiles one program.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgm_jax.core import sharding
from pgm_jax.ops import AttentionMask
from pgm_jax.samplers.common import (TRACE_COUNTS, PackedCanvas, SampleResult, device_put_fn,
                                     keyed_gumbel, keyed_gumbel_argmax, lowered_flops,
                                     params_mesh_context, reveal_packed, round_up)

IMAGE_SAMPLERS = ("halton", "confidence")
EXECUTIONS = ("efficient", "full")
REFERENCE_QUIRKS = ("registers_count", "halton_redraw")


# ----------------------------------------------------------------------------
# Orders, schedules and per-step scalars (host side: they fix the program shapes).
# ----------------------------------------------------------------------------

# Not scipy.stats.qmc.Halton(d=2, scramble=False) (+ fast_forward(1) for the origin): it sums
# digit * base^-k in floats, so base-3 points can be 1 ulp off (point 5: 0.7777777777777777,
# not 7/9 = 0.7777777777777778) and floor(point * grid) then moves cells for grids divisible
# by 9. This is the authors' generator (Halton-MaskGIT's build_halton_mask): exact num / den.
def halton_sequence(base: int, n: int) -> np.ndarray:
  """Points 1..n of the van der Corput sequence in `base` (the origin, point 0, skipped: 1/base
  first), each num / den correctly rounded, as the reference's iterative generator."""
  out = np.empty(n, np.float64)
  num, den = 0, 1
  for i in range(n):
    x = den - num
    if x == 1:
      num, den = 1, den * base
    else:
      y = den // base
      while x <= y:
        y //= base
      num = (base + 1) * y - x
    out[i] = num / den
  return out


def halton_order(grid: int) -> np.ndarray:
  """Grid cells (row * grid + col) in the 2D Halton order: rows from base 2, columns from
  base 3, floor(point * grid), each cell at its first occurrence. int32 [grid^2]."""
  n_points = 10_000
  while True:
    rows = np.floor(halton_sequence(2, n_points) * grid).astype(np.int64)
    cols = np.floor(halton_sequence(3, n_points) * grid).astype(np.int64)
    cells = rows * grid + cols
    _, first = np.unique(cells, return_index=True)
    if len(first) == grid * grid:
      return cells[np.sort(first)].astype(np.int32)
    n_points *= 4


def _check_steps(steps: int, num_codes: int):
  if not 1 <= steps <= num_codes:
    raise ValueError(f"config.sample.steps={steps} must be in [1, {num_codes}] (the number of "
                     "codes per image)")


def halton_counts(num_codes: int, steps: int) -> np.ndarray:
  """Codes revealed per step: diff of r_k = max(k+1, floor(N (1 - arccos((k+1)/S)/(pi/2))))."""
  _check_steps(steps, num_codes)
  k = np.arange(steps)
  cum = np.floor(num_codes * (1.0 - np.arccos((k + 1) / steps) / (np.pi / 2)))
  cum = np.maximum(k + 1, cum.astype(np.int64))
  cum[-1] = num_codes  # arccos(1) = 0: all of them (guards the float rounding)
  return np.diff(np.concatenate([[0], cum])).astype(np.int32)


def confidence_counts(num_codes: int, steps: int) -> np.ndarray:
  """Codes revealed per step: diff of max(k+1, floor(N (1 - arccos(k/(S-1))/(pi/2)))),
  so 1 on step 0 and all that remain on step S - 1."""
  _check_steps(steps, num_codes)
  if steps == 1:
    return np.asarray([num_codes], np.int32)
  k = np.arange(steps)
  cum = np.floor(num_codes * (1.0 - np.arccos(k / (steps - 1)) / (np.pi / 2)))
  cum = np.maximum(k + 1, cum.astype(np.int64))
  cum[-1] = num_codes
  return np.diff(np.concatenate([[0], cum])).astype(np.int32)


def cfg_weights(w: float, steps: int) -> np.ndarray:
  """w_k = w k / (S - 1) (0 when S = 1)."""
  return np.asarray([w * k / max(steps - 1, 1) for k in range(steps)], np.float32)


def cfg_logits(cond, uncond, w_k):
  """Classifier-free guidance: (1 + w_k) cond - w_k uncond."""
  return (1.0 + w_k) * cond - w_k * uncond


def halton_temperatures(t_min: float, t_max: float, steps: int) -> np.ndarray:
  """linspace(t_min, t_max, S), halved on step 0 (the reference's temp_warmup = 1)."""
  temps = np.linspace(t_min, t_max, steps).astype(np.float32)
  temps[0] *= 0.5
  return temps


def confidence_noise(r_temp: float, steps: int) -> np.ndarray:
  """Scale of the Gumbel noise on log-confidence: r_temp (1 - k / (S - 1))."""
  return np.asarray([r_temp * (1.0 - k / max(steps - 1, 1)) for k in range(steps)], np.float32)


def parse_reference_compat(value, available: tuple[str, ...] = REFERENCE_QUIRKS
                           ) -> tuple[str, ...]:
  """config.sample.reference_compat -> the quirk names, in REFERENCE_QUIRKS order.

  "" / "none" / False: none (the default); "all" / True: every quirk in `available` (the
  model family's); otherwise comma-separated names (or a tuple / list of them), each one of
  `available`."""
  key = "config.sample.reference_compat"
  if value is None or value is False or (isinstance(value, str) and
                                         value.strip().lower() in ("", "none")):
    return ()
  if value is True or (isinstance(value, str) and value.strip().lower() == "all"):
    return tuple(q for q in REFERENCE_QUIRKS if q in available)
  if isinstance(value, str):
    names = [n.strip() for n in value.split(",") if n.strip()]
  elif isinstance(value, (tuple, list)):
    names = [str(n).strip() for n in value]
  else:
    raise ValueError(f"{key}={value!r} must be a string: '' (none), 'all' or comma-separated "
                     f"names from {REFERENCE_QUIRKS}")
  for name in names:
    if name not in REFERENCE_QUIRKS:
      raise ValueError(f"{key}: unknown quirk {name!r}; choose from {REFERENCE_QUIRKS}, "
                       "'all' or '' (none)")
    if name not in available:
      raise ValueError(f"{key}: {name!r} is not a behaviour of this model's reference "
                       f"sampler (this family has {available or 'none'})")
  return tuple(q for q in REFERENCE_QUIRKS if q in names)


def check_reference_compat(quirks: tuple[str, ...], sampler: str, execution: str) -> None:
  """Each quirk applies to one sampler / execution (module docstring)."""
  key = "config.sample.reference_compat"
  for name in quirks:
    if name not in REFERENCE_QUIRKS:
      raise ValueError(f"{key}: unknown quirk {name!r}; choose from {REFERENCE_QUIRKS}")
  if "registers_count" in quirks and execution != "efficient":
    raise ValueError(f"{key}: 'registers_count' is a behaviour of the efficient (packed) "
                     f"execution, not of {execution!r}")
  if "halton_redraw" in quirks and (sampler != "halton" or execution != "full"):
    raise ValueError(f"{key}: 'halton_redraw' is a behaviour of the halton sampler's full "
                     f"execution (MaskGIT), not of {sampler!r} / {execution!r}")


def default_bucket(length: int) -> int:
  """The bucket of config.sample.bucket_size = 0: max(8, L / 16)."""
  return max(8, length // 16)


def step_shapes(sampler: str, grid: int, steps: int, *, execution: str,
                bucket_size: int = 0) -> list[tuple[int, int]]:
  """(n_enc, n_query) of every step a run executes (steps that reveal nothing are
  skipped): the efficient execution's packed encoder length and query count, padded to
  `bucket_size` (0: `default_bucket`); the full execution's (0, L) at every step. These
  are the static shapes of the step programs (`image_sample` compiles one per pair)."""
  n = grid * grid
  length = n + 1
  counts = halton_counts(n, steps) if sampler == "halton" else confidence_counts(n, steps)
  bucket = bucket_size or default_bucket(length)
  shapes, revealed = [], 0
  for count in (int(c) for c in counts):
    if count == 0:
      continue
    if execution == "efficient":
      shapes.append((round_up(1 + revealed, bucket, length),
                     round_up(count if sampler == "halton" else n - revealed, bucket, length)))
    else:
      shapes.append((0, length))
    revealed += count
  return shapes


# ----------------------------------------------------------------------------
# One step (jitted; bounded number of programs).
# ----------------------------------------------------------------------------

ImageState = PackedCanvas  # the efficient image samplers' state (samplers.common)


def _query_logits(params, st: ImageState, labels_B, q_pos_BxQ, w_k, *, model,
                  execution: str, n_enc: int, cfg: bool, mask_id: int, null_class: int,
                  registers_count: bool = False):
  """Float32 logits [B, Q, V] at the query positions, guidance applied."""
  batch = labels_B.shape[0]
  if cfg:
    labels = jnp.concatenate([labels_B, jnp.full_like(labels_B, null_class)])
    dbl = lambda x: jnp.concatenate([x, x], axis=0)
  else:
    labels, dbl = labels_B, (lambda x: x)
  q_pos = dbl(q_pos_BxQ)
  if execution == "efficient":
    mask = AttentionMask.packed(dbl(st.clean_len), n_enc)
    extra = {"registers_in_count": True} if registers_count else {}
    logits = model.apply({"params": params}, dbl(st.clean_tok[:, :n_enc]),
                         dbl(st.clean_pos[:, :n_enc]), mask, q_pos, labels, method="infer",
                         **extra)
  else:  # the whole canvas: the model's own full-length pass (`canvas_logits`)
    full = model.apply({"params": params}, dbl(st.canvas), labels, method="canvas_logits")
    logits = jnp.take_along_axis(full, q_pos[..., None], axis=1)
  logits = logits.astype(jnp.float32)
  if cfg:
    logits = cfg_logits(logits[:batch], logits[batch:], w_k)
  return logits


def _image_step(params, st: ImageState, labels_B, key, k, count, w_k, temp_k, noise_k, *,
                model, execution: str, sampler: str, n_enc: int, n_query: int,
                cfg: bool, mask_id: int, bos_id: int, null_class: int,
                registers_count: bool = False, redraw: bool = False):
  TRACE_COUNTS["image"] += 1
  batch, length = st.canvas.shape
  j = jnp.arange(n_query)[None, :]
  q_pos = st.rem_pos[:, :n_query]
  q_valid = j < st.rem_len[:, None]
  # halton_redraw: the logits of every position (the revealed ones are drawn again below).
  pos = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length)) if redraw else q_pos
  logits = _query_logits(params, st, labels_B, pos, w_k, model=model,
                         execution=execution, n_enc=n_enc, cfg=cfg, mask_id=mask_id,
                         null_class=null_class, registers_count=registers_count)
  logits = (logits * temp_k).at[..., mask_id].set(-jnp.inf)
  if bos_id < logits.shape[-1]:
    logits = logits.at[..., bos_id].set(-jnp.inf)
  logp = jax.nn.log_softmax(logits, axis=-1)
  step_key = jax.random.fold_in(key, k)
  seq = jnp.arange(batch)
  draw = keyed_gumbel_argmax(jax.random.fold_in(step_key, 0), logp, seq, pos)
  if redraw:  # halton only (check_reference_compat): the new codes, then the old ones again
    redrawn = (st.canvas != mask_id) & (jnp.arange(length)[None, :] > 0)
    draw_all = draw
    draw = jnp.take_along_axis(draw_all, q_pos, axis=1)
    st = reveal_packed(st, q_pos, draw, q_valid & (j < count))
    return dataclasses.replace(st, canvas=jnp.where(redrawn, draw_all, st.canvas))
  if sampler == "halton":  # the first `count` candidates of the Halton order
    selected = q_valid & (j < count)
  else:
    conf = jnp.take_along_axis(logp, draw[..., None], axis=-1)[..., 0]
    conf = conf + noise_k * keyed_gumbel(jax.random.fold_in(step_key, 1), seq, q_pos)
    conf = jnp.where(q_valid, conf, -jnp.inf)
    # Rank by confidence, ties by position: the choice does not depend on the slot order.
    order = jnp.lexsort((q_pos, -conf), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    selected = q_valid & (rank < count)
  return reveal_packed(st, q_pos, draw, selected)


_STATIC = ("model", "execution", "sampler", "n_enc", "n_query", "cfg", "mask_id",
           "bos_id", "null_class", "registers_count", "redraw")
_image_step_jit = jax.jit(_image_step, static_argnames=_STATIC, donate_argnames=("st",))


# ----------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class ImagePlan:
  """Host-side plan of a run: candidate order [B, N] (token positions), counts [S], and the
  per-step guidance weight, temperature and confidence-noise scale [S]."""
  order: np.ndarray
  counts: np.ndarray
  w: np.ndarray
  temperature: np.ndarray
  noise: np.ndarray


def image_plan(sampler: str, batch: int, grid: int, steps: int, *, cfg_w: float = 0.0,
               temperature: float = 1.0, temperature_min: Optional[float] = None,
               r_temp: float = 5.0, order: Optional[np.ndarray] = None) -> ImagePlan:
  if sampler not in IMAGE_SAMPLERS:
    raise ValueError(f"config.sample.sampler must be one of {IMAGE_SAMPLERS} for an image "
                     f"model, got {sampler!r}")
  n = grid * grid
  if sampler == "halton":
    counts = halton_counts(n, steps)
    base = halton_order(grid) + 1
    t_min = temperature if temperature_min is None else temperature_min
    temps = halton_temperatures(t_min, temperature, steps)
    noise = np.zeros(steps, np.float32)
  else:
    counts = confidence_counts(n, steps)
    base = np.arange(1, n + 1, dtype=np.int32)
    temps = np.full(steps, temperature, np.float32)
    noise = confidence_noise(r_temp, steps)
  if order is None:
    order = np.broadcast_to(base, (batch, n))
  order = np.asarray(order, np.int32)
  if order.shape != (batch, n) or not all(sorted(row) == list(range(1, n + 1)) for row in order):
    raise ValueError(f"image sampler order must be [{batch}, {n}] permutations of 1..{n}")
  return ImagePlan(order=order, counts=counts, w=cfg_weights(cfg_w, steps), temperature=temps,
                   noise=noise)


def _initial_state(order: np.ndarray, mask_id: int, bos_id: int, put) -> ImageState:
  batch, n = order.shape
  length = n + 1
  canvas = np.full((batch, length), mask_id, np.int32)
  canvas[:, 0] = bos_id
  clean_tok = np.zeros((batch, length), np.int32)
  clean_tok[:, 0] = bos_id
  rem_pos = np.zeros((batch, length), np.int32)
  rem_pos[:, :n] = order
  return ImageState(canvas=put(canvas), clean_tok=put(clean_tok),
                    clean_pos=put(np.zeros((batch, length), np.int32)),
                    clean_len=put(np.ones((batch,), np.int32)), rem_pos=put(rem_pos),
                    rem_len=put(np.full((batch,), n, np.int32)))


def executions(model) -> tuple[str, ...]:
  """What `model` can run: "efficient" (packed known tokens + queries, `infer`) and/or
  "full" (the whole canvas every step, `canvas_logits`)."""
  return tuple(e for e, method in (("efficient", "infer"), ("full", "canvas_logits"))
               if callable(getattr(type(model), method, None)))


def default_execution(model) -> str:
  return executions(model)[0]


def image_sample(params, labels, *, model, sampler: str, steps: int, seed: int, grid: int,
                 cfg_w: float = 0.0, temperature: float = 1.0,
                 temperature_min: Optional[float] = None, r_temp: float = 5.0,
                 execution: Optional[str] = None, bucket_size: int = 0,
                 order: Optional[np.ndarray] = None, measure_flops: bool = False,
                 execute: bool = True, reference_compat: tuple[str, ...] = (),
                 progress: Optional[Callable[[int, int], None]] = None) -> SampleResult:
  """Class-conditional samples: tokens int32 [B, 1 + grid^2] ([BOS] + codes), one per label.

  `reference_compat`: quirk names of the authors' samplers to reproduce (REFERENCE_QUIRKS,
  module docstring; the family resolves config.sample.reference_compat into them).
  `model.config` gives the kind ("pgm_image" | "maskgit"), MASK, the vocabulary and the null
  class; BOS is the id after MASK. With execute=False nothing runs (FLOPs only, from
  lowering: `measure_flops`).
  """
  cfg = model.config
  available = executions(model)
  if not available:
    raise ValueError(f"image_sample: model kind {cfg.kind!r} is not an image model")
  execution = execution or available[0]
  if execution not in EXECUTIONS or execution not in available:
    raise ValueError(f"image_sample: execution {execution!r} is not available for {cfg.kind}")
  labels = np.asarray(labels, np.int32).reshape(-1)
  batch = len(labels)
  if labels.min(initial=0) < 0 or labels.max(initial=0) > cfg.num_classes:
    raise ValueError(f"image_sample: labels must be in [0, {cfg.num_classes}] "
                     f"(config.model.num_classes; {cfg.num_classes} = the null class)")
  reference_compat = tuple(reference_compat)
  check_reference_compat(reference_compat, sampler, execution)
  plan = image_plan(sampler, batch, grid, steps, cfg_w=cfg_w, temperature=temperature,
                    temperature_min=temperature_min, r_temp=r_temp, order=order)
  mask_id, bos_id = cfg.mask_id, cfg.mask_id + 1
  shapes_of_steps = iter(step_shapes(sampler, grid, steps, execution=execution,
                                     bucket_size=bucket_size))
  put = device_put_fn(params, batch)
  st = _initial_state(plan.order, mask_id, bos_id, put)
  labels_dev, key = put(labels), put(jax.random.key(seed))
  static = dict(model=model, execution=execution, sampler=sampler,
                cfg=bool(cfg_w != 0), mask_id=mask_id, bos_id=bos_id,
                null_class=cfg.num_classes)
  if "registers_count" in reference_compat:  # only when set: the default programs unchanged
    static["registers_count"] = True
  if "halton_redraw" in reference_compat:
    static["redraw"] = True
  traces_before = TRACE_COUNTS["image"]
  flops = 0.0 if measure_flops else None
  cost_cache: dict = {}
  passes = 0
  start = time.perf_counter()
  with params_mesh_context(params):
    for k, count in enumerate(plan.counts):
      count = int(count)
      if count == 0:
        continue
      n_enc, n_query = next(shapes_of_steps)
      shapes = dict(static, n_enc=n_enc, n_query=n_query)
      args = (params, st, labels_dev, key, put(np.int32(k)), put(np.int32(count)),
              put(plan.w[k]), put(plan.temperature[k]), put(plan.noise[k]))
      if measure_flops:
        if (n_enc, n_query) not in cost_cache:
          cost_cache[(n_enc, n_query)] = lowered_flops(_image_step_jit, *args, **shapes)
        flops += cost_cache[(n_enc, n_query)]
      if execute:
        st = _image_step_jit(*args, **shapes)
      passes += 1
      if progress is not None:
        progress(k + 1, len(plan.counts))
    tokens = sharding.host_value(st.canvas)
  seconds = time.perf_counter() - start
  return SampleResult(tokens=tokens, sampler=sampler, steps=steps, passes=passes,
                      compiles=TRACE_COUNTS["image"] - traces_before,
                      flops_per_seq=None if flops is None else flops / batch, seconds=seconds)


def analytic_flops_per_image(model_cfg, sampler: str, grid: int, steps: int, *, step_flops,
                             cfg_w: float = 0.0) -> float:
  """Matmul FLOPs (2 per multiply-add) of one image's run, unpadded (method §5, adapted): the
  sum over the sampler's steps of `step_flops(model_cfg, revealed=, count=, num_codes=,
  sampler=)`, the family's count of one step (`pgm_jax.families.pgm_image` /
  `.maskgit`). Classifier-free guidance doubles every pass. Conditioning (one vector per
  image) and the non-matmul work are left out.
  """
  n_codes = grid * grid
  counts = halton_counts(n_codes, steps) if sampler == "halton" else confidence_counts(n_codes,
                                                                                        steps)
  total, revealed = 0.0, 0
  for count in counts:
    if count == 0:
      continue
    total += step_flops(model_cfg, revealed=revealed, count=int(count), num_codes=n_codes,
                        sampler=sampler)
    revealed += int(count)
  return total * (2.0 if cfg_w != 0 else 1.0)


__all__ = ["IMAGE_SAMPLERS", "EXECUTIONS", "REFERENCE_QUIRKS", "ImagePlan", "analytic_flops_per_image",
           "cfg_logits", "cfg_weights", "confidence_counts", "confidence_noise",
           "default_bucket", "default_execution", "executions", "halton_counts", "halton_order", "halton_sequence",
           "halton_temperatures", "image_plan", "image_sample", "parse_reference_compat",
           "step_shapes"]
