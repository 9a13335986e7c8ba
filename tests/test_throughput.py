"""Training throughput reporting: train/mfu and train/tokens_per_s_per_chip, and the
jax.profiler trace of config.train.profile_steps."""
import glob
import json
import os

import pytest

from conftest import load_config
from pgm_jax import train
from pgm_jax.core import config_lib, throughput


def tiny_config(**train_overrides):
  cfg = load_config("shakespeare", "tiny")
  cfg.train.num_final_samples = 0
  cfg.train.eval_every = 1000
  cfg.eval.max_batches = 1
  cfg.ckpt.every_steps = 1000
  cfg.train.update(dict(num_steps=4, log_every=2, **train_overrides))
  return cfg


def train_rows(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "train/loss" in r]


def test_peak_table_and_mfu_arithmetic():
  assert throughput.peak_flops_per_chip("TPU v4") == 275e12
  assert throughput.peak_flops_per_chip("TPU v5 lite") == 197e12
  assert throughput.peak_flops_per_chip("TPU v5") == 459e12
  assert throughput.peak_flops_per_chip("TPU v6 lite") == 918e12
  assert throughput.peak_flops_per_chip("NVIDIA H100 80GB HBM3") == 989e12
  assert throughput.peak_flops_per_chip("NVIDIA H100 PCIe") == 756e12
  assert throughput.peak_flops_per_chip("NVIDIA H200") == 989e12
  assert throughput.peak_flops_per_chip("NVIDIA A100-SXM4-80GB") == 312e12
  assert throughput.peak_flops_per_chip("cpu") is None
  assert throughput.peak_flops_per_chip("TPU v7x") is None
  assert throughput.peak_flops_per_chip("cpu", override=1e12) == 1e12
  # 8 chips of a faked 100 TFLOP/s kind, 2 steps/s of 200 TFLOPs each: 400 / 800 = 50%.
  assert throughput.mfu(200e12, 2.0, 100e12, 8) == pytest.approx(0.5)


@pytest.mark.parametrize("value", [(3, 2), (0, 2), (1,), (1, 2, 3), (1.5, 2), ("a", "b")])
def test_bad_profile_steps_is_one_line_naming_the_key(value):
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.train.profile_steps = value
  with pytest.raises(ValueError, match=r"^config\.train\.profile_steps=") as e:
    config_lib.profile_window(cfg.train)
  assert "\n" not in str(e.value)


def test_profile_window_and_peak_override_checks():
  cfg = tiny_config()
  assert config_lib.profile_window(cfg.train) is None        # the default: off
  cfg.train.profile_steps = (2, 3)
  assert config_lib.profile_window(cfg.train) == (2, 3)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match=r"^config\.train\.peak_flops_per_chip="):
      throughput.check_peak_override(bad)


@pytest.mark.slow
def test_tiny_run_profiles_and_reports_throughput(tmp_path):
  # On CPU: no peak is known, so no mfu; tokens/s per chip is still there. Steps 2..3 traced.
  workdir = str(tmp_path / "profiled")
  train.train_and_evaluate(tiny_config(profile_steps=(2, 3)), workdir)
  traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*",
                                  "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [2, 4]
  assert all(r["train/tokens_per_s_per_chip"] > 0 and "train/mfu" not in r for r in rows)
  # A peak override gives mfu = analytic FLOPs/step * steps/s / (peak * chips).
  workdir = str(tmp_path / "peak")
  cfg = tiny_config(peak_flops_per_chip=1e9)
  train.train_and_evaluate(cfg, workdir)
  rows = train_rows(workdir)
  assert not os.path.isdir(os.path.join(workdir, "tensorboard", "plugins"))  # not profiled
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  setup = experiment.make_setup(cfg)
  flops = setup.family.train_flops(setup.model_cfg, setup.abstract_state.params,
                                   cfg.train.batch_size, cfg.data.seq_len)["total"]
  for r in rows:
    assert r["train/mfu"] == pytest.approx(
        flops * r["train/steps_per_s"] / (1e9 * setup.mesh.size), rel=1e-5)


@pytest.mark.slow
@pytest.mark.subprocess
def test_device_check_smoke_runs_every_section(tmp_path):
  """scripts/device_check.sh --smoke on CPU (interpret mode, tiny sizes): every section
  runs and the summary names the device kind."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  out = tmp_path / "device_check"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO_ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
  res = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "device_check.sh"), str(out),
                        "--smoke"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  summary = json.loads((out / "device_check.json").read_text())
  assert summary["device"]["device_kind"] == jax_device_kind()
  assert {k: v["status"] for k, v in summary["sections"].items()} == {
      k: "ok" for k in ("kernel", "train_step", "block_sweep", "sampler", "mfu")}
  assert all(r["pass"] for r in summary["sections"]["kernel"]["masks"].values())
  assert set(summary["sections"]["train_step"]["variants"]) == {"xla", "pallas", "pallas_sorted"}
  assert summary["sections"]["mfu"]["variants"]["xla"]["mfu"] is None  # CPU: no peak
  assert (out / "sampler_bench" / "bench.json").is_file()
  assert "# Device check: cpu" in (out / "device_check.md").read_text()


def jax_device_kind():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0].device_kind
