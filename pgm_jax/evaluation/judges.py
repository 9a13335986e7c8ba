"""Judges of sample quality: generative perplexity under an AR judge, and unigram entropy.

Generative perplexity (gen PPL) scores generated text with a separate autoregressive
judge: exp(mean NLL per judged token). The paper's judge is GPT-2 Large, which cannot
be downloaded here. Our offline judge is the AR baseline trained by this codebase
(`configs/shakespeare.py:ar`). It is loaded from its workdir: the `config.json` the
trainer writes there, plus the EMA weights of its latest checkpoint.

Two scorings, as in the reference:
  * re-tokenised: decode each sample to text, encode it with the judge's tokenizer,
    and score [BOS] + tokens (truncated to the judge's seq_len);
  * raw tokens: score the sample's token ids directly, without BOS/EOS-stripping.
    Only valid when the sampler's and the judge's tokenizers are the same.
Entropy: the Shannon entropy (nats) of each sample's empirical token distribution,
averaged over samples. Mode collapse shows up as low entropy. A constant sequence has
entropy 0; n uniform draws from V tokens approach log V when n >> V.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgm_jax import experiment, families, objectives
from pgm_jax.core import sharding


def unigram_entropy(token_ids) -> float:
  """Shannon entropy (nats) of the empirical distribution of one sample's tokens."""
  ids = np.asarray(token_ids).ravel()
  if ids.size == 0:
    return 0.0
  _, counts = np.unique(ids, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def mean_entropy(samples) -> float:
  return float(np.mean([unigram_entropy(s) for s in samples])) if len(samples) else 0.0


class _Judge:
  """Scores token rows (each starting with the judge's BOS) with a causal LM.

  Data-parallel: the judge's parameters live on `mesh` (every device, every process) and
  each batch of rows is sharded over its batch axes (`data`, `fsdp`), so each device scores
  its share; the batch is padded with empty rows to a multiple of the data-parallel size.
  The sums come back replicated, the same on every process (every process passes the same
  rows and must call together)."""
  tokenizer = None
  seq_len = 0
  params = None
  step = None
  mesh = None

  def _nll(self, params, tokens, valid):
    raise NotImplementedError

  def _put_rows(self, x):
    if self.mesh is None or (self.mesh.size == 1 and jax.process_count() == 1):
      return jnp.asarray(x)
    return sharding.put_sharded(x, sharding.batch_sharding(self.mesh))

  def _score_rows(self, rows, batch_size: int):
    """rows: lists of token ids starting with BOS. Returns (nll_sum, predicted tokens)."""
    total, count = 0.0, 0.0
    pad = self.tokenizer.pad_id
    data_parallel = 1 if self.mesh is None else sharding.data_parallel_size(self.mesh)
    padded = -(-batch_size // data_parallel) * data_parallel
    for first in range(0, len(rows), batch_size):
      chunk = rows[first:first + batch_size]
      tokens = np.full((padded, self.seq_len), pad, np.int32)
      valid = np.zeros((padded, self.seq_len), bool)
      for i, row in enumerate(chunk):
        row = row[:self.seq_len]
        tokens[i, :len(row)] = row
        valid[i, :len(row)] = True
      s, c = self._nll(self.params, self._put_rows(tokens), self._put_rows(valid))
      total, count = total + float(sharding.host_value(s)), count + float(sharding.host_value(c))
    return total, count

  def score_texts(self, texts, batch_size: int = 16) -> dict:
    """Re-tokenised gen PPL of decoded texts: [BOS] + judge tokens, truncated to seq_len."""
    rows = [[self.tokenizer.bos_id] + self.tokenizer.encode(t) for t in texts]
    total, count = self._score_rows(rows, batch_size)
    nll = total / max(count, 1.0)
    return {"gen_ppl": float(np.exp(nll)), "gen_nll": nll, "gen_tokens": count}

  def score_tokens(self, token_rows, batch_size: int = 16) -> dict:
    """Raw-token gen PPL (same tokenizer): each row is scored from its first token."""
    total, count = self._score_rows([list(map(int, r)) for r in token_rows], batch_size)
    nll = total / max(count, 1.0)
    return {"gen_ppl_raw": float(np.exp(nll)), "gen_nll_raw": nll}

  def same_tokenizer(self, tokenizer) -> bool:
    return (getattr(tokenizer, "name", None) == getattr(self.tokenizer, "name", None)
            and tokenizer.bos_id == self.tokenizer.bos_id)


class ARJudge(_Judge):
  """An AR baseline checkpoint (configs/shakespeare.py:ar) as the judge."""

  def __init__(self, workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise ValueError(f"config.eval.judge_workdir: {path} not found (train a judge with "
                       f"configs/shakespeare.py:ar, or convert GPT-2 weights with "
                       f"`python -m pgm_jax.tools.eval_assets convert_gpt2`)")
    try:
      with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
      kind = config.model.kind
    except (OSError, ValueError, AttributeError, KeyError) as e:
      raise ValueError(f"config.eval.judge_workdir: {path} is not a pgm_jax config.json "
                       f"({type(e).__name__}: {e})") from None
    if not families.get(kind, key=f"config.eval.judge_workdir: {path}: model.kind"
                        ).exact_likelihood:
      raise ValueError(f"config.eval.judge_workdir: {workdir} holds a {kind!r} model; the "
                       f"judge must be a left-to-right model with an exact likelihood ('ar')")
    setup = experiment.make_setup(config)
    step, params = experiment.restore_eval_params(setup, workdir,
                                                  key="config.eval.judge_workdir")
    self._init(setup, params, step)

  @classmethod
  def from_setup(cls, setup: experiment.Setup, params, step=None) -> "ARJudge":
    """A judge from an AR model already in memory (its params on `setup.mesh`)."""
    judge = cls.__new__(cls)
    judge._init(setup, params, step)
    return judge

  def _init(self, setup, params, step):
    self.setup, self.params, self.step = setup, params, step
    self.tokenizer = setup.tokenizer
    self.seq_len = setup.config.data.seq_len
    self.mesh = setup.mesh
    model, mask_id = setup.model, setup.mask_id

    @jax.jit
    def nll(params, tokens, valid):
      logits = model.apply({"params": params}, tokens, valid)
      terms = objectives.ar_loss_terms(logits, tokens, valid, mask_id)
      return terms.nll_sum, terms.num_tokens

    self._nll = nll


class GPT2Judge(_Judge):
  """GPT-2 weights converted by `convert_gpt2` (the paper's judge is GPT-2 Large)."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from pgm_jax.models import gpt2  # pylint: disable=g-import-not-at-top
    from pgm_jax.data.tokenizers import GPT2Tokenizer  # pylint: disable=g-import-not-at-top
    with open(os.path.join(directory, "judge.json")) as f:
      meta = json.load(f)
    cfg = gpt2.GPT2Config(**meta["config"])
    model = gpt2.GPT2(cfg)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 8), jnp.int32))["params"])
    self.params = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(directory), "params"), target)
    # Replicated over every device of every process (data-parallel scoring).
    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    self.params = jax.tree.map(
        lambda x: sharding.put_replicated(np.asarray(x), self.mesh), self.params)
    self.tokenizer = GPT2Tokenizer()
    self.seq_len = cfg.n_positions
    self.step = meta.get("source")

    @jax.jit
    def nll(params, tokens, valid):
      logp = jax.nn.log_softmax(model.apply({"params": params}, tokens, valid), axis=-1)
      target = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
      counted = valid[:, 1:]
      return -jnp.sum(jnp.where(counted, target, 0.0)), counted.sum().astype(jnp.float32)

    self._nll = nll


def load_state_dict(path: str) -> dict:
  """numpy state dict from a .safetensors file, a pytorch_model.bin, or an HF folder."""
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        return load_state_dict(os.path.join(path, name))
    raise ValueError(f"--from: no model.safetensors or pytorch_model.bin in {path}")
  from pgm_jax.io import torch_files  # pylint: disable=g-import-not-at-top
  if path.endswith(".safetensors"):
    return torch_files.read_safetensors(path)
  # A pickle: torch.load(weights_only=True) via the checkpoint converter's safe loader.
  state, _ = torch_files.read_torch(path)
  return {k: np.asarray(torch_files.to_numpy(v), np.float32) for k, v in state.items()}


# What convert_gpt2 downloads of an hf: repo: each group's first file that the repo has.
HF_GPT2_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin"))


def convert_gpt2(src: str, out: str, n_head: int | None = None) -> dict:
  """HF GPT-2 weights -> OUT/params (Orbax) + OUT/judge.json. Returns the config.

  Everything is read and checked before anything is written; OUT must not hold a judge
  yet (nothing is overwritten), and judge.json is written last, atomically.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import fileio  # pylint: disable=g-import-not-at-top
  from pgm_jax.io import hub  # pylint: disable=g-import-not-at-top
  from pgm_jax.models import gpt2  # pylint: disable=g-import-not-at-top
  if n_head is not None and n_head <= 0:
    raise ValueError(f"--n_head={n_head} must be positive")
  out = os.path.abspath(out)
  if os.path.exists(os.path.join(out, "judge.json")) or os.path.exists(os.path.join(out, "params")):
    raise ValueError(f"--to={out} already holds a judge; convert into an empty folder")
  fileio.check_writable_dir(out, "--to", create=False)
  # hf:[OWNER/]REPO[@REV] -> its snapshot folder (config.json + the weights) in the HF cache;
  # hf:OWNER/REPO/FILE -> that file.
  source, src = src, hub.resolve_repo(src, HF_GPT2_FILES, "--from", print)
  if not os.path.exists(src):
    raise ValueError(f"--from={src}: no such file or folder")
  state = load_state_dict(src)
  hf_config = os.path.join(src, "config.json") if os.path.isdir(src) else None
  if n_head is None and hf_config and os.path.exists(hf_config):
    try:
      with open(hf_config) as f:
        n_head = json.load(f).get("n_head")
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f"--from: {hf_config} is not a readable JSON config ({e})") from None
  try:
    cfg = gpt2.config_from_state(state, n_head)
    params = gpt2.hf_to_flax(state, cfg)
  except (KeyError, IndexError) as e:
    raise ValueError(f"--from={src} is not a GPT-2 state dict (no tensor {e})") from None
  if cfg.n_embd % cfg.n_head:
    raise ValueError(f"--n_head={cfg.n_head} does not divide n_embd={cfg.n_embd}")
  os.makedirs(out, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out, "params"), params)
  checkpointer.wait_until_finished()
  meta = {"kind": "gpt2", "config": dataclasses.asdict(cfg),
          "source": source if hub.is_hub(source) else os.path.abspath(src)}
  fileio.atomic_write_text(os.path.join(out, "judge.json"), json.dumps(meta, indent=2))
  return meta


@functools.lru_cache(maxsize=4)
def load_judge(directory: str) -> _Judge:
  """A converted GPT-2 (folder with judge.json) or an AR baseline workdir."""
  if os.path.exists(os.path.join(directory, "judge.json")):
    return GPT2Judge(directory)
  return ARJudge(directory)
