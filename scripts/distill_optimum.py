"""What an SDTT round can gain at best: the teacher's one-step prediction against the optimum
of each distillation loss, on validation batches.

For a student that sees x_t, the optimum of the kl-bwd loss (KL(student || target)) over the
teacher's random 2-step targets is their normalised geometric mean; the optimum of kl-fwd is
their arithmetic mean. This script draws K targets per masked position (the teacher's
`config.distill.teacher_steps` steps of size dt from t, as `distill_step` does) and reports,
averaged over masked positions: the entropy of the teacher's own prediction (H_teacher), of
one target (H_target), of the two optima (H_kl_bwd_opt, H_kl_fwd_opt), and the NLL of the
true token under each (nll_*). A student can only gain if an optimum is sharper or more
accurate than the teacher.

  python scripts/distill_optimum.py --workdir=workdirs/distill_pgm --dt=0.0625,0.125,0.25
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from distill_table import load_config  # noqa: E402
from pgm_jax import distill, experiment, objectives  # noqa: E402
from pgm_jax.families.base import stratified_times  # noqa: E402
from pgm_jax.core import checkpointing
from pgm_jax.data import pipeline  # noqa: E402


def optimum_stats(setup, teacher, tokens_BxL, valid_BxL, rng, *, dt: float, draws: int):
  config = setup.config
  d = config.distill
  mask_id = setup.mask_id
  batch_size, seq_len = tokens_BxL.shape
  t_rng, noise_rng, draw_rng = jax.random.split(rng, 3)
  t_B = stratified_times(t_rng, batch_size, groups=1, sampling_eps=d.sampling_eps,
                               antithetic=True)
  masked = objectives.groups_from_uniform(
      jax.random.uniform(noise_rng, (batch_size, seq_len)), t_B).astype(bool)
  x_t = jnp.where(masked, mask_id, tokens_BxL)
  model_valid = None if config.data.get("attend_to_padding", False) else valid_BxL
  logp = lambda x, t: distill.log_probs(teacher, x, model_valid, model=setup.model,
                                        mask_id=mask_id,
                                        train=False, t_B=t)
  own = logp(x_t, t_B)

  def one_draw(key):
    target, _ = distill.teacher_targets(logp, x_t, t_B, dt, key, num_steps=d.teacher_steps,
                                        mask_id=mask_id, eps=d.sampling_eps)
    return target

  targets = jax.lax.map(one_draw, jax.random.split(draw_rng, draws))  # [K, B, L, V]
  bwd_opt = jax.nn.log_softmax(targets.mean(0), axis=-1)
  fwd_opt = jax.scipy.special.logsumexp(targets, axis=0) - jnp.log(draws)
  weight = (x_t == mask_id) & valid_BxL.astype(bool)
  mean = lambda v: jnp.sum(jnp.where(weight, v, 0.0)) / jnp.maximum(weight.sum(), 1)
  entropy = lambda lp: -jnp.sum(jnp.exp(lp) * lp, axis=-1)
  nll = lambda lp: mean(-jnp.take_along_axis(lp, tokens_BxL[..., None], -1)[..., 0])
  return dict(H_teacher=mean(entropy(own)), H_target=mean(jax.vmap(entropy)(targets).mean(0)),
              H_kl_bwd_opt=mean(entropy(bwd_opt)), H_kl_fwd_opt=mean(entropy(fwd_opt)),
              nll_teacher=nll(own), nll_kl_bwd_opt=nll(bwd_opt), nll_kl_fwd_opt=nll(fwd_opt))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a distillation workdir (its config)")
  parser.add_argument("--config", default=None, help="default: WORKDIR/config.json")
  parser.add_argument("--teacher_workdir", default=None,
                      help="default: config.distill.teacher_workdir")
  parser.add_argument("--dt", default="0.0625,0.125,0.25", help="step sizes to test")
  parser.add_argument("--draws", type=int, default=8, help="teacher draws per position")
  parser.add_argument("--batches", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)
  config = load_config(args.config, args.workdir)
  setup = experiment.make_setup(config)
  teacher = checkpointing.restore_params(args.teacher_workdir or config.distill.teacher_workdir,
                                         setup.abstract_state.params)
  batches = list(pipeline.build_eval_iterator(config.data, setup.tokenizer,
                                              batch_size=args.batch_size,
                                              max_batches=args.batches))
  for dt in (float(x) for x in args.dt.split(",")):
    fn = jax.jit(lambda tok, val, rng, dt=dt: optimum_stats(setup, teacher, tok, val, rng,
                                                             dt=dt, draws=args.draws))
    rows = [fn(b["tokens"], b["valid"], jax.random.key(i)) for i, b in enumerate(batches)]
    out = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    print(json.dumps({"dt": dt, **out}))


if __name__ == "__main__":
  main()
