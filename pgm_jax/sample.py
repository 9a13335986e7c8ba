"""Samples from a config and params: the driver shared by `--mode=sample`, the end of
training, evaluation and the notebook.

    generate_samples(setup, params, num_samples=..., num_steps=..., seed=...) -> [dict]
    generate_images(setup, params, labels, ...) -> tokens [n, 1 + G*G]      (image configs)
    sample(config, workdir) -> [dict], also WORKDIR/samples.jsonl   (--mode=sample, text)
      image configs: WORKDIR/samples.png (one row per class) and WORKDIR/samples.npz
"""
from __future__ import annotations

import functools
import io
import json
import os
import time

import jax
import numpy as np
from absl import logging

from pgm_jax import experiment, families
from pgm_jax.core import fileio
from pgm_jax.data import images
from pgm_jax.samplers.common import (THRESHOLD_SAMPLER, make_prompt, parse_prompt,
                                     split_prompt)
from pgm_jax.samplers.image import image_sample


class SamplingStopped(RuntimeError):
  """`should_stop()` turned true (a SIGTERM) while sampling: nothing is returned."""


def _stoppable(progress, should_stop):
  """`progress`, also raising SamplingStopped at a step where `should_stop()` holds."""
  if should_stop is None:
    return progress

  def wrapped(k, total):
    if should_stop():
      raise SamplingStopped(f"stopped at sampling step {k}/{total}")
    if progress is not None:
      progress(k, total)

  return wrapped


def generate_samples(setup: experiment.Setup, params, *, num_samples: int, num_steps: int, seed: int,
                     sampler: str | None = None, prompts: tuple[str, ...] = (),
                     progress=None, should_stop=None) -> list[dict]:
  """Samples as dicts {text, tokens, sampler, steps, seed, index, prompt, known, passes},
  in batches of config.sample.batch_size (each batch seeded with seed + batch index).
  `passes`: the model passes run until that sequence was complete (fewer than `steps` for
  confidence-threshold; `mean_passes` averages them)."""
  cfg = setup.config
  sampler = sampler or families.resolve_sampler(cfg)
  length = setup.family.sample_length(cfg)
  out = []
  batch_size = max(1, min(cfg.sample.batch_size, num_samples))
  step_progress = _stoppable(progress, should_stop)
  for first in range(0, num_samples, batch_size):
    if should_stop is not None and should_stop():
      raise SamplingStopped(f"stopped after {first} of {num_samples} samples")
    n = min(batch_size, num_samples - first)
    batch_prompts = [prompts[(first + i) % len(prompts)] for i in range(n)] if prompts else []
    prompt = make_prompt(batch_prompts, n, setup.tokenizer, length)
    batch_seed = seed + first // batch_size
    result = setup.family.sample_text(
        params, prompt, model=setup.model, sampler=sampler, steps=num_steps, seed=batch_seed,
        mask_id=setup.mask_id, top_p=cfg.sample.top_p, temperature=cfg.sample.temperature,
        bucket_size=cfg.sample.bucket_size, progress=step_progress,
        threshold=cfg.sample.get("threshold", 0.9),
        **({"eos_id": setup.tokenizer.eos_id} if setup.family.stops_at_eos else {}))
    passes = result.passes_per_sequence()
    for i, row in enumerate(result.tokens):
      if result.lengths is not None:
        row = row[:int(result.lengths[i])]  # cut after the first EOS (variable length)
      out.append({"text": setup.tokenizer.decode(row.tolist()), "tokens": row.tolist(),
                  "sampler": sampler, "steps": num_steps, "seed": batch_seed,
                  "index": first + i, "prompt": batch_prompts[i] if batch_prompts else "",
                  "known": np.flatnonzero(prompt.known[i]).tolist(),
                  "passes": int(passes[i])})
      if sampler == THRESHOLD_SAMPLER:
        out[-1]["threshold"] = float(cfg.sample.get("threshold", 0.9))
  return out


def mean_passes(samples: list[dict]) -> float | None:
  """The mean model passes per sequence of `generate_samples` rows (None if none)."""
  passes = [s["passes"] for s in samples if "passes" in s]
  return float(np.mean(passes)) if passes else None


def read_prompts(config) -> tuple[str, ...]:
  """config.sample.prompt and the lines of config.sample.prompt_file, their gap syntax
  checked (a malformed [[..]] is an error naming the key, and the file's line)."""
  prompts = []
  if config.sample.prompt:
    split_prompt(config.sample.prompt, "config.sample.prompt")
    prompts.append(config.sample.prompt)
  path = config.sample.get("prompt_file")
  if path:
    if not os.path.isfile(path):
      raise ValueError(f"config.sample.prompt_file: {path} does not exist")
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"config.sample.prompt_file: cannot read {path} ({e})") from None
    for n, line in enumerate(lines, 1):
      if line.strip():
        split_prompt(line, f"config.sample.prompt_file {path} line {n}")
        prompts.append(line)
    if not prompts:
      raise ValueError(f"config.sample.prompt_file: {path} has no non-empty line")
  return tuple(prompts)


