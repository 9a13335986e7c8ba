r"""Reproduces the README's "Results on the embedded default" table.

  python scripts/reproduce_results.py --out=workdirs/results            # PGM and MDLM
  python scripts/reproduce_results.py --out=workdirs/results --models=pgm,mdlm,ar

For each model it trains, if needed, exactly the README's command

  python -m pgm_jax.main --config=configs/shakespeare.py:<model> --workdir=OUT/<model>

(log in OUT/<model>.log). A workdir whose latest checkpoint is already at the config's
last step is not trained again; a partial one resumes. Then it reads the validation
perplexity at steps 250, 500 and 750 from OUT/<model>/metrics.jsonl and prints the
Markdown table with the commit and date it ran at, and where each workdir came from
(OUT/<model>.provenance.json, written when this script starts a training).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

STEPS = (250, 500, 750)
LABELS = {"pgm": "PGM 2+2 (`:pgm`)", "mdlm": "MDLM 4 layers (`:mdlm`)",
          "ar": "AR 4 layers (`:ar`)"}


def _git(*args) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def commit() -> str:
  dirty = _git("status", "--porcelain", "--untracked-files=no")
  return _git("rev-parse", "--short=12", "HEAD") + (" (with local changes)" if dirty else "")


def load_config(model: str):
  from pgm_jax.core import config_lib  # pylint: disable=g-import-not-at-top, unused-import
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("shakespeare_config",
                                                os.path.join(REPO, "configs", "shakespeare.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(model)


def command(model: str, workdir: str) -> list[str]:
  return [sys.executable, "-m", "pgm_jax.main", f"--config=configs/shakespeare.py:{model}",
          f"--workdir={workdir}"]


def train_if_needed(model: str, workdir: str, num_steps: int) -> str:
  """Trains (or resumes) unless the workdir is finished; returns what happened."""
  from pgm_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  latest = checkpointing.latest_step(checkpointing.checkpoint_dir(workdir))
  if latest is not None and latest >= num_steps:
    return f"finished workdir reused (step {latest})"
  log = workdir.rstrip("/") + ".log"
  cmd = command(model, workdir)
  with open(workdir.rstrip("/") + ".provenance.json", "w") as f:
    json.dump({"command": " ".join(cmd[1:]), "commit": commit(), "resumed_from": latest,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
  print(f"training {model}: {' '.join(cmd[1:])}  (log: {log})", file=sys.stderr, flush=True)
  with open(log, "a") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"reproduce_results: error: training {model} failed "
                     f"(exit {proc.returncode}); see {log}")
  return "trained by this script" if latest is None else f"resumed from step {latest}"


def read_metrics(workdir: str) -> dict:
  """{step: record} of metrics.jsonl; a step logged twice (a resumed run) keeps the last."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise SystemExit(f"reproduce_results: error: {path} not found")
  val, train = {}, {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if "val/ppl" in record:
        val[record["step"]] = record["val/ppl"]
      if "train/steps_per_s" in record:
        train[record["step"]] = record["train/steps_per_s"]
  return {"val": val, "steps_per_s": train}


def num_params(config) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  setup = experiment.make_setup(config)
  return sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state.params))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="root folder of the workdirs")
  parser.add_argument("--models", default="pgm,mdlm", help="comma-separated: pgm,mdlm,ar")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(LABELS))
  if unknown:
    parser.error(f"--models: unknown {unknown}; expected some of {sorted(LABELS)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.makedirs(args.out, exist_ok=True)
  rows, notes = [], []
  for model in models:
    config = load_config(model)
    workdir = os.path.abspath(os.path.join(args.out, model))
    how = train_if_needed(model, workdir, config.train.num_steps)
    metrics = read_metrics(workdir)
    missing = [s for s in STEPS if s not in metrics["val"]]
    if missing:
      raise SystemExit(f"reproduce_results: error: {workdir}/metrics.jsonl has no val/ppl at "
                       f"steps {missing}")
    rates = list(metrics["steps_per_s"].values())
    provenance = workdir + ".provenance.json"
    origin = (json.load(open(provenance)) if os.path.isfile(provenance) else None)
    rows.append(f"| {LABELS[model]} | {num_params(config) / 1e6:.2f}M | "
                + " | ".join(f"{metrics['val'][s]:.1f}" for s in STEPS)
                + f" | {sum(rates) / max(len(rates), 1):.2f} |")
    notes.append(f"- `{model}`: {workdir} ({how}; "
                 + (f"trained with `{origin['command']}` at commit {origin['commit']}, started "
                    f"{origin['started'][:19]} UTC" if origin else
                    "trained outside this script: no provenance file") + ")")
  pgm, mdlm = ("pgm" in models), ("mdlm" in models)
  print(f"Reproduced with `python scripts/reproduce_results.py --out={args.out} "
        f"--models={','.join(models)}` at commit {commit()}, "
        f"{datetime.date.today().isoformat()}.\n")
  print("| model | params | val PPL @250 | @500 | @750 | train steps/s (mean of logged) |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))
  print()
  print("\n".join(notes))
  if pgm and mdlm:
    ratios = []
    for s in STEPS:
      a = read_metrics(os.path.join(args.out, "pgm"))["val"][s]
      b = read_metrics(os.path.join(args.out, "mdlm"))["val"][s]
      ratios.append(f"@{s}: {b / a:.2f}x")
    print(f"\nMDLM val PPL / PGM val PPL: {', '.join(ratios)}")


if __name__ == "__main__":
  main()
