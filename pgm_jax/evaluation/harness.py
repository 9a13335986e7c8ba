r"""Downstream multiple-choice evaluation: pgm_jax checkpoints scored by EleutherAI's
lm-evaluation-harness (`lm_eval`, the `harness` extra), the counterpart of the reference's
`mgm_eval_harness.py`.

    python -m pgm_jax.main --config=configs/owt.py:pgm_8_8 --workdir=WORKDIR --mode=harness \
        --config.harness.tasks=arc_easy,piqa --config.harness.num_mc_samples=1024

lm_eval turns each task into (context, continuation) requests and picks, per question,
the continuation with the highest log-likelihood. `Scorer.loglikelihood` answers them:

  * MDLM and PGM (`likelihood="reference"`, the reference's rule): the sequence
    [BOS] + context + continuation + [EOS] is noised as in training, num_mc_samples times
    with antithetic t (MDLM: each token masked w.p. 1 - alpha(t); PGM: each token in group
    1 w.p. 1 - alpha(t)); the ELBO term of every noised token, (1/t)(-log p), is averaged
    over all positions of the sequence and over the samples, and its negative is the
    score. Context tokens are noised too, exactly as the reference does.
    `likelihood="conditional"` keeps the context clean and noises only the continuation
    (+ EOS): the score is then an ELBO of log p(continuation | context), summed over the
    continuation's tokens.
  * AR: the exact log p(continuation | [BOS] + context), summed over its tokens.
  * is_greedy (used by lambada_openai): MDLM predicts the continuation in one pass from
    the context with every continuation token masked (its final EOS kept); PGM predicts it
    with the continuation in group 1 (EOS in group 0); AR by per-token argmax.
  * A request longer than config.data.seq_len scores (0.0, False), as the reference does.

Sequences are padded to a multiple of `bucket_size` with masked-out keys (the same
function as the unpadded sequence), so the number of compiled programs stays small.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
import ml_collections
from ml_collections.config_dict import placeholder

from pgm_jax import experiment, objectives
from pgm_jax.core import sharding
from pgm_jax.samplers.common import device_put_fn


def config_defaults() -> ml_collections.ConfigDict:
  """`config.harness`: the options of --mode=harness (a config file adds this section
  with `pgm_jax.tools.with_tool_configs`)."""
  c = ml_collections.ConfigDict()
  c.tasks = ("arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa,race,"
                     "social_iqa,mathqa,piqa,lambada_openai")  # the reference's list
  c.num_mc_samples = 1024           # MDLM / PGM: noised copies per request (the paper's)
  c.batch_size = 64                 # copies per forward pass (divides num_mc_samples)
  c.likelihood = "reference"          # reference (whole sequence noised, mean per token) |
                                    # conditional (context clean, continuation ELBO summed)
  c.bucket_size = 32                # requests padded to a multiple (bounded compiles)
  c.seed = 0
  c.limit = placeholder(int)               # lm_eval --limit: examples per task (debugging)
  c.num_fewshot = placeholder(int)
  c.include_path = placeholder(str)          # folder of extra lm_eval task YAMLs (local data)
  c.output_path = placeholder(str)           # default WORKDIR/harness.json
  return c


# The reference's downstream tasks (scripts/eval/harness in its text_pretrain branch).
REFERENCE_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq",
                   "openbookqa", "race", "social_iqa", "mathqa", "piqa", "lambada_openai")
LIKELIHOODS = ("reference", "conditional")


class Scorer:
  """(context, continuation) -> (log-likelihood, is_greedy) for a pgm_jax model."""

  def __init__(self, setup: experiment.Setup, params, *, num_mc_samples: int = 1024,
               batch_size: int = 64, seed: int = 0, likelihood: str = "reference",
               bucket_size: int = 32, sampling_eps: float | None = None):
    self.setup, self.params = setup, params
    self.family = setup.family
    self.tokenizer = setup.tokenizer
    self.seq_len = setup.config.data.seq_len
    self.num_mc_samples, self.batch_size = int(num_mc_samples), int(batch_size)
    self.likelihood, self.bucket_size = likelihood, max(1, int(bucket_size))
    self.eps = setup.config.train.sampling_eps if sampling_eps is None else sampling_eps
    self.key = jax.random.key(seed)
    if likelihood not in LIKELIHOODS:
      raise ValueError(f"config.harness.likelihood must be one of {LIKELIHOODS}, "
                       f"got {likelihood!r}")
    if not self.family.exact_likelihood and (self.num_mc_samples <= 0 or self.batch_size <= 0
                              or self.num_mc_samples % self.batch_size):
      raise ValueError(f"config.harness.num_mc_samples={num_mc_samples} must be a positive "
                       f"multiple of config.harness.batch_size={batch_size}")
    model, mask_id = setup.model, setup.mask_id
    self._elbo = jax.jit(experiment.with_mesh(setup.mesh, _elbo_terms_fn(
        model, self.family, mask_id, self.eps)))
    self._greedy = jax.jit(experiment.with_mesh(setup.mesh, _greedy_fn(model, self.family,
                                                                          mask_id)))
    self._ar = jax.jit(experiment.with_mesh(setup.mesh, _ar_fn(model, mask_id)))

  # -- tokens -----------------------------------------------------------------------
  def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The reference's request tokens: [BOS] + context, continuation (+ [EOS] unless AR)."""
    tok = self.tokenizer
    prefix = [tok.bos_id] + list(tok.encode(context))
    target = list(tok.encode(continuation))
    if not self.family.exact_likelihood:
      target = target + [tok.eos_id]
    return prefix, target

  def _padded(self, ids: Sequence[int]):
    n = len(ids)
    length = max(self.bucket_size, math.ceil(n / self.bucket_size) * self.bucket_size)
    tokens = np.full((length,), self.tokenizer.pad_id, np.int32)
    tokens[:n] = ids
    return tokens, np.arange(length) < n

  # -- scores -----------------------------------------------------------------------
  def request_key(self, index: int):
    return jax.random.fold_in(self.key, index)

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    out = []
    for i, (context, continuation) in enumerate(requests):
      prefix, target = self.encode(context, continuation)
      if len(prefix) + len(target) > self.seq_len:
        out.append((0.0, False))
        continue
      if self.family.exact_likelihood:
        out.append(self._ar_score(prefix, target))
      else:
        ll = self._elbo_score(prefix, target, self.request_key(i))
        out.append((ll, self._greedy_score(prefix, target)))
    return out

  def draws(self, key, length: int):
    """(t [num_mc_samples], u [num_mc_samples, length]) of one request: t antithetic over
    all the samples (the reference's `_sample_t(num_mc_samples)`), u uniform per token
    (noised iff u < 1 - alpha(t))."""
    t_key, u_key = jax.random.split(key)
    ts = objectives.sample_times(t_key, self.num_mc_samples, sampling_eps=self.eps)
    return ts, jax.random.uniform(u_key, (self.num_mc_samples, length))

  def _elbo_score(self, prefix, target, key) -> float:
    tokens, valid = self._padded(prefix + target)
    scored = valid.copy()
    if self.likelihood == "conditional":
      scored[:len(prefix)] = False                    # the context stays clean
    ts, us = self.draws(key, len(tokens))
    total = 0.0
    # Data-parallel: the Monte Carlo rows are sharded over the mesh's batch axes.
    put = device_put_fn(self.params, self.batch_size)
    rows = put(np.broadcast_to(tokens, (self.batch_size, len(tokens))))
    valid_dev, scored_dev = put(valid), put(scored)
    ts, us = np.asarray(ts), np.asarray(us)
    for first in range(0, self.num_mc_samples, self.batch_size):
      chunk = slice(first, first + self.batch_size)
      nll_B = self._elbo(self.params, rows, valid_dev, scored_dev, put(ts[chunk]),
                         put(us[chunk]))
      total += float(np.sum(sharding.host_value(nll_B)))
    per_sample = total / self.num_mc_samples
    if self.likelihood == "reference":
      per_sample /= len(prefix) + len(target)          # mean over the sequence's positions
    return -per_sample

  def _greedy_score(self, prefix, target) -> bool:
    tokens, valid = self._padded(prefix + target)
    n_p, n_t = len(prefix), len(target)
    query = np.zeros_like(valid)                       # the positions to predict
    query[n_p:n_p + n_t - 1] = True                    # continuation, its EOS excluded
    put = device_put_fn(self.params, 1)
    preds = sharding.host_value(self._greedy(self.params, put(tokens[None]), put(valid[None]),
                                             put(query[None])))[0]
    return bool(np.all(preds[query] == tokens[query]))

  def _ar_score(self, prefix, target) -> tuple[float, bool]:
    tokens, valid = self._padded(prefix + target)
    scored = np.zeros_like(valid)
    scored[len(prefix):len(prefix) + len(target)] = True
    put = device_put_fn(self.params, 1)
    logp, greedy = self._ar(self.params, put(tokens[None]), put(valid[None]))
    logp, greedy = sharding.host_value(logp)[0], sharding.host_value(greedy)[0]
    # position i predicts token i + 1
    hit = scored[1:]
    return float(logp[hit].sum()), bool(np.all(greedy[hit] == tokens[1:][hit]))


