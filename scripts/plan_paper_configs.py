r"""Plans every paper text config with the real TPU compiler and prints the table.

Runs `python -m pgm_jax.main --mode=plan --config.plan.topology=T` for every preset of
configs/owt.py and configs/lm1b.py on every topology given, each with the config's own
defaults (no other flags), and prints the markdown table of docs/scaling.md. Needs
`pip install -e '.[tpu]'` (libtpu). Each paper-size compile takes several minutes on a
2-core machine; `--jobs` runs that many at once.

  python scripts/plan_paper_configs.py --out=/tmp/paper_plans --topologies=v5e-32,v4-32

LM1B needs a BERT vocab.txt only for its size (30522 entries): a placeholder of that size
is written under --out unless --lm1b_vocab is given.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (("owt", "mdlm"), ("owt", "pgm_6_6"), ("owt", "pgm_8_8"), ("owt", "pgm_6_6_dim1024"),
           ("lm1b", "mdlm"), ("lm1b", "pgm"), ("lm1b", "pgm_mean"), ("lm1b", "pgm_logsumexp"))
BERT_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def placeholder_bert_vocab(path: str, size: int = 30522) -> str:
  """A vocab.txt with bert-base-uncased's size and special-token ids (plan needs no more)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(BERT_SPECIAL.get(i, f"tok{i}") for i in range(size)) + "\n")
  return path


def run_one(cfg: str, preset: str, topology: str, out: str, extra: list[str]) -> dict:
  workdir = os.path.join(out, f"{cfg}_{preset}_{topology}")
  cmd = [sys.executable, "-m", "pgm_jax.main", f"--config=configs/{cfg}.py:{preset}",
         f"--workdir={workdir}", "--mode=plan", f"--config.plan.topology={topology}"]
  if cfg == "lm1b":
    cmd.append(f"--config.data.tokenizer_path={extra[0]}")
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  path = os.path.join(workdir, "plan.json")
  if proc.returncode != 0 or not os.path.exists(path):
    tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
    return {"config": f"{cfg}.py:{preset}", "topology": topology, "error": tail}
  with open(path) as f:
    result = json.load(f)
  result.update(config=f"{cfg}.py:{preset}", wall_seconds=time.time() - start)
  return result


def row(r: dict) -> str:
  if "error" in r:
    return f"| `{r['config']}` | {r['topology']} | error: {r['error'][:120]} |" + "|" * 8
  mem = r.get("memory_per_device", {})
  gib = lambda b: f"{b / 1024 ** 3:.1f}"
  peak = gib(mem["peak_bytes"]) if "peak_bytes" in mem else "-"
  if r.get("resource_exhausted"):
    peak = f"OOM: needs {gib(r['resource_exhausted'].get('required_bytes') or 0)}"
  means = f"{r.get('attn_impl')} ({r.get('mosaic_custom_calls', 0)} Mosaic calls)"
  if r.get("model") == "pgm" and r.get("sorted_layout"):
    means += ", sorted"
  means += f", remat={r.get('remat')}"
  if r.get("loss_chunk_len"):
    means += f", loss chunk {r['loss_chunk_len']}"
  if r.get("grad_accum_steps", 1) > 1:
    means += f", accum {r['grad_accum_steps']}"
  flops = r.get("flops_per_device")
  return (f"| `{r['config']}` | {r['topology']} | {r.get('per_device_microbatch')} | "
          f"{gib(r.get('state_bytes_per_device', 0))} | {peak} | "
          f"{r.get('device_memory_gib', 0):.2f} | {'yes' if r.get('fits') else 'NO'} | "
          f"{means} | {'-' if flops is None else f'{flops:.2e}'} | "
          f"{r.get('model_flops_per_step', 0):.2e} | {r.get('compile_seconds', 0):.0f} |")


HEADER = ("| config | slice | seqs / chip | state GiB / chip | peak GiB / chip | HBM GiB / chip | "
          "fits (<= 90%) | means | compiled FLOPs / chip (no kernels) | model FLOPs / step | "
          "compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def table(out: str) -> str:
  """The markdown table of every plan.json under `out` (the runs of this script)."""
  results = []
  for c, p in CONFIGS:
    for topo in sorted({d.rsplit("_", 1)[1] for d in os.listdir(out)
                        if os.path.exists(os.path.join(out, d, "plan.json"))},
                       key=lambda t: t.startswith("v4")):
      path = os.path.join(out, f"{c}_{p}_{topo}", "plan.json")
      if os.path.exists(path):
        with open(path) as f:
          results.append(dict(json.load(f), config=f"{c}.py:{p}"))
  return "\n".join([HEADER] + [row(r) for r in results])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--topologies", default="v5e-32,v4-32")
  parser.add_argument("--only", default="", help="comma-separated cfg:preset to run")
  parser.add_argument("--jobs", type=int, default=1)
  parser.add_argument("--lm1b_vocab", default="")
  parser.add_argument("--table_only", action="store_true",
                      help="print the table of the plans already under --out")
  args = parser.parse_args()
  if args.table_only:
    print(table(args.out))
    return 0
  os.makedirs(args.out, exist_ok=True)
  vocab = args.lm1b_vocab or placeholder_bert_vocab(os.path.join(args.out, "bert_vocab.txt"))
  only = {s for s in args.only.split(",") if s}
  jobs = [(c, p, t) for t in args.topologies.split(",") for c, p in CONFIGS
          if not only or f"{c}:{p}" in only]
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    futures = [pool.submit(run_one, c, p, t, args.out, [vocab]) for c, p, t in jobs]
    results = []
    for fut in concurrent.futures.as_completed(futures):
      results.append(fut.result())
      print(row(results[-1]), flush=True)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + table(args.out))
  return 0 if all(r.get("fits") for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
