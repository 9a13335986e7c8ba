"""`--mode=eval` for image configs: sample class-conditionally, then judge the samples.

For every class, config.eval.samples_per_class samples (config.sample.{sampler, steps,
cfg_w, ...}); images/s is timed on a second pass over the same work (after compilation).
config.eval.metric:
  "classifier" (digits): the repo's digits classifier (evaluation/digits_classifier.py)
      sample_class_accuracy  share of samples put in the class asked for;
      fd_classifier          Frechet distance between samples and the held-out digits in the
                             classifier's 64-d feature space;
      fd_classifier_train    the same for the training digits: the floor a perfect model
                             would reach with as many images;
      classifier_accuracy    the classifier's own held-out accuracy.
  "fid" (ImageNet): `fid` and `inception_score` (10 splits) of the samples decoded by the
      VQ-8 decoder (config.data.tokenizer_path), against config.eval.fid_ref_stats, with the
      Inception weights of config.eval.fid_weights (pgm_jax.evaluation.fid). Samples are
      decoded and scored batch by batch; images/s times the sampler alone. With several
      processes the sampler is data-parallel and each process runs Inception on its share
      of every batch (`fid.extract_features(split_across_processes=True)`).
Also: the validation loss (val_nll = mean cross-entropy per code, as in training).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from pgm_jax import experiment, families
from pgm_jax.core import fileio
from pgm_jax.data import images, pipeline
from pgm_jax.evaluation import digits_classifier, fid, perplexity
from pgm_jax import sample as generate

METRICS = ("classifier", "fid")


def classifier_metrics(tokens, labels, held_out_levels, train_levels) -> dict:
  clf = digits_classifier.train_classifier()
  x = digits_classifier.tokens_to_inputs(tokens)
  feats = clf.features(x)
  held_out = clf.features(digits_classifier.levels_to_inputs(held_out_levels))
  train = clf.features(digits_classifier.levels_to_inputs(train_levels))
  n = min(len(feats), len(train))
  ref = fid.stats_from_features(held_out)
  fd = lambda x: fid.frechet_distance_of_features(x, ref["mu"], ref["sigma"])
  return {"sample_class_accuracy": float((clf.predict(x) == np.asarray(labels)).mean()),
          "fd_classifier": fd(feats), "fd_classifier_train": fd(train[:n]),
          "classifier_accuracy": clf.accuracy,
          "classifier": "MLP 64-256-64-10 on the 1,437 training digits"}


def _check_metric(config):
  metric = config.eval.metric
  if metric not in METRICS:
    raise ValueError(f"config.eval.metric must be one of {METRICS}, got {metric!r}")
  if metric == "classifier" and config.data.name != "digits":
    raise ValueError("config.eval.metric='classifier' judges the digits only "
                     f"(config.data.name={config.data.name!r}); use 'fid'")
  if metric == "fid":
    for key in ("fid_weights", "fid_ref_stats"):
      if not config.eval.get(key):
        raise ValueError(f"config.eval.{key}: not set (config.eval.metric='fid'; the files "
                         "are listed in docs/images.md)")


def sample_metrics(setup: experiment.Setup, params, *, sampler: str, steps: int,
                   cfg_w: float) -> dict:
  """config.eval.samples_per_class samples of every class, timed, and judged."""
  config = setup.config
  _check_metric(config)
  per_class = config.eval.samples_per_class
  labels = np.repeat(np.arange(config.model.num_classes, dtype=np.int32), per_class)
  if config.eval.metric == "fid":
    generate.image_decoder(config)  # the VQ file is checked before any sampling
  batch = config.sample.batch_size
  kw = dict(num_steps=steps, sampler=sampler, cfg_w=cfg_w)
  # Warm-up (compiles every program of the run), then the timed pass, batch by batch
  # (batch i seeded with sample.seed + i, as generate_images does for a whole run).
  generate.generate_images(setup, params, labels[:batch], seed=config.sample.seed, **kw)
  seconds = 0.0

  def batches():
    nonlocal seconds
    for i, first in enumerate(range(0, len(labels), batch)):
      started = time.perf_counter()
      tokens = generate.generate_images(setup, params, labels[first:first + batch],
                                        seed=config.sample.seed + i, **kw)
      seconds += time.perf_counter() - started
      yield tokens

  result = {"model": config.model.kind, "sampler": sampler, "steps": steps,
            "cfg_w": float(cfg_w), "num_samples": int(len(labels))}
  if config.eval.metric == "fid":
    # Every process samples (data-parallel) and holds every batch; each runs Inception on
    # its share of each batch and the features are gathered in order.
    scores = fid.fid_and_is((generate.decode_images(config, t) for t in batches()),
                            os.path.expanduser(config.eval.fid_ref_stats),
                            os.path.expanduser(config.eval.fid_weights),
                            split_across_processes=True)
    result.update(scores)
  else:
    tokens = np.concatenate(list(batches()))
    held_out, _ = images.digits_split("validation")
    train, _ = images.digits_split("train")
    result.update(classifier_metrics(tokens, labels, held_out, train))
  result.update(images_per_s=len(labels) / seconds,
                images_per_s_unit="class-conditional images/s of the sampler after "
                f"compilation, batch {batch}, {jax.devices()[0].device_kind}")
  return result


def evaluate_images(config, workdir: str, *, setup=None, params=None, step=None) -> dict:
  """Image metrics of the latest checkpoint (or `params`) -> WORKDIR/eval.json."""
  _check_metric(config)
  setup = setup or experiment.make_setup(config)
  pipeline.check_label_classes(config.data, config.model.num_classes)
  if params is None:
    step, params = experiment.restore_eval_params(setup, workdir)
  result = {"step": step}
  result.update(sample_metrics(setup, params, sampler=families.resolve_sampler(config),
                               steps=config.sample.steps, cfg_w=config.sample.cfg_w))
  result.update(perplexity.run_validation(setup, params))
  if jax.process_index() == 0:
    fileio.atomic_write_text(os.path.join(workdir, "eval.json"), json.dumps(result, indent=2))
  return result