def _sigma_for(model, t_B):
  return objectives.sigma(t_B) if getattr(model.config, "time_conditioning", False) else None


def _elbo_terms_fn(model, family, mask_id: int, eps: float):
  """-> per-sample sums of (1/t)(-log p) over noised, scored positions ([B])."""

  def fn(params, tokens_BxL, valid_L, scored_L, t_B, u_BxL):
    valid = jnp.broadcast_to(valid_L, tokens_BxL.shape)
    noised = (u_BxL < objectives.mask_prob(t_B, eps)[:, None]) & scored_L[None]
    logp = family.predict_hidden(params, tokens_BxL, noised, valid, model=model,
                                 mask_id=mask_id, sigma_B=_sigma_for(model, t_B),
                                 targets_BxL=tokens_BxL)
    return jnp.sum(jnp.where(noised & valid, -logp / t_B[:, None], 0.0), axis=1)

  return fn


def _greedy_fn(model, family, mask_id: int):
  """-> argmax predictions [B, L] with the `query` positions hidden from the model."""

  def fn(params, tokens_BxL, valid_BxL, query_BxL):
    sigma = _sigma_for(model, jnp.ones((tokens_BxL.shape[0],)))
    logits = family.predict_hidden(params, tokens_BxL, query_BxL, valid_BxL, model=model,
                                   mask_id=mask_id, sigma_B=sigma)
    return jnp.argmax(logits.at[..., mask_id].set(-jnp.inf), axis=-1)

  return fn