def generate_images(setup: experiment.Setup, params, labels, *, num_steps: int, seed: int,
                    sampler: str | None = None, cfg_w: float | None = None,
                    progress=None, should_stop=None) -> np.ndarray:
  """Class-conditional token grids int32 [len(labels), 1 + G*G] ([BOS] + codes), in batches
  of config.sample.batch_size (batch i seeded with seed + i)."""
  cfg = setup.config
  sampler = sampler or families.resolve_sampler(cfg)
  cfg_w = cfg.sample.cfg_w if cfg_w is None else cfg_w
  labels = np.asarray(labels, np.int32)
  batch_size = max(1, min(cfg.sample.batch_size, len(labels)))
  out = []
  step_progress = _stoppable(progress, should_stop)
  for first in range(0, len(labels), batch_size):
    if should_stop is not None and should_stop():
      raise SamplingStopped(f"stopped after {first} of {len(labels)} images")
    result = image_sample(
        params, labels[first:first + batch_size], model=setup.model, sampler=sampler,
        steps=num_steps, seed=seed + first // batch_size, grid=cfg.data.grid, cfg_w=cfg_w,
        temperature=cfg.sample.temperature, temperature_min=cfg.sample.temperature_min,
        r_temp=cfg.sample.r_temp, bucket_size=cfg.sample.bucket_size,
        reference_compat=setup.family.reference_compat(cfg), progress=step_progress)
    out.append(result.tokens)
  return np.concatenate(out)


def grid_classes(config) -> list[int]:
  """The classes of a sample grid: config.sample.classes, or every class (at most 16)."""
  classes = [int(c) for c in config.sample.classes]
  num_classes = config.model.num_classes
  if not classes:
    classes = list(range(min(num_classes, 16)))
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"config.sample.classes: {bad} not in [0, config.model.num_classes="
                     f"{num_classes})")
  return classes


@functools.lru_cache(maxsize=2)
def _vq_tokenizer(path: str):
  from pgm_jax.models import vq  # pylint: disable=g-import-not-at-top
  return vq.load_vq(path)


def has_vq_decoder(config) -> bool:
  """Whether the samples of `config` are VQ codes that `decode_images` turns into pixels
  with the VQ-8 decoder (not the digits, whose tokens are the pixels)."""
  return config.data.name != "digits"


def image_decoder(config):
  """The VQ-8 tokenizer of config.data.tokenizer_path, checked against the config (None for
  the digits, whose tokens are pixels). Loaded once per path; call it before sampling so that
  a wrong file fails before any work."""
  if not has_vq_decoder(config):
    return None
  path = config.data.get("tokenizer_path") or ""
  if not path:
    raise ValueError("config.data.tokenizer_path: not set; name the VQ-8 weights "
                     "(vq_ds8_c2i.npz, see docs/images.md) to decode codes into images")
  try:
    tokenizer = _vq_tokenizer(os.path.expanduser(path))
  except ValueError as e:
    raise ValueError(f"config.data.tokenizer_path: {e}") from None
  if tokenizer.codebook_size != config.data.num_codes:
    raise ValueError(f"config.data.tokenizer_path={path}: a VQ with {tokenizer.codebook_size} "
                     f"codes cannot decode config.data.num_codes={config.data.num_codes} codes")
  return tokenizer


def decode_images(config, tokens_BxL) -> np.ndarray:
  """Token grids ([BOS] + codes) -> uint8 images: the digits' grey levels [B, G, G], or RGB
  [B, 8G, 8G, 3] from the VQ-8 decoder whose weights config.data.tokenizer_path names
  (`vq_ds8_c2i.npz` or the .pt, docs/images.md)."""
  tokenizer = image_decoder(config)
  if tokenizer is None:
    return images.digits_to_pixels(tokens_BxL)
  from pgm_jax.models import vq  # pylint: disable=g-import-not-at-top
  grid = config.data.grid
  codes = np.clip(np.asarray(tokens_BxL)[:, 1:], 0, config.data.num_codes - 1)
  pixels = tokenizer.decode(codes.reshape(-1, grid, grid))
  return np.asarray(vq.images_to_uint8(pixels))


