r"""The block PGM against the PGM, MDLM and AR on the embedded default (README, docs/method.md).

  python scripts/block_pgm_table.py --out=workdirs/results

For each model it trains, if needed, exactly

  python -m pgm_jax.main --config=configs/shakespeare.py:<preset> --workdir=OUT/<name>

(the same 750 steps, batch 32, L = 128, same data order; `scripts/reproduce_results.py`
uses the same workdirs for pgm, mdlm and ar), then runs

  python -m pgm_jax.main --config=configs/shakespeare.py:<preset> --workdir=OUT/<name> \
      --mode=eval --config.eval.gen_ppl=True --config.eval.judge_workdir=OUT/ar \
      --config.eval.gen_num_samples=N

and prints one Markdown table: validation perplexity at step 750 (each model's ELBO; exact
for AR, the block ELBO for the block PGM), generative perplexity under the AR model (same
tokenizer, raw tokens) and unigram entropy of N samples at the config's sampling steps
(S = 64 for the PGM, MDLM and the block PGM, whose blocks share them; AR takes one step per
token), and sampling throughput with each sampler's cache (generated tokens/s after
compilation, --mode=eval's second pass).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce_results as rr  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = {  # name (workdir) -> (preset, label)
    "pgm": ("pgm", "PGM 2+2 (`:pgm`)"),
    "mdlm": ("mdlm", "MDLM 4 layers (`:mdlm`)"),
    "ar": ("ar", "AR 4 layers (`:ar`)"),
    "pgm_block": ("pgm_block", "Block PGM 2+2, b = 16 (`:pgm_block`)"),
    "pgm_block_b4": ("pgm_block,b=4", "Block PGM 2+2, b = 4 (`:pgm_block,b=4`)"),
}


def evaluate(preset: str, workdir: str, judge: str, num_samples: int) -> dict:
  cmd = [sys.executable, "-m", "pgm_jax.main", f"--config=configs/shakespeare.py:{preset}",
         f"--workdir={workdir}", "--mode=eval", "--config.eval.gen_ppl=True",
         f"--config.eval.judge_workdir={judge}", f"--config.eval.gen_num_samples={num_samples}",
         "--config.sample.batch_size=32"]
  log = workdir.rstrip("/") + ".eval.log"
  print(f"evaluating {preset}: {' '.join(cmd[1:])}  (log: {log})", file=sys.stderr, flush=True)
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=rr.REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"block_pgm_table: error: eval of {preset} failed; see {log}")
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)


def steps_label(result: dict, config) -> str:
  """The sampling steps of an eval: the config's S, or one step per token for AR."""
  if result["sampler"] == "ar":
    return f"{config.data.seq_len - 1} (one per token)"
  return str(result["steps"])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="root folder of the workdirs")
  parser.add_argument("--models", default=",".join(MODELS), help=f"some of {list(MODELS)}")
  parser.add_argument("--num_samples", type=int, default=64)
  parser.add_argument("--train_only", action="store_true")
  args = parser.parse_args(argv)
  names = [m for m in args.models.split(",") if m]
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f"--models: unknown {unknown}; expected some of {list(MODELS)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.makedirs(args.out, exist_ok=True)
  judge = os.path.abspath(os.path.join(args.out, "ar"))
  trained = {}
  for name in names:
    preset = MODELS[name][0]
    config = rr.load_config(preset)
    workdir = os.path.abspath(os.path.join(args.out, name))
    trained[name] = (rr.train_if_needed(preset, workdir, config.train.num_steps), config)
  if args.train_only:
    return
  if not os.path.isfile(os.path.join(judge, "config.json")):
    raise SystemExit(f"block_pgm_table: error: the judge {judge} is not trained: include 'ar' "
                     f"in --models")
  rows = []
  for name in names:
    preset, label = MODELS[name]
    how, config = trained[name]
    workdir = os.path.abspath(os.path.join(args.out, name))
    result = evaluate(preset, workdir, judge, args.num_samples)
    val = rr.read_metrics(workdir)["val"]
    last = max(val)
    rows.append(f"| {label} | {rr.num_params(config) / 1e6:.2f}M | {val[last]:.1f} | "
                f"{result['sampler']} | {steps_label(result, config)} | "
                f"{result['gen_ppl_raw']:.1f} | {result['entropy']:.2f} | "
                f"{result['throughput']:.0f} |")
    print(f"- `{name}`: {workdir} ({how})", file=sys.stderr)
  print(f"`python scripts/block_pgm_table.py --out={args.out} --num_samples={args.num_samples}` "
        f"at commit {rr.commit()}:\n")
  print("| model | params | val PPL @750 | sampler | steps | gen PPL (AR judge) | entropy | "
        "sampling tokens/s |")
  print("|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
