r"""What the reference-compatibility switches change (issue 19; docs/images.md and
docs/distillation.md quote its output).

images: the digits metrics of `--mode=eval` (`evaluation.images.sample_metrics`: 50 samples
per digit judged by the repo's classifier: class accuracy and FD) with and without
config.sample.reference_compat, over several sampling seeds (config.sample.seed): the PGM
with "registers_count" (halton and confidence), MaskGIT with "halton_redraw" (halton).

  python scripts/reference_compat_effects.py images --pgm=workdirs/digits_pgm \
      --maskgit=workdirs/digits_maskgit --steps=16 --cfg_w=0,2 --seeds=0,1,2

distill: the held-out SDTT loss (`distill.heldout_loss`: kl-bwd over the masked tokens of
validation batches, 2 teacher steps of size dt) of a student against a teacher, with
config.distill.normalizer "ours" and "reference", on the same batches, times, masks and
teacher noise. The student and teacher are two checkpoints (EMA weights) of a trained text
model, e.g. steps 500 and 250 of `configs/shakespeare.py:pgm`:

  python scripts/reference_compat_effects.py distill --config=shakespeare.py:distill_pgm \
      --student=workdirs/pgm/checkpoints/500 --teacher=workdirs/pgm/checkpoints/250 \
      --batches=8 --dt=0.0625,0.25

Both print a markdown table and write every row to --out (JSON).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from pgm_jax import experiment  # noqa: E402  pylint: disable=wrong-import-position


def load_config(spec: str):
  """'digits.py:pgm' -> configs/digits.py get_config('pgm') ('+' joins presets)."""
  name, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(name[:-3],
                                                       os.path.join(REPO, "configs", name))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg.replace("+", ",") or None)


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def images_main(args):
  from pgm_jax.evaluation import images  # pylint: disable=g-import-not-at-top
  runs = [("pgm", args.pgm, ("halton", "confidence"), "registers_count"),
          ("maskgit", args.maskgit, ("halton",), "halton_redraw")]
  rows = []
  for name, workdir, samplers, quirk in runs:
    if not workdir:
      continue
    config = load_config(f"digits.py:{name}")
    setup = experiment.make_setup(config)
    step, params = experiment.restore_eval_params(setup, workdir)
    for sampler in samplers:
      for w in [float(x) for x in args.cfg_w.split(",")]:
        for compat in ("", quirk):
          for seed in [int(x) for x in args.seeds.split(",")]:
            setup.config.sample.reference_compat = compat  # what generate_images reads
            setup.config.sample.seed = seed
            started = time.perf_counter()
            row = images.sample_metrics(setup, params, sampler=sampler, steps=args.steps,
                                        cfg_w=w)
            row.update(reference_compat=compat, seed=seed, checkpoint_step=step,
                       workdir=workdir, wall_s=time.perf_counter() - started)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "sampler", "steps", "cfg_w",
                                                  "reference_compat", "seed",
                                                  "sample_class_accuracy", "fd_classifier",
                                                  "wall_s")}), flush=True)
  lines = [f"seeds {args.seeds}, S = {args.steps}; mean (std over seeds)", "",
           "| model | sampler | CFG w | reference_compat | class acc. | FD (classifier) |",
           "|---|---|---|---|---|---|"]
  keys = dict.fromkeys((r["model"], r["sampler"], r["cfg_w"], r["reference_compat"])
                       for r in rows)
  for model, sampler, w, compat in keys:
    sel = [r for r in rows if (r["model"], r["sampler"], r["cfg_w"], r["reference_compat"])
           == (model, sampler, w, compat)]
    acc = _mean_std([r["sample_class_accuracy"] for r in sel])
    fd = _mean_std([r["fd_classifier"] for r in sel])
    lines.append(f"| {model} | {sampler} | {w:g} | {compat or '(off)'} | "
                 f"{acc[0]:.3f} ({acc[1]:.3f}) | {fd[0]:.2f} ({fd[1]:.2f}) |")
  print("\n".join(lines))
  return rows


def distill_main(args):
  import jax  # pylint: disable=g-import-not-at-top
  from pgm_jax import distill  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  from pgm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = load_config(args.config)
  config.distill.teacher_workdir = args.teacher
  setup = experiment.make_setup(config)
  abstract = setup.abstract_state.params
  student = checkpointing.restore_params(args.student, abstract, flag="--student")
  teacher = checkpointing.restore_params(args.teacher, abstract, flag="--teacher")
  batches = list(pipeline.build_eval_iterator(config.data, setup.tokenizer,
                                              batch_size=args.batch_size,
                                              max_batches=args.batches))
  rows = []
  # The token mass the reference leaves at a masked position, Z / (Z + 1) (1 for ours): the
  # student on the validation batches with every second token (a fixed draw) masked.
  mass_fn = jax.jit(lambda p, x, v: distill.log_probs(
      p, x, v, model=setup.model, mask_id=setup.mask_id, train=False, normalizer="reference"))
  missing = []
  for i, b in enumerate(batches):
    masked = np.random.default_rng(args.seed + i).random(b["tokens"].shape) < 0.5
    x = np.where(masked, setup.mask_id, b["tokens"])
    mass = np.exp(np.asarray(mass_fn(student, x, b["valid"]), np.float64)).sum(-1)
    missing.append((1.0 - mass)[masked & np.asarray(b["valid"], bool)])
  missing = np.concatenate(missing)
  print(json.dumps({"student_missing_mass_mean": float(missing.mean()),
                    "student_missing_mass_max": float(missing.max())}), flush=True)
  for dt in [float(x) for x in args.dt.split(",")]:
    for normalizer in ("ours", "reference"):
      cfg = config.copy_and_resolve_references()
      cfg.distill.normalizer = normalizer
      fn = jax.jit(lambda s, t, tok, val, d, rng, cfg=cfg: distill.heldout_loss(
          s, t, tok, val, d, rng, model=setup.model, config=cfg, mask_id=setup.mask_id))
      sums = np.zeros((2, 2))
      started = time.perf_counter()
      for i, b in enumerate(batches):
        rng = jax.random.fold_in(jax.random.key(args.seed), i)
        for j, params in enumerate((student, teacher)):
          total, count = fn(params, teacher, b["tokens"], b["valid"], dt, rng)
          sums[j] += (float(total), float(count))
      row = dict(dt=dt, normalizer=normalizer, student_loss=sums[0, 0] / sums[0, 1],
                 teacher_as_student_loss=sums[1, 0] / sums[1, 1], masked_tokens=sums[0, 1],
                 batches=len(batches), batch_size=args.batch_size,
                 wall_s=time.perf_counter() - started)
      rows.append(row)
      print(json.dumps(row), flush=True)
  lines = [f"student {args.student}, teacher {args.teacher}; {args.batches} validation "
           f"batches of {args.batch_size}, kl-bwd per masked token; the reference leaves "
           f"1 - Z / (Z + 1) = {missing.mean():.2e} (mean; max {missing.max():.2e}) of the "
           f"student's mass on MASK at a masked position", "",
           "| dt | normalizer | student loss | teacher-as-student loss |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['dt']:g} | {r['normalizer']} | {r['student_loss']:.5f} | "
                 f"{r['teacher_as_student_loss']:.5f} |")
  print("\n".join(lines))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="what", required=True)
  im = sub.add_parser("images")
  im.add_argument("--pgm", default=None, help="workdir of configs/digits.py:pgm")
  im.add_argument("--maskgit", default=None, help="workdir of configs/digits.py:maskgit")
  im.add_argument("--steps", type=int, default=16)
  im.add_argument("--cfg_w", default="0,2")
  im.add_argument("--seeds", default="0,1,2")
  im.add_argument("--out", default=None)
  di = sub.add_parser("distill")
  di.add_argument("--config", default="shakespeare.py:distill_pgm")
  di.add_argument("--student", required=True, help="workdir or step folder")
  di.add_argument("--teacher", required=True, help="workdir or step folder")
  di.add_argument("--batches", type=int, default=8)
  di.add_argument("--batch_size", type=int, default=32)
  di.add_argument("--dt", default="0.0625,0.25")
  di.add_argument("--seed", type=int, default=0)
  di.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = images_main(args) if args.what == "images" else distill_main(args)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
