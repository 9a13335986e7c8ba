r"""The digits results table: PGM vs MaskGIT, Halton vs confidence, a few S and CFG weights.

Every cell is `--mode=eval`'s computation (pgm_jax.evaluation.images.sample_metrics: 50
class-conditional samples per digit judged by the repo's classifier), run for each setting in
one process so that programs compile once per shape. Trained workdirs come from

  python -m pgm_jax.main --config=configs/digits.py:pgm --workdir=workdirs/digits_pgm
  python -m pgm_jax.main --config=configs/digits.py:maskgit --workdir=workdirs/digits_maskgit

then

  python scripts/digits_results.py --pgm=workdirs/digits_pgm --maskgit=workdirs/digits_maskgit \
      --out=workdirs/digits_results.json

prints a markdown table and writes every row to --out.
"""
import argparse
import importlib.util
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from pgm_jax import experiment  # pylint: disable=wrong-import-position
from pgm_jax.evaluation import images, perplexity  # pylint: disable=wrong-import-position


def load_config(preset: str):
  """configs/digits.py:<preset>, as --config=configs/digits.py:<preset> loads it."""
  spec = importlib.util.spec_from_file_location("digits_config",
                                                os.path.join(REPO_ROOT, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pgm", default=None, help="workdir of configs/digits.py:pgm")
  parser.add_argument("--maskgit", default=None, help="workdir of configs/digits.py:maskgit")
  parser.add_argument("--steps", default="8,16,32", help="sampling steps S, comma separated")
  parser.add_argument("--cfg_w", default="0,2", help="guidance weights, comma separated")
  parser.add_argument("--samplers", default="halton,confidence")
  parser.add_argument("--out", default=None, help="JSON file for the rows")
  args = parser.parse_args(argv)
  steps = [int(s) for s in args.steps.split(",")]
  weights = [float(w) for w in args.cfg_w.split(",")]
  rows = []
  models = [(name, wd) for name, wd in (("pgm", args.pgm), ("maskgit", args.maskgit)) if wd]
  if not models:
    parser.error("give --pgm and/or --maskgit")
  for name, workdir in models:
    config = load_config(name)
    setup = experiment.make_setup(config)
    step, params = experiment.restore_eval_params(setup, workdir)
    val = perplexity.run_validation(setup, params)
    for sampler in args.samplers.split(","):
      for s in steps:
        for w in weights:
          row = images.sample_metrics(setup, params, sampler=sampler, steps=s, cfg_w=w)
          row.update(checkpoint_step=step, val_nll=val["val_nll"], workdir=workdir)
          rows.append(row)
          print(json.dumps({k: row[k] for k in ("model", "sampler", "steps", "cfg_w",
                                                "sample_class_accuracy", "fd_classifier",
                                                "images_per_s")}), flush=True)
  print(format_table(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)


def format_table(rows) -> str:
  first = rows[0]
  lines = [f"classifier held-out accuracy {first['classifier_accuracy']:.3f}; FD floor (as many "
           f"training digits vs held-out) {first['fd_classifier_train']:.2f}", "",
           "| model | val CE/code | sampler | S | CFG w | class acc. | FD (classifier) | images/s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['val_nll']:.3f} | {r['sampler']} | {r['steps']} | "
                 f"{r['cfg_w']:g} | {r['sample_class_accuracy']:.3f} | "
                 f"{r['fd_classifier']:.2f} | {r['images_per_s']:.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
