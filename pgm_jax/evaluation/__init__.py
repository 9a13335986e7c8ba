"""Evaluation: validation perplexity, generative perplexity under a judge, entropy.

perplexity.py   val PPL over the validation split (make_eval_fn, run_validation)
zero_shot.py    val PPL on the reference's zero-shot sets (config.eval.datasets)
judges.py       AR-baseline and converted GPT-2 judges (load_judge), unigram entropy
fid.py          FID, Inception Score, reference statistics, fid_and_is (images)
images.py       image configs: class-conditional samples, judged by FID / IS (ImageNet) or by
                the repo's digits classifier (digits_classifier.py)

    evaluate(config, workdir) -> {"val_ppl": ..., ...}, also WORKDIR/eval.json  (--mode=eval)
    with config.eval.datasets: {"zero_shot": {set: {"val_ppl": ...}}, ...} instead
"""
from __future__ import annotations

import json
import os
import time

import jax

from pgm_jax import distill, experiment, families
from pgm_jax.core import fileio
from pgm_jax.evaluation import images, judges, perplexity, zero_shot
from pgm_jax.evaluation.judges import (ARJudge, GPT2Judge, convert_gpt2, load_judge,
                                       load_state_dict, mean_entropy, unigram_entropy)
from pgm_jax.evaluation.perplexity import make_eval_fn, run_validation
from pgm_jax import sample as generate


def evaluate(config, workdir: str) -> dict:
  """Restores the latest checkpoint's EMA weights and computes validation perplexity
  (image configs: `images.evaluate_images`).

  WORKDIR is checked for writability first, so the result is never computed and then
  lost; eval.json is replaced atomically.
  """
  if jax.process_index() == 0:
    fileio.check_writable_dir(workdir, create=False)
  if families.of(config).is_image:
    return images.evaluate_images(config, workdir)
  setup = experiment.make_setup(config)
  if config.eval.gen_ppl and not config.eval.get("judge_workdir"):
    raise ValueError("config.eval.gen_ppl=True needs config.eval.judge_workdir (the workdir "
                     "of a trained AR judge, e.g. configs/shakespeare.py:ar)")
  if config.eval.gen_ppl:  # a bad judge fails now, not after the validation pass
    judges.load_judge(config.eval.judge_workdir)
  # Zero-shot sets are read first: a bad name or a missing file fails before the restore.
  sets = zero_shot.load_sets(setup) if config.eval.get("datasets") else None
  step, params = experiment.restore_eval_params(setup, workdir)
  if sets:
    result = {"zero_shot": zero_shot.evaluate_sets(
        setup, params, sets, perplexity.run_validation, perplexity.make_eval_fn(setup))}
  else:
    result = perplexity.run_validation(setup, params)
  result.update(step=step, model=config.model.kind, seq_len=config.data.seq_len)
  result.update(distill.checkpoint_info(workdir, step, config))  # {} unless distilled
  if config.eval.gen_ppl:
    result.update(generation_metrics(setup, params, config.eval.judge_workdir))
  if jax.process_index() == 0:
    experiment.write_text(os.path.join(workdir, "eval.json"), json.dumps(result, indent=2))
  return result


def generation_metrics(setup: experiment.Setup, params, judge_workdir: str) -> dict:
  """Samples config.eval.gen_num_samples sequences and scores them (gen PPL, entropy).

  Throughput is measured on a second pass over the same work, after compilation.
  """
  cfg = setup.config
  judge = judges.load_judge(judge_workdir)
  sampler = families.resolve_sampler(cfg)
  kw = dict(num_samples=cfg.eval.gen_num_samples, num_steps=cfg.sample.steps,
            seed=cfg.sample.seed, sampler=sampler)
  generate.generate_samples(setup, params, **dict(kw, num_samples=min(kw["num_samples"],
                                                              cfg.sample.batch_size)))
  started = time.perf_counter()
  samples = generate.generate_samples(setup, params, **kw)
  seconds = time.perf_counter() - started
  texts = [s["text"] for s in samples]
  out = {"sampler": sampler, "steps": cfg.sample.steps, "gen_num_samples": len(samples),
         "judge_workdir": judge_workdir, "judge_step": judge.step,
         "entropy": judges.mean_entropy([s["tokens"] for s in samples]),
         "throughput": sum(len(s["tokens"]) - 1 for s in samples) / seconds,
         "throughput_unit": "generated tokens/s (after compilation)",
         "mean_passes": generate.mean_passes(samples)}  # model passes per sequence
  if "threshold" in samples[0]:
    out["threshold"] = samples[0]["threshold"]
  out.update(judge.score_texts(texts))
  if judge.same_tokenizer(setup.tokenizer):
    out.update(judge.score_tokens([s["tokens"] for s in samples]))
  return out
