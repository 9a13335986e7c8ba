r"""Golden numbers of the embedded defaults: the first training losses, a validation PPL and a
few sampled tokens of every embedded preset (Shakespeare PGM, MDLM and AR; digits PGM and
MaskGIT), computed by the real programs (`train.train_and_evaluate`, the samplers).

    python scripts/golden.py            # print them and compare with tests/golden.json
    python scripts/golden.py --write    # rewrite tests/golden.json

`tests/test_golden.py` recomputes them and fails when they move. A change that moves them
on purpose regenerates the pin with `--write` in the same commit, together with the README
tables and docs that quote trained numbers (`scripts/reproduce_results.py`,
`scripts/digits_results.py`), so that no quoted number drifts silently.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
GOLDEN_PATH = os.path.join(REPO_ROOT, "tests", "golden.json")
PRESETS = (("shakespeare", "pgm"), ("shakespeare", "mdlm"), ("shakespeare", "ar"),
           ("digits", "pgm"), ("digits", "maskgit"))
STEPS = 3            # training steps pinned (each logged)
SAMPLE_TOKENS = 12   # tokens pinned of the first sample


def load_config(name: str, preset: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"golden_{name}",
                                                os.path.join(REPO_ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def compute(name: str, preset: str) -> dict:
  """Trains `STEPS` steps of configs/NAME.py:PRESET (its own model, data and optimizer; one
  validation batch at the end), then samples from the EMA weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment, sample, train  # pylint: disable=g-import-not-at-top
  config = load_config(name, preset)
  config.train.num_steps = STEPS
  config.train.log_every = 1
  config.train.num_final_samples = 0
  config.eval.max_batches = 1
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    setup = experiment.make_setup(config)
    _, params = experiment.restore_eval_params(setup, workdir)
  out = {"train_loss": [r["train/loss"] for r in rows if "train/loss" in r],
         "val_ppl": [r["val/ppl"] for r in rows if "val/ppl" in r]}
  if setup.family.is_image:
    tokens = sample.generate_images(setup, params, np.asarray([0, 1]), num_steps=4, seed=0)
  else:
    tokens = [s["tokens"] for s in sample.generate_samples(setup, params, num_samples=1,
                                                          num_steps=4, seed=0)]
  out["sample_tokens"] = [int(t) for t in np.asarray(tokens)[0][:SAMPLE_TOKENS]]
  jax.clear_caches()
  return out


def compute_all() -> dict:
  return {f"{name}:{preset}": compute(name, preset) for name, preset in PRESETS}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN_PATH}")
  args = parser.parse_args()
  values = compute_all()
  print(json.dumps(values, indent=1))
  if args.write:
    with open(GOLDEN_PATH, "w") as f:
      json.dump(values, f, indent=1)
      f.write("\n")
    print(f"wrote {GOLDEN_PATH}")
  elif os.path.exists(GOLDEN_PATH):
    with open(GOLDEN_PATH) as f:
      print("same as tests/golden.json" if json.load(f) == values else
            "DIFFERENT from tests/golden.json")


if __name__ == "__main__":
  main()