def write_image_samples(config, tokens, labels, rows: int, cols: int, prefix: str) -> dict:
  """Writes PREFIX.npz (codes [n, G, G], labels, tokens) and, when the source has a pixel
  decoder, PREFIX.png: a rows x cols grid, one row per class. Call from process 0."""
  grid = config.data.grid
  codes = np.asarray(tokens)[:, 1:].reshape(-1, grid, grid)
  buf = io.BytesIO()
  np.savez(buf, codes=codes, labels=np.asarray(labels, np.int32), tokens=np.asarray(tokens))
  fileio.atomic_write_bytes(prefix + ".npz", buf.getvalue())
  paths = {"npz": prefix + ".npz"}
  if has_vq_decoder(config) and not config.data.get("tokenizer_path"):
    # No VQ weights: the codes are saved, the picture is not.
    logging.warning("no PNG grid: config.data.tokenizer_path is not set (the VQ-8 weights)")
    return paths
  pixels = decode_images(config, tokens)
  scale = max(1, 64 // pixels.shape[1])  # digits: 8 px -> 64 px cells
  png = images.encode_png(images.tile_grid(pixels, rows, cols, scale=scale))
  fileio.atomic_write_bytes(prefix + ".png", png)
  paths["png"] = prefix + ".png"
  return paths


def sample_images(config, workdir: str, *, setup=None, params=None, step=None,
                  prefix: str = "samples", should_stop=None) -> dict:
  """Image configs: config.sample.samples_per_class samples of each of `grid_classes`, with
  config.sample.{sampler, steps, cfg_w} -> WORKDIR/PREFIX.{png,npz}. Without `params`, the
  latest checkpoint's."""
  if config.data.get("tokenizer_path"):
    image_decoder(config)  # a wrong VQ file fails before sampling, not after
  setup = setup or experiment.make_setup(config)
  if params is None:
    step, params = experiment.restore_eval_params(setup, workdir)
  classes = grid_classes(config)
  cols = config.sample.samples_per_class
  labels = np.repeat(np.asarray(classes, np.int32), cols)
  sampler = families.resolve_sampler(config)
  started = time.time()
  tokens = generate_images(setup, params, labels, num_steps=config.sample.steps,
                           seed=config.sample.seed, sampler=sampler, should_stop=should_stop)
  seconds = time.time() - started
  info = {"sampler": sampler, "steps": config.sample.steps, "cfg_w": config.sample.cfg_w,
          "classes": classes, "samples_per_class": cols, "checkpoint_step": step,
          "seconds": seconds}
  if jax.process_index() == 0:
    info.update(write_image_samples(config, tokens, labels, len(classes), cols,
                                    os.path.join(workdir, prefix)))
    logging.info("%d images (%s, %d steps, cfg_w %g) in %.1fs: %s", len(labels), sampler,
                 config.sample.steps, config.sample.cfg_w, seconds,
                 ", ".join(v for k, v in info.items() if k in ("png", "npz")))
  return info


def sample(config, workdir: str):
  """--mode=sample: EMA weights of the latest checkpoint -> WORKDIR/samples.jsonl (text), or
  WORKDIR/samples.png + samples.npz (image configs; returns a dict of what was written).

  Everything is checked before sampling starts (config, prompts, that WORKDIR is
  writable); the file is replaced atomically, and only by a complete set of samples.
  """
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir, create=False)
  if families.of(config).is_image:
    return sample_images(config, workdir)
  setup = experiment.make_setup(config)
  prompts = read_prompts(config)
  for prompt in prompts:  # lengths against config.data.seq_len, before any work
    parse_prompt(prompt, setup.tokenizer, config.data.seq_len)
  step, params = experiment.restore_eval_params(setup, workdir)
  sampler = families.resolve_sampler(config)
  started = time.time()

  def progress(k, total):
    if k == total or k % max(1, total // 8) == 0:
      elapsed = time.time() - started
      logging.info("sampling step %d/%d | %.1fs elapsed", k, total, elapsed)

  samples = generate_samples(setup, params, num_samples=config.sample.num_samples,
                             num_steps=config.sample.steps, seed=config.sample.seed,
                             sampler=sampler, prompts=prompts, progress=progress)
  seconds = time.time() - started
  if len(samples) != config.sample.num_samples:
    raise RuntimeError(f"sampling returned {len(samples)} of config.sample.num_samples="
                       f"{config.sample.num_samples} samples; samples.jsonl left unchanged")
  if jax.process_index() == 0:
    path = os.path.join(workdir, "samples.jsonl")
    experiment.write_text(path, "".join(json.dumps(dict(s, checkpoint_step=step)) + "\n"
                              for s in samples))
    logging.info("%d samples (%s, %d steps, %.1f passes per sequence on average) in %.1fs "
                 "written to %s", len(samples), sampler, config.sample.steps,
                 mean_passes(samples), seconds, path)
  return samples