def _ar_fn(model, mask_id: int):
  """-> (log p(tokens[i + 1] | tokens[:i + 1]) [B, L-1], argmax predictions [B, L-1])."""

  def fn(params, tokens_BxL, valid_BxL):
    logits = model.apply({"params": params}, tokens_BxL, valid_BxL)[:, :-1]
    logits = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = tokens_BxL[:, 1:]
    return (jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0],
            jnp.argmax(logits, axis=-1))

  return fn


# ----------------------------------------------------------------------------------------
# lm-evaluation-harness.
# ----------------------------------------------------------------------------------------

def import_lm_eval():
  try:
    import lm_eval  # pylint: disable=g-import-not-at-top
    from lm_eval.api import model as lm_model  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("--mode=harness needs lm-evaluation-harness: pip install -e "
                     "'.[harness]'") from None
  return lm_eval, lm_model


def make_lm(scorer: Scorer):
  """An `lm_eval.api.model.LM` whose loglikelihood is `scorer`'s."""
  _, lm_model = import_lm_eval()

  class PgmJaxLM(lm_model.LM):
    """pgm_jax model behind lm_eval's LM interface (loglikelihood only, as the reference)."""

    def __init__(self):
      super().__init__()
      self.scorer = scorer

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      raise NotImplementedError("pgm_jax's harness adapter scores (context, continuation) "
                                "requests only (multiple-choice and lambada tasks)")

    def generate_until(self, requests, disable_tqdm: bool = False):
      raise NotImplementedError("pgm_jax's harness adapter does not generate text")

  return PgmJaxLM()


def run_harness(config, workdir: str) -> dict:
  """--mode=harness: EMA weights of WORKDIR's latest checkpoint -> lm_eval tasks ->
  WORKDIR/harness.json (accuracies per task, as lm_eval reports them)."""
  h = config.harness
  tasks = [t.strip() for t in str(h.tasks).split(",") if t.strip()]
  if not tasks:
    raise ValueError("config.harness.tasks: no task named")
  lm_eval, _ = import_lm_eval()
  setup = experiment.make_setup(config)
  step, params = experiment.restore_eval_params(setup, workdir)
  scorer = Scorer(setup, params, num_mc_samples=h.num_mc_samples, batch_size=h.batch_size,
                  seed=h.seed, likelihood=h.likelihood, bucket_size=h.bucket_size)
  from lm_eval import tasks as lm_tasks  # pylint: disable=g-import-not-at-top
  include = h.get("include_path")
  if include and not os.path.isdir(include):
    raise ValueError(f"config.harness.include_path: {include} is not a folder")
  manager = lm_tasks.TaskManager(include_path=include) if include else lm_tasks.TaskManager()
  logging.info("harness: %s on %s (step %d, %s, %d MC samples)", tasks, workdir, step,
               h.likelihood, h.num_mc_samples)
  results = lm_eval.simple_evaluate(model=make_lm(scorer), tasks=tasks, task_manager=manager,
                                    limit=h.get("limit"), num_fewshot=h.get("num_fewshot"),
                                    log_samples=False)
  summary = {"step": step, "model": config.model.kind, "likelihood": h.likelihood,
             "num_mc_samples": h.num_mc_samples, "tasks": tasks,
             "results": _jsonable(results.get("results", {}))}
  if jax.process_index() == 0:
    path = h.get("output_path") or os.path.join(workdir, "harness.json")
    experiment.write_text(path, json.dumps(summary, indent=2))
  return summary


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)
