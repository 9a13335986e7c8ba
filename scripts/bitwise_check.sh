#!/usr/bin/env bash
# Behaviour-preservation check for refactors: short runs of every embedded default (text
# PGM, MDLM, AR on Shakespeare; image PGM and MaskGIT on the digits) at a base commit and
# at the working tree, then a bitwise comparison of what they computed: every logged
# train loss / NLL / grad norm, the validation NLL and PPL, the final and --mode=sample
# text samples, and the digits' sampled codes (samples.npz) and PNG pixels.
#
#   bash scripts/bitwise_check.sh BASE_COMMIT [OUT]     # about 15 minutes on 2 CPU cores
#
# Exit status 0 iff everything is identical. Uses the python on PATH (the repo's venv).
set -euo pipefail
BASE=${1:?usage: bitwise_check.sh BASE_COMMIT [OUT]}
OUT=${2:-/tmp/pgm_jax_bitwise}
REPO=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$OUT"; mkdir -p "$OUT"
git -C "$REPO" worktree add -q --detach "$OUT/base_src" "$BASE"
trap 'git -C "$REPO" worktree remove --force "$OUT/base_src"' EXIT

runs() {  # runs SRC DEST
  local src=$1 dest=$2
  mkdir -p "$dest"
  for p in pgm mdlm ar; do
    (cd "$src" && PYTHONPATH="$src" python -m pgm_jax.main --config=configs/shakespeare.py:$p \
      --workdir="$dest/$p" --config.train.num_steps=30 --config.train.log_every=5 \
      --config.train.eval_every=30 --config.ckpt.every_steps=30 --config.eval.max_batches=2 \
      --config.train.num_final_samples=2 && PYTHONPATH="$src" python -m pgm_jax.main \
      --config=configs/shakespeare.py:$p --workdir="$dest/$p" --mode=sample \
      --config.sample.num_samples=2 --config.sample.steps=16) > "$dest/$p.log" 2>&1
  done
  for p in pgm maskgit; do
    (cd "$src" && PYTHONPATH="$src" python -m pgm_jax.main --config=configs/digits.py:$p \
      --workdir="$dest/d$p" --config.train.num_steps=30 --config.train.log_every=5 \
      --config.train.eval_every=30 --config.ckpt.every_steps=30 && PYTHONPATH="$src" \
      python -m pgm_jax.main --config=configs/digits.py:$p --workdir="$dest/d$p" \
      --mode=sample) > "$dest/d$p.log" 2>&1
  done
}
runs "$OUT/base_src" "$OUT/base"
runs "$REPO" "$OUT/new"
python - "$OUT" <<'PY'
import json, os, sys
import numpy as np
from PIL import Image
out = sys.argv[1]
keys = ("loss", "nll", "ppl", "grad_norm", "accuracy")
def metrics(path):
  return [(r.get("step"), {k: v for k, v in r.items() if any(s in k for s in keys)})
          for r in map(json.loads, open(path))]
same = True
for run in ("pgm", "mdlm", "ar", "dpgm", "dmaskgit"):
  a, b = (os.path.join(out, side, run) for side in ("base", "new"))
  checks = {"metrics.jsonl": metrics(f"{a}/metrics.jsonl") == metrics(f"{b}/metrics.jsonl")}
  for name in sorted(os.listdir(a)):
    if name.startswith("samples") and name.endswith((".txt", ".jsonl")):
      checks[name] = open(f"{a}/{name}").read() == open(f"{b}/{name}").read()
    elif name.endswith(".npz"):
      x, y = np.load(f"{a}/{name}"), np.load(f"{b}/{name}")
      checks[name] = all(np.array_equal(x[k], y[k]) for k in x.files)
    elif name.endswith(".png"):
      checks[name] = np.array_equal(np.asarray(Image.open(f"{a}/{name}")),
                                    np.asarray(Image.open(f"{b}/{name}")))
  print(run, " ".join(f"{k}={'same' if v else 'DIFFERENT'}" for k, v in checks.items()))
  same &= all(checks.values())
print("bitwise identical" if same else "DIFFERENT")
sys.exit(0 if same else 1)
PY
