"""The Colab notebook's code cells run top to bottom on the embedded default (no Jupyter)."""
import json
import os

import matplotlib

from conftest import REPO_ROOT, load_config
from pgm_jax import train

matplotlib.use("Agg")


def _code_cells(path):
  nb = json.load(open(path))
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      # Shell and magic lines are Colab setup (install); a checkout is already installed.
      yield "".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%")))


def test_notebook_runs(tmp_path, monkeypatch):
  base = dict(num_steps=3, num_final_samples=0)
  workdirs = {}
  for preset in ("tiny", "tiny,ar"):
    cfg = load_config("shakespeare", preset)
    for k, v in base.items():
      cfg.train[k] = v
    workdirs[preset] = str(tmp_path / preset.replace(",", "_"))
    train.train_and_evaluate(cfg, workdirs[preset])
  monkeypatch.setenv("PGM_NOTEBOOK_WORKDIR", workdirs["tiny"])
  monkeypatch.setenv("PGM_NOTEBOOK_JUDGE", workdirs["tiny,ar"])
  monkeypatch.setenv("PGM_NOTEBOOK_STEPS", "2,4")
  monkeypatch.setenv("PGM_NOTEBOOK_SAMPLES", "2")
  namespace = {"__name__": "__notebook__"}
  for source in _code_cells(os.path.join(REPO_ROOT, "notebooks", "pgm_jax_colab.ipynb")):
    exec(compile(source, "pgm_jax_colab.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  results = namespace["results"]
  assert [r["steps"] for r in results] == [2, 4]
  assert all(r["gen_ppl"] > 1 and r["tokens_per_s"] > 0 for r in results)
  assert os.path.exists(os.path.join(workdirs["tiny"], "notebook_steps.png"))
