"""Training loop: bitwise resume, NaN stop, SIGTERM save, CLI smoke and bad input."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config, restored_state
from pgm_jax import experiment, train
from pgm_jax.core import checkpointing
from pgm_jax.evaluation import perplexity


def tiny_config(**overrides):
  cfg = load_config("shakespeare", "tiny")
  cfg.train.num_final_samples = 0
  cfg.train.eval_every = 1000
  cfg.eval.max_batches = 1
  cfg.ckpt.every_steps = 1000
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path, kind):
  n = 3
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 2 * n, "model.kind": kind,
                                          "model.dropout": 0.1}), straight)
  train.train_and_evaluate(tiny_config(**{"train.num_steps": n, "model.kind": kind,
                                          "model.dropout": 0.1}), resumed)
  assert checkpointing.latest_step(checkpointing.checkpoint_dir(resumed)) == n
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 2 * n, "model.kind": kind,
                                          "model.dropout": 0.1}), resumed)
  cfg = tiny_config(**{"model.kind": kind})
  step_a, state_a = restored_state(cfg, straight)
  step_b, state_b = restored_state(cfg, resumed)
  assert step_a == step_b == 2 * n
  assert_trees_equal(state_a, state_b)          # params, EMA, optimizer state, step
  # The data iterator position was checkpointed too.
  data = json.load(open(glob.glob(os.path.join(resumed, "checkpoints", str(2 * n), "data",
                                               "*.json"))[0]))
  assert data == json.load(open(glob.glob(os.path.join(
      straight, "checkpoints", str(2 * n), "data", "*.json"))[0]))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 2}), workdir)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  before = sorted(os.listdir(ckpt_dir))
  with pytest.raises(train.NonFiniteLossError, match=r"step 2 in .*checkpoints") as e:
    train.train_and_evaluate(tiny_config(**{"train.num_steps": 8, "opt.lr": float("nan")}),
                             workdir)
  # Within a few steps of a resume, the restored step is named as a suspect too.
  assert re.search(r"\d step\(s\) after resuming", str(e.value)) and "may be damaged" in str(e.value)
  assert "no earlier step is kept" in str(e.value)
  assert checkpointing.latest_step(ckpt_dir) == 2
  assert sorted(os.listdir(ckpt_dir)) == before


@pytest.mark.slow
def test_checkpoint_shape_mismatch_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / "shape")
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 1}), workdir)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  before = {p: os.path.getmtime(p) for p in glob.glob(ckpt_dir + "/**", recursive=True)}
  with pytest.raises(ValueError, match=r"params/.* has shape .* config expects"):
    train.train_and_evaluate(tiny_config(**{"train.num_steps": 2, "model.hidden": 32}), workdir)
  after = {p: os.path.getmtime(p) for p in glob.glob(ckpt_dir + "/**", recursive=True)}
  assert before == after


@pytest.mark.parametrize("overrides,pattern", [
    ({"data.seq_len": 2}, r"config\.data\.seq_len"),
    ({"train.batch_size": 6, "train.grad_accum_steps": 4}, r"config\.train\.grad_accum_steps"),
    ({"mesh.shape": (2, 1, 1)}, r"config\.mesh\.shape"),
    ({"model.num_heads": 3}, r"config\.model\.num_heads"),
    ({"model.kind": "gpt"}, r"config\.model\.kind"),
    ({"sample.steps": 100}, r"config\.sample\.steps"),
    ({"attn.impl": "pallas", "attn.block_q": 0}, r"config\.attn\.block_q"),
    ({"attn.impl": "cuda"}, r"config\.attn\.impl"),
    ({"sample.sampler": "ddpm"}, r"config\.sample\.sampler"),
])
def test_bad_config_names_the_key(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    experiment.make_setup(tiny_config(**overrides))


def test_missing_data_dir_names_the_key(tmp_path):
  cfg = tiny_config(**{"data.name": "array_record", "data.data_dir": str(tmp_path / "nope")})
  with pytest.raises(ValueError, match=r"config\.data\.data_dir"):
    train.train_and_evaluate(cfg, str(tmp_path / "wd"))


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  cfg = tiny_config(**{"data.name": "text_files", "data.train_files": str(tmp_path / "*.txt"),
                       "data.val_files": str(tmp_path / "*.txt")})
  with pytest.raises(ValueError, match=r"config\.data"):
    train.train_and_evaluate(cfg, str(tmp_path / "wd"))


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown config preset 'bogus'"):
    load_config("shakespeare", "tiny,bogus")


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch(kind):
  """accum=4 over a batch gives the same step as accum=1 (up to float reassociation)."""
  import functools
  from pgm_jax import steps
  setup = experiment.make_setup(tiny_config(**{"model.kind": kind}))
  state = experiment.init_state(setup, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 2048, (8, 32)).astype(np.int32),
           "valid": np.ones((8, 32), bool)}
  outs = []
  for accum in (1, 4):
    cfg = tiny_config(**{"model.kind": kind, "model.dropout": 0.0,
                         "train.grad_accum_steps": accum})
    fn = jax.jit(functools.partial(steps.train_step, model=setup.model, tx=setup.tx, config=cfg,
                                   mask_id=setup.mask_id))
    outs.append(jax.device_get(fn(state, batch, jax.random.key(1))))
  (s1, m1), (s4, m4) = outs
  np.testing.assert_allclose(float(m1.loss.compute()), float(m4.loss.compute()), rtol=1e-5)
  np.testing.assert_allclose(float(m1.grad_norm.compute()), float(m4.grad_norm.compute()),
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _cli(*args, timeout=300, **popen):
  cmd = [sys.executable, "-m", "pgm_jax.main", *args]
  return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                        **popen)


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_train_eval_sample_bench(tmp_path):
  workdir = str(tmp_path / "cli")
  res = _cli("--config=configs/shakespeare.py:tiny", f"--workdir={workdir}",
             "--config.train.num_steps=6")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "step 6/6" in res.stderr and "val_ppl" in res.stderr
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "samples_step6.txt"))
  assert checkpointing.latest_step(checkpointing.checkpoint_dir(workdir)) == 6
  res = _cli("--config=configs/shakespeare.py:tiny", f"--workdir={workdir}", "--mode=eval")
  assert res.returncode == 0, res.stderr[-3000:]
  lines = [l for l in res.stdout.splitlines() if l.startswith("val_ppl=")]
  assert len(lines) == 1
  val_ppl = float(lines[0].split("=")[1])
  result = json.load(open(os.path.join(workdir, "eval.json")))
  assert abs(result["val_ppl"] - val_ppl) < 1e-4 * val_ppl and result["step"] == 6
  assert 1.0 < val_ppl < 2049 * 2

  # --mode=sample and --mode=bench from the command line, on the same workdir. (The
  # one-line errors of bad flags and keys are tests/test_bad_inputs.py's.)
  res = _cli("--config=configs/shakespeare.py:tiny", f"--workdir={workdir}", "--mode=sample",
             "--config.sample.num_samples=3", "--config.sample.steps=4",
             "--config.sample.prompt=ROMEO.[[6]]love")
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "samples.jsonl"))]
  assert len(rows) == 3
  for row in rows:
    assert {"text", "tokens", "sampler", "steps", "seed"} <= set(row)
    assert row["sampler"] == "efficient-uniform" and row["steps"] == 4
    assert 2048 not in row["tokens"]  # the MASK id of the vendored tokenizer
  assert "--- sample 0" in res.stdout

  res = _cli("--config=configs/bench.py:cpu", f"--workdir={workdir}", "--mode=bench",
             "--config.bench.seq_len=32", "--config.bench.steps=4", "--config.bench.repeats=1",
             "--config.bench.batch_size=2")
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.load(open(os.path.join(workdir, "bench.json")))
  for k in ("tokens_per_s", "flops_per_seq", "compiles"):
    assert report["pgm"][k] > 0 and report["mdlm"][k] > 0
  assert report["flop_ratio"] == pytest.approx(
      report["mdlm"]["flops_per_seq"] / report["pgm"]["flops_per_seq"])
  assert report["throughput_ratio"] == pytest.approx(
      report["pgm"]["tokens_per_s"] / report["mdlm"]["tokens_per_s"])
  assert "thru x" in res.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "term")
  cmd = [sys.executable, "-m", "pgm_jax.main", "--config=configs/shakespeare.py:tiny",
         f"--workdir={workdir}", "--config.train.num_steps=100000",
         "--config.train.log_every=1", "--config.train.eval_every=100000",
         "--config.ckpt.every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "after SIGTERM" in err
  step = checkpointing.latest_step(checkpointing.checkpoint_dir(workdir))
  assert step is not None and step >= 3


@pytest.mark.slow
def test_sigterm_on_a_checkpoint_step_saves_once(tmp_path, monkeypatch):
  """SIGTERM handled on a step that is saved anyway: no second save of that step
  (Orbax refuses it: 'Checkpoint for step 2 already exists'), a clean stop."""
  workdir = str(tmp_path / "term_ckpt")
  real_save = checkpointing.save

  def save_then_sigterm(manager, step, *args, **kwargs):
    real_save(manager, step, *args, **kwargs)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpointing, "save", save_then_sigterm)
  history = train.train_and_evaluate(
      tiny_config(**{"train.num_steps": 6, "ckpt.every_steps": 2}), workdir)
  assert history.get("preempted")
  assert checkpointing.latest_step(checkpointing.checkpoint_dir(workdir)) == 2


@pytest.mark.slow
def test_checkpoint_before_eval_sigterm_in_eval_and_corrupt_resume(tmp_path, monkeypatch, caplog):
  """A checkpoint step saves before its eval (an eval crash keeps checkpoint N); SIGTERM
  during that eval stops cleanly with one save; a corrupt latest step on resume falls
  back to the previous kept one, which is moved aside (not deleted) and trained past."""
  workdir = str(tmp_path / "order")
  cfg = lambda n: tiny_config(**{"train.num_steps": n, "ckpt.every_steps": 2,
                                 "train.eval_every": 2})
  real_validation = perplexity.run_validation

  def crash(*args, **kwargs):
    raise RuntimeError("eval crashed")

  monkeypatch.setattr(perplexity, "run_validation", crash)
  with pytest.raises(RuntimeError, match="eval crashed"):
    train.train_and_evaluate(cfg(6), workdir)
  assert checkpointing.latest_step(checkpointing.checkpoint_dir(workdir)) == 2

  saves = []
  real_save = checkpointing.save

  def counting_save(manager, step, *args, **kwargs):
    saves.append(step)
    real_save(manager, step, *args, **kwargs)

  evals = []

  def sigterm_then_eval(*args, **kwargs):
    evals.append(1)
    if len(evals) == 2:  # the first is step 2's eval, which the crash skipped: run on resume
      os.kill(os.getpid(), signal.SIGTERM)
    return real_validation(*args, **kwargs)

  monkeypatch.setattr(checkpointing, "save", counting_save)
  monkeypatch.setattr(perplexity, "run_validation", sigterm_then_eval)
  history = train.train_and_evaluate(cfg(6), workdir)
  assert history.get("preempted") and saves == [4]      # step 4 saved once, then stopped
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val_steps = [r["step"] for r in map(json.loads, f) if "val/ppl" in r]
  assert val_steps == [2, 4]          # the eval a stop (here a crash) skipped ran on resume

  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  for path in glob.glob(os.path.join(ckpt_dir, "4", "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      size = len(f.read())
      f.seek(0)
      f.write(b"\xff" * size)
  monkeypatch.setattr(perplexity, "run_validation", real_validation)
  saves.clear()
  history = train.train_and_evaluate(cfg(5), workdir)
  assert history["step"] == 5 and saves == [4, 5]       # resumed from 2, saved 4 again
  assert any("step 4" in r.getMessage() and "corrupt_checkpoints" in r.getMessage()
             for r in caplog.records)
  assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["4"]
  assert sorted(os.listdir(ckpt_dir)) == ["4", "5"]            # max_to_keep=2
