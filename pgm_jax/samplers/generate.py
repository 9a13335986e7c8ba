"""Samples from a config and params: the driver shared by `--mode=sample`, the end of
training, gen-PPL evaluation and the notebook.

    generate_samples(setup, params, num_samples=..., num_steps=..., seed=...) -> [dict]
    sample(config, workdir) -> [dict], also WORKDIR/samples.jsonl   (--mode=sample)
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging

from pgm_jax import config_lib, experiment, fileio
from pgm_jax.samplers.ar import ar_sample
from pgm_jax.samplers.common import make_prompt, parse_prompt, split_prompt
from pgm_jax.samplers.mdlm import mdlm_sample
from pgm_jax.samplers.pgm import pgm_sample


def generate_samples(setup: experiment.Setup, params, *, num_samples: int, num_steps: int, seed: int,
                     sampler: str | None = None, prompts: tuple[str, ...] = (),
                     progress=None) -> list[dict]:
  """Samples as dicts {text, tokens, sampler, steps, seed, prompt}, in batches of
  config.sample.batch_size (each batch seeded with seed + batch index)."""
  cfg = setup.config
  sampler = sampler or config_lib.resolve_sampler(cfg)
  length = cfg.data.seq_len
  out = []
  batch_size = max(1, min(cfg.sample.batch_size, num_samples))
  for first in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - first)
    batch_prompts = [prompts[(first + i) % len(prompts)] for i in range(n)] if prompts else []
    prompt = make_prompt(batch_prompts, n, setup.tokenizer, length)
    batch_seed = seed + first // batch_size
    common = dict(model=setup.model, sampler=sampler, steps=num_steps, seed=batch_seed,
                  mask_id=setup.mask_id, top_p=cfg.sample.top_p,
                  temperature=cfg.sample.temperature)
    if setup.model_cfg.kind == "pgm":
      result = pgm_sample(params, prompt, bucket_size=cfg.sample.bucket_size,
                                   progress=progress, **common)
    elif setup.model_cfg.kind == "ar":
      result = ar_sample(params, prompt, **common)
    else:
      result = mdlm_sample(params, prompt, **common)
    for i, row in enumerate(result.tokens):
      out.append({"text": setup.tokenizer.decode(row.tolist()), "tokens": row.tolist(),
                  "sampler": sampler, "steps": num_steps, "seed": batch_seed,
                  "index": first + i, "prompt": batch_prompts[i] if batch_prompts else "",
                  "known": np.flatnonzero(prompt.known[i]).tolist()})
  return out


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


def sample(config, workdir: str) -> list[dict]:
  """--mode=sample: EMA weights of the latest checkpoint -> WORKDIR/samples.jsonl.

  Everything is checked before sampling starts (config, prompts, that WORKDIR is
  writable); the file is replaced atomically, and only by a complete set of samples.
  """
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir, create=False)
  setup = experiment.make_setup(config)
  prompts = read_prompts(config)
  for prompt in prompts:  # lengths against config.data.seq_len, before any work
    parse_prompt(prompt, setup.tokenizer, config.data.seq_len)
  step, params = experiment.restore_eval_params(setup, workdir)
  sampler = config_lib.resolve_sampler(config)
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
    logging.info("%d samples (%s, %d steps) in %.1fs written to %s", len(samples), sampler,
                 config.sample.steps, seconds, path)
  return samples
