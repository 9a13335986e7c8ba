r"""Gen PPL and entropy of an SDTT teacher and of its student after every round.

For the teacher (EMA weights of config.distill.teacher_workdir) and for the student at
every round end kept in the distillation workdir (checkpoints at multiples of
config.distill.round_steps; EMA weights, or with --params=raw the raw weights, which are
what the round trained and what becomes the next round's teacher), samples --num_samples sequences at each number
of steps S in --steps with the config's sampler, and scores them with the eval code
(`evaluation.generation_metrics`: gen PPL under the AR judge, unigram entropy). Prints two
markdown tables (gen PPL, entropy; rows = models, columns = S) and writes JSON.

With --heldout_batches=N (default 4) it also gives, for every student, the distillation
loss on N validation batches (`distill.heldout_loss`: the round's dt and 2-step teacher
targets; the round's teacher is the previous round end's raw weights, or the starting
teacher for round 1), next to the same loss with that teacher as the student. A student
that learned its objective is below its teacher there.

  python scripts/distill_table.py --workdir=workdirs/distill_pgm --judge_workdir=workdirs/ar

The config is the one the distillation run wrote (WORKDIR/config.json), unless --config
names a config file and presets (e.g. shakespeare.py:distill_pgm).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pgm_jax import distill, evaluation, experiment  # noqa: E402
from pgm_jax.core import checkpointing, config_lib
from pgm_jax.data import pipeline  # noqa: E402


def load_config(spec: str | None, workdir: str):
  """'shakespeare.py:distill_pgm' -> configs/shakespeare.py get_config('distill_pgm')
  ('+' joins presets); None -> WORKDIR/config.json, as the trainer wrote it."""
  if spec is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise SystemExit(f"distill_table: {path} not found (pass --config)")
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  name, _, arg = spec.partition(":")
  path = os.path.join(REPO, "configs", name)
  module_spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg.replace("+", ",") or None)


def round_end_steps(workdir: str, round_steps: int) -> list[int]:
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise SystemExit(f"distill_table: no checkpoints in {ckpt_dir}")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  ends = [s for s in steps if s > 0 and s % round_steps == 0]
  if not ends:
    raise SystemExit(f"distill_table: no round-end checkpoint (multiple of "
                     f"config.distill.round_steps={round_steps}) in {ckpt_dir}: {steps}")
  return ends


def heldout_losses(setup, pairs, num_batches: int, batch_size: int, seed: int = 0):
  """[(loss of student, loss of teacher-as-student)] per (student, teacher, dt) in `pairs`,
  each the mean over the masked tokens of `num_batches` validation batches; the same
  validation batches, times, masks and teacher draws for every pair."""
  config = setup.config
  fn = jax.jit(lambda s, t, tok, val, dt, rng: distill.heldout_loss(
      s, t, tok, val, dt, rng, model=setup.model, config=config, mask_id=setup.mask_id))
  batches = list(pipeline.build_eval_iterator(config.data, setup.tokenizer,
                                              batch_size=batch_size, max_batches=num_batches))
  out = []
  for student, teacher, dt in pairs:
    sums = np.zeros((2, 2))
    for i, b in enumerate(batches):
      rng = jax.random.fold_in(jax.random.key(seed), i)
      for j, params in enumerate((student, teacher)):
        total, count = fn(params, teacher, b["tokens"], b["valid"], dt, rng)
        sums[j] += (float(total), float(count))
    out.append((sums[0, 0] / sums[0, 1], sums[1, 0] / sums[1, 1]))
  return out


def markdown(rows, key: str, steps, fmt: str) -> str:
  head = f"| model | {' | '.join(f'S={s}' for s in steps)} |"
  lines = [head, "|---" * (len(steps) + 1) + "|"]
  for name in dict.fromkeys(r["model"] for r in rows):
    by_s = {r["S"]: r for r in rows if r["model"] == name}
    lines.append(f"| {name} | " + " | ".join(format(by_s[s][key], fmt) for s in steps) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=None,
                      help="e.g. shakespeare.py:distill_pgm; default: WORKDIR/config.json")
  parser.add_argument("--workdir", required=True, help="the distillation workdir")
  parser.add_argument("--judge_workdir", required=True, help="AR judge (config.eval.*)")
  parser.add_argument("--teacher_workdir", default=None,
                      help="default: config.distill.teacher_workdir")
  parser.add_argument("--steps", default="4,8,16,32,64",
                      help="sampling step counts; '' for the held-out loss alone")
  parser.add_argument("--num_samples", type=int, default=64)
  parser.add_argument("--seed", type=int, default=None,
                      help="sampling seed (default: config.sample.seed); another seed gives "
                           "a second draw of every cell, to see the sampling noise")
  parser.add_argument("--teacher_only", action="store_true", help="only the teacher's row")
  parser.add_argument("--params", choices=("ema", "raw"), default="ema",
                      help="the students' EMA weights (what eval and the samplers use) or "
                           "their raw weights (what the round trained; the next teacher)")
  parser.add_argument("--heldout_batches", type=int, default=4,
                      help="validation batches of 32 for the held-out distillation loss "
                           "(0: skip)")
  parser.add_argument("--out", default=None, help="default: WORKDIR/distill_table.json")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.workdir)
  if not config_lib.distill_enabled(config):
    raise SystemExit(f"distill_table: the config of {args.workdir} is not a distillation "
                     f"config (config.distill.enabled)")
  config.eval.gen_num_samples = args.num_samples
  config.sample.batch_size = args.num_samples   # one sampling batch per S
  if args.seed is not None:
    config.sample.seed = args.seed
  steps = [int(s) for s in args.steps.split(",") if s]
  teacher = args.teacher_workdir or config.distill.teacher_workdir
  setup = experiment.make_setup(config)
  abstract = setup.abstract_state.params

  key = {"ema": "ema_params", "raw": "params"}[args.params]
  models = [("teacher", None, lambda: checkpointing.restore_params(teacher, abstract))]
  ends = [] if args.teacher_only else round_end_steps(args.workdir, config.distill.round_steps)
  for step in ends:
    models.append((f"student step {step}", step,
                   lambda s=step: checkpointing.restore_params(args.workdir, abstract, key=key,
                                                               step=s)))
  rows, heldout = [], []
  started = time.time()
  if args.heldout_batches and ends:
    pairs = []
    for step in ends:
      dt = distill.checkpoint_info(args.workdir, step)["distill_dt"]
      prev = [e for e in ends if e < step and e == step - config.distill.round_steps]
      if step > config.distill.round_steps and not prev:
        raise SystemExit(f"distill_table: --heldout_batches needs the checkpoint of step "
                         f"{step - config.distill.round_steps} (the round's teacher)")
      round_teacher = (checkpointing.restore_params(args.workdir, abstract, key="params",
                                                    step=prev[0]) if prev else
                       checkpointing.restore_params(teacher, abstract))
      pairs.append((models[ends.index(step) + 1][2](), round_teacher, dt))
    for step, (student_loss, teacher_loss) in zip(
        ends, heldout_losses(setup, pairs, args.heldout_batches, 32)):
      heldout.append(dict(checkpoint_step=step, student=student_loss, teacher=teacher_loss))
      print(f"held-out {config.distill.loss}, student step {step} ({args.params}): "
            f"{student_loss:.4f}; its round's teacher: {teacher_loss:.4f}", flush=True)
  for name, step, restore in models if steps else []:
    params = restore()
    info = distill.checkpoint_info(args.workdir, step, config) if step is not None else {}
    if info:
      name = (f"round {info['distill_round']} student "
              f"(for {info['distill_student_steps']:g} steps; step {step}; {args.params})")
    for s in steps:
      config.sample.steps = s
      t0 = time.time()
      m = evaluation.generation_metrics(setup, params, args.judge_workdir)
      rows.append(dict(model=name, checkpoint_step=step, S=s, gen_ppl=m["gen_ppl"],
                       gen_ppl_raw=m.get("gen_ppl_raw"), entropy=m["entropy"],
                       sampler=m["sampler"], samples=m["gen_num_samples"],
                       seconds=time.time() - t0, **info))
      print(f"{name} S={s}: gen_ppl {m['gen_ppl']:.2f} entropy {m['entropy']:.3f} "
            f"({time.time() - t0:.1f}s)", flush=True)
  total = time.time() - started
  out = args.out or os.path.join(args.workdir, "distill_table.json")
  with open(out, "w") as f:
    json.dump({"config": args.config or "WORKDIR/config.json", "workdir": os.path.abspath(args.workdir),
               "teacher_workdir": os.path.abspath(teacher),
               "judge_workdir": os.path.abspath(args.judge_workdir),
               "num_samples": args.num_samples, "seed": config.sample.seed, "seconds": total,
               "params": args.params, "heldout": heldout, "rows": rows}, f, indent=2)
  if not rows:
    print(f"\nwritten to {out}")
    return
  print(f"\ngen PPL ({rows[0]['sampler']}, {args.num_samples} samples per cell)\n")
  print(markdown(rows, "gen_ppl", steps, ".1f"))
  print("\nentropy (nats)\n")
  print(markdown(rows, "entropy", steps, ".3f"))
  print(f"\n{len(rows)} cells in {total:.0f}s; written to {out}")


if __name__ == "__main__":
  main()
