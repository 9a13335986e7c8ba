r"""Command-line entry point.

  python -m pgm_jax.main --config=configs/shakespeare.py:pgm --workdir=/tmp/pgm
  python -m pgm_jax.main --config=configs/shakespeare.py:pgm --workdir=/tmp/pgm --mode=eval
  python -m pgm_jax.main --config=configs/owt.py:pgm_6_6 --workdir=gs://... \
      --config.opt.lr=3e-4

Set PGM_JAX_DISTRIBUTED=1 (the launch scripts do) to call
`jax.distributed.initialize()` on multi-host pods (cluster auto-detection). Or name the
coordinator explicitly (any cluster, or several processes on one machine):

  PGM_JAX_COORDINATOR=127.0.0.1:12345 PGM_JAX_NUM_PROCESSES=2 PGM_JAX_PROCESS_ID=0 \
      python -m pgm_jax.main ...    # and PGM_JAX_PROCESS_ID=1 in a second process

(CPU collectives then use gloo; tests/test_multiprocess.py runs this.)

Bad input is one line on stderr naming the flag, config key or file, exit 2 (a malformed
flag) or 1; an unforeseen error is one line too, with the path of a file holding the full
traceback (PGM_JAX_TRACEBACK=1 also prints it). `run(argv)` is the same command in the
calling process (tests, notebooks).
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from pgm_jax.core import cli

MODES = ("train", "eval", "sample", "bench", "plan", "harness")


def define_flags(flag_values=flags.FLAGS, sys_argv=None) -> None:
  """--config, --workdir and --mode on `flag_values` (the global absl FLAGS for
  `python -m pgm_jax.main`; a fresh FlagValues for each in-process `run`, whose argv
  config_flags reads the --config.* overrides from instead of sys.argv)."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with presets: configs/x.py:preset1,preset2.",
      lock_config=True, flag_values=flag_values, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.",
                      flag_values=flag_values)
  flags.DEFINE_enum(
      "mode", "train", list(MODES),
      "train: train (resuming from WORKDIR). eval: validation PPL of the latest checkpoint's "
      "EMA weights -> WORKDIR/eval.json. sample: config.sample.num_samples samples from the "
      "latest checkpoint -> WORKDIR/samples.jsonl (image configs: samples.png, one row per "
      "class, and samples.npz). bench: sampling throughput and FLOPs, PGM vs MDLM "
      "(configs/bench.py; image configs: PGM vs MaskGIT) -> WORKDIR/bench.json. plan: "
      "compile (not run) the train "
      "step on config.mesh.shape over config.plan.num_devices (virtual CPU devices if "
      "needed) -> per-device memory and FLOPs in WORKDIR/plan.json. harness: lm-evaluation-"
      "harness tasks (config.harness.*) on the latest checkpoint -> WORKDIR/harness.json.",
      flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags()


class _QuietLibraries:
  """Drops INFO records of chatty libraries (orbax, xla_bridge) from the log."""

  def filter(self, record):
    if record.levelno > 20:
      return True
    return not any(s in record.pathname for s in ("/orbax/", "xla_bridge", "/grain/"))


def init_distributed(env) -> None:
  """`jax.distributed.initialize` from environment variables (before any other JAX call).

  PGM_JAX_COORDINATOR=HOST:PORT with PGM_JAX_NUM_PROCESSES and PGM_JAX_PROCESS_ID: an
  explicit coordinator (process 0 serves it; bound to that address if it is a loopback one).
  Cross-process CPU collectives use gloo. Else PGM_JAX_DISTRIBUTED=1: auto-detection
  (Cloud TPU, SLURM, ...). Else a single process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  coordinator = env.get("PGM_JAX_COORDINATOR")
  if coordinator:
    try:
      num_processes = int(env["PGM_JAX_NUM_PROCESSES"])
      process_id = int(env["PGM_JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise ValueError("PGM_JAX_COORDINATOR needs integer PGM_JAX_NUM_PROCESSES and "
                       f"PGM_JAX_PROCESS_ID ({e!r})") from None
    if not 0 <= process_id < num_processes:
      raise ValueError(f"PGM_JAX_PROCESS_ID={process_id} must be in [0, "
                       f"PGM_JAX_NUM_PROCESSES={num_processes})")
    host = coordinator.rsplit(":", 1)[0].strip("[]")
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id,
                               coordinator_bind_address=coordinator if loopback else None)
  elif env.get("PGM_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def _run_mode(mode: str, config, workdir: str) -> None:
  from pgm_jax import evaluation, train  # pylint: disable=g-import-not-at-top
  from pgm_jax import families  # pylint: disable=g-import-not-at-top
  from pgm_jax import sample as generate  # pylint: disable=g-import-not-at-top
  if mode == "train":
    train.train_and_evaluate(config, workdir)
  elif mode == "eval":
    result = evaluation.evaluate(config, workdir)
    for name, r in result.get("zero_shot", {}).items():
      print(f"{name}: val_ppl={r['val_ppl']:.6f} ({int(r['val_tokens'])} tokens)")
    if "val_ppl" in result:
      print(f"val_ppl={result['val_ppl']:.6f}")
    for key in ("gen_ppl", "gen_ppl_raw", "entropy", "sample_class_accuracy", "fd_classifier",
                "classifier_accuracy", "fid", "inception_score", "images_per_s"):
      if key in result:
        print(f"{key}={result[key]:.6f}")
  elif mode == "sample" and families.of(config).is_image:
    info = generate.sample(config, workdir)
    print(" ".join(f"{k}={info[k]}" for k in ("png", "npz") if k in info))
  elif mode == "sample":
    for s in generate.sample(config, workdir)[:4]:
      print(f"--- sample {s['index']} ({s['sampler']}, {s['steps']} steps, seed {s['seed']})")
      print(s["text"])
  elif mode == "harness":
    from pgm_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
    summary = harness.run_harness(config, workdir)
    print(json.dumps(summary["results"], indent=2))
  elif mode == "plan":
    from pgm_jax.tools import plan  # pylint: disable=g-import-not-at-top
    plan.run_plan(config, workdir)
  else:
    from pgm_jax.tools import bench  # pylint: disable=g-import-not-at-top
    bench.run_bench(config, workdir)


def main(argv, flag_values=None):
  """The body of `python -m pgm_jax.main` once flags are parsed (absl `app.run`)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  if len(argv) > 1:
    cli.error_exit("pgm_jax", f"unexpected arguments {argv[1:]} (flags are --name=value)", 2)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  cli.guarded("pgm_jax", init_distributed, os.environ)
  from pgm_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())

  def load_config():
    try:
      config = fv["config"].value
      config.get("model")  # config files load lazily: surface a bad path here
      return config
    except Exception as e:  # pylint: disable=broad-except  # any error inside the file
      raise ValueError(f"--config: {cli.one_line(e)}") from None

  config = cli.guarded("pgm_jax", load_config)
  cli.guarded("pgm_jax", _run_mode, fv["mode"].value, config, fv["workdir"].value,
              expected=(train.NonFiniteLossError,))


def run(argv) -> None:
  """`python -m pgm_jax.main ARGV...` in this process (tests, notebooks): the same flags,
  the same one-line errors and exit codes (SystemExit), on a fresh set of flags."""
  argv = ["pgm_jax.main", *argv]
  fv = flags.FlagValues()
  define_flags(fv, sys_argv=argv)
  main(cli.flags_parser("pgm_jax", fv)(argv), fv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("pgm_jax"))
