"""The Colab notebook's code cells run top to bottom (no Jupyter): on a trained workdir
with an AR judge, and on a workdir made by `pgm_jax.tools.convert` without a judge (and
without its config.json, from a preset name)."""
import json
import os
import struct

import jax
import matplotlib
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config, tiny_gpt2_state
from pgm_jax import experiment, train
from pgm_jax.core import checkpointing
from pgm_jax.tools import convert

matplotlib.use("Agg")


def _code_cells(path):
  nb = json.load(open(path))
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      # Shell and magic lines would be Colab setup; a checkout is already installed.
      yield "".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%")))


def _run_cells(monkeypatch, namespace, *, first_cell, env, base):
  """The code cells from the one starting with `first_cell` on, in a copy of `namespace`
  (the settings and helpers of the cells before), with BASE (where workdirs go) = `base`."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  namespace = dict(namespace, BASE=base)
  cells = list(_code_cells(os.path.join(REPO_ROOT, "notebooks", "pgm_jax_colab.ipynb")))
  start = next(i for i, c in enumerate(cells) if c.startswith(first_cell))
  for source in cells[start:]:
    exec(compile(source, "pgm_jax_colab.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def _run_notebook(monkeypatch, env, *, until=None):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  namespace = {"__name__": "__notebook__"}
  for source in _code_cells(os.path.join(REPO_ROOT, "notebooks", "pgm_jax_colab.ipynb")):
    exec(compile(source, "pgm_jax_colab.ipynb", "exec"), namespace)  # pylint: disable=exec-used
    if until is not None and until in namespace:
      break
  return namespace


def _write_safetensors(path, tensors):
  """A float32 safetensors file (the format `convert.read_safetensors` reads)."""
  header, blobs, offset = {}, [], 0
  for name, value in tensors.items():
    data = np.ascontiguousarray(value, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _as_reference_checkpoint(params, ema_params, path):
  """The trained weights under the authors' PyTorch names (backbone.*, ema.backbone.*)."""
  expected = convert.expected_torch_params(params)
  tensors = {}
  for prefix, tree in (("backbone.", params), ("ema.backbone.", ema_params)):
    flat = {convert._path_keys(p): np.asarray(v)  # pylint: disable=protected-access
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for name, (keys, _, transpose) in expected.items():
      tensors[prefix + name] = flat[keys].T if transpose else flat[keys]
  _write_safetensors(path, tensors)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
  base = dict(num_steps=3, num_final_samples=0)
  workdirs = {}
  for preset in ("tiny", "tiny,ar"):
    cfg = load_config("shakespeare", preset)
    for k, v in base.items():
      cfg.train[k] = v
    workdirs[preset] = str(tmp_path / preset.replace(",", "_"))
    train.train_and_evaluate(cfg, workdirs[preset])
  trained = _run_notebook(monkeypatch, {
      "PGM_NOTEBOOK_WORKDIR": workdirs["tiny"], "PGM_NOTEBOOK_JUDGE": workdirs["tiny,ar"],
      "PGM_NOTEBOOK_STEPS": "2,4", "PGM_NOTEBOOK_SAMPLES": "2", "PGM_NOTEBOOK_RELEASED": ""})
  results = trained["results"]
  assert [r["steps"] for r in results] == [2, 4]
  assert all(r["gen_ppl"] > 1 and r["tokens_per_s"] > 0 for r in results)
  assert os.path.exists(os.path.join(workdirs["tiny"], "notebook_steps.png"))

  # The same weights as an authors'-format checkpoint -> pgm_jax.tools.convert -> the notebook.
  cfg = load_config("shakespeare", "tiny")
  setup = experiment.make_setup(cfg)
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdirs["tiny"]),
                                       read_only=True)
  state, _ = checkpointing.restore(manager, 3, setup.abstract_state)
  manager.close()
  ckpt = str(tmp_path / "reference.safetensors")
  _as_reference_checkpoint(jax.device_get(state.params), jax.device_get(state.ema_params), ckpt)
  converted = str(tmp_path / "converted")
  convert.convert(cfg, ckpt, converted, step=3, log=lambda *_: None)
  assert os.path.isfile(os.path.join(converted, "config.json"))
  no_judge = str(tmp_path / "no_judge")
  nb = _run_notebook(monkeypatch, {
      "PGM_NOTEBOOK_WORKDIR": converted, "PGM_NOTEBOOK_JUDGE": no_judge,
      "PGM_NOTEBOOK_STEPS": "2", "PGM_NOTEBOOK_SAMPLES": "2", "PGM_NOTEBOOK_RELEASED": ""})
  assert nb["step"] == 3 and nb["judge"] is None
  assert "gen_ppl" not in nb["results"][0] and nb["results"][0]["entropy"] > 0
  # Converted EMA weights = the trained EMA weights: the same samples, token for token.
  assert ([s["tokens"] for s in nb["results"][0]["samples"]] ==
          [s["tokens"] for s in results[0]["samples"]])
  assert os.path.exists(os.path.join(converted, "notebook_steps.png"))

  # A converted workdir without config.json: the config comes from a preset name.
  os.remove(os.path.join(converted, "config.json"))
  nb = _run_notebook(monkeypatch, {"PGM_NOTEBOOK_CONFIG": "configs/shakespeare.py:tiny",
                                   "PGM_NOTEBOOK_RELEASED": ""}, until="params")
  assert nb["step"] == 3 and nb["config"].model.kind == "pgm"

  # The released-models section (cells 8-11), offline against a hub cache holding the same
  # weights as the authors' Lightning file pgm_8_8.ckpt, a tiny GPT-2 as
  # openai-community/gpt2-large, and an image PGM in the authors' image layout as
  # images_pgm_12_12_100epochs.ckpt (tiny models: the presets are overridden).
  import test_convert as tc  # pylint: disable=g-import-not-at-top
  import test_hub as th  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cache = str(tmp_path / "hf_cache")
  monkeypatch.setenv("HF_HUB_CACHE", cache)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  expected = convert.expected_torch_params(state.params)
  weights = {}
  for which, tree in (("raw", state.params), ("ema", state.ema_params)):
    flat = {convert._path_keys(p): np.asarray(v)  # pylint: disable=protected-access
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}
    weights[which] = {name: (flat[keys].T if transpose else flat[keys]).astype(np.float32)
                      for name, (keys, _, transpose) in expected.items()}
  tc.save_lightning(tmp_path / "pgm_8_8.ckpt", weights["raw"], weights["ema"], step=3)
  th.put_in_cache(cache, "jdeschena/pgm", {"pgm_8_8.ckpt": tmp_path / "pgm_8_8.ckpt"})
  gpt2 = tiny_gpt2_state(np.random.default_rng(0), vocab=50257, e=16, positions=128)
  save_file({k: v.copy() for k, v in gpt2.items()}, str(tmp_path / "model.safetensors"))
  th.put_in_cache(cache, "openai-community/gpt2-large", {
      "config.json": json.dumps({"n_head": 2, "n_embd": 16}).encode(),
      "model.safetensors": tmp_path / "model.safetensors"})
  released = _run_cells(monkeypatch, trained, first_cell="# 8. Released", env={
      "PGM_NOTEBOOK_RELEASED": "pgm_8_8",
      "PGM_NOTEBOOK_RELEASED_CONFIG": os.path.join(REPO_ROOT, "configs", "shakespeare.py:tiny"),
      "PGM_NOTEBOOK_RELEASED_STEPS": "2,4", "PGM_NOTEBOOK_RELEASED_SAMPLES": "2"},
      base=str(tmp_path))
  assert released["rel_step"] == 3
  rows = released["released_results"]
  assert [r["steps"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 and r["entropy"] > 0 for r in rows)
  # The released file holds the trained EMA weights: the same samples, token for token.
  assert ([s["tokens"] for s in rows[0]["samples"]] ==
          [s["tokens"] for s in results[0]["samples"]])
  assert os.path.isfile(tmp_path / "workdirs" / "released_assets" / "gpt2_judge" / "judge.json")

  image_cfg, image_setup = tc._image_setup("pgm,tiny")  # pylint: disable=protected-access
  image_params = tc._random_params(image_setup, 0)  # pylint: disable=protected-access
  tc.save_authors_image(tmp_path / "images.ckpt",
                        tc.authors_state_dict(image_setup, image_cfg, image_params), it=5)
  th.put_in_cache(cache, "jdeschena/pgm",
                  {"images_pgm_12_12_100epochs.ckpt": tmp_path / "images.ckpt"})
  images = _run_cells(monkeypatch, trained, first_cell="# 8. Released", env={
      "PGM_NOTEBOOK_RELEASED": "imagenet_pgm_12_12",
      "PGM_NOTEBOOK_RELEASED_CONFIG": os.path.join(REPO_ROOT, "configs", "digits.py:pgm,tiny")},
      base=str(tmp_path))
  assert images["rel_step"] == 5 and images["rel_is_image"]
  assert os.path.isfile(tmp_path / "workdirs" / "released_imagenet_pgm_12_12" /
                        "notebook_samples.png")


def test_notebook_cells_compile_and_read_the_knobs_set_above():
  """Cheap (nothing runs): every code cell is valid Python, and the notebook reads each
  PGM_NOTEBOOK_* variable test_notebook_runs drives it with."""
  sources = list(_code_cells(os.path.join(REPO_ROOT, "notebooks", "pgm_jax_colab.ipynb")))
  assert sources
  for source in sources:
    compile(source, "pgm_jax_colab.ipynb", "exec")
  text = "\n".join(sources)
  for knob in ("WORKDIR", "JUDGE", "STEPS", "SAMPLES", "CONFIG", "RELEASED",
               "RELEASED_CONFIG", "RELEASED_STEPS", "RELEASED_SAMPLES", "GPT2", "VQ",
               "FID_STATS", "FID_WEIGHTS"):
    assert f"PGM_NOTEBOOK_{knob}" in text, knob


def test_notebook_finds_the_quick_start_workdir_and_says_before_training(
    tmp_path, monkeypatch, capsys):
  """Run headless from notebooks/, it looks for the quick start's REPO/workdirs/pgm (not
  notebooks/workdirs), prints which workdir it uses, and says so before it would train."""
  for key in ("PGM_NOTEBOOK_WORKDIR", "PGM_NOTEBOOK_JUDGE"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.chdir(os.path.join(REPO_ROOT, "notebooks"))
  cells = list(_code_cells(os.path.join(REPO_ROOT, "notebooks", "pgm_jax_colab.ipynb")))
  namespace = {"__name__": "__notebook__"}
  for source in cells[:2]:                                          # install check, settings
    exec(compile(source, "pgm_jax_colab.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  if not os.path.isdir("/content"):
    assert namespace["WORKDIR"] == os.path.join(REPO_ROOT, "workdirs", "pgm")
  assert f"WORKDIR = {namespace['WORKDIR']}" in capsys.readouterr().out
  calls = []
  from pgm_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(main, "run", lambda argv: calls.append(
      ("train", argv, capsys.readouterr().out)))
  namespace["WORKDIR"] = str(tmp_path / "empty")                   # no checkpoint there
  exec(compile(cells[2], "pgm_jax_colab.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  assert len(calls) == 1
  _, argv, said_before = calls[0]
  assert f"--workdir={tmp_path / 'empty'}" in argv
  assert f"No checkpoint in {tmp_path / 'empty'}: training the embedded default" in said_before
