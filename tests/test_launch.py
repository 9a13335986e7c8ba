"""launch/tpu.sh and launch/slurm.sh: the --dry-run output is the exact commands."""
import os
import shlex
import subprocess

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO_ROOT, "launch", "tpu.sh")
SLURM = os.path.join(REPO_ROOT, "launch", "slurm.sh")
MAIN_ARGS = ["--config=configs/owt.py:pgm_6_6", "--workdir=gs://bucket/pgm 6_6"]


def run(script, *args, check=True):
  proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60,
                        cwd=REPO_ROOT, env=dict(os.environ, TMPDIR="/tmp"))
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def commands(output: str) -> list[list[str]]:
  """The '+ ...' lines of a dry run, split as the shell would."""
  return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def tpu(*args):
  return commands(run(TPU, "--dry-run", "--name=pgm", "--zone=us-central2-b", *args).stdout)


def test_tpu_create_and_delete():
  assert tpu("--type=v4-32", "--project=proj", "create") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "pgm", "--zone=us-central2-b",
      "--project=proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]
  assert tpu("delete") == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "pgm",
                            "--zone=us-central2-b", "--quiet"]]


def test_tpu_remote_commands_run_on_all_workers():
  for command in ("copy", "setup", "logs", "stop"):
    remote = [c for c in tpu(command) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
              or c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    assert remote, command
    for c in remote:
      assert "--worker=all" in c, (command, c)
  for bad in ("--worker=0", "--worker"):
    proc = run(TPU, "--dry-run", "--name=pgm", "--zone=z", bad, "run", check=False)
    assert proc.returncode == 2 and "all workers" in proc.stderr


def test_tpu_copy_and_setup():
  copy = tpu("copy")
  assert "git ls-files -z | tar --null -T - -czf /tmp/pgm_jax_src.tgz" in copy[0][-1] or \
      "git ls-files -z" in " ".join(copy[0])
  assert copy[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/pgm_jax_src.tgz",
                     "pgm:pgm_jax_src.tgz", "--zone=us-central2-b", "--worker=all"]
  assert "tar -xzf ~/pgm_jax_src.tgz -C ~/pgm_jax" in copy[2][-1]
  (setup,) = tpu("--jax=jax[tpu]==0.10.2", "setup")
  script = setup[-1].removeprefix("--command=")
  assert "test -x .venv/bin/python || python3 -m venv .venv" in script   # idempotent
  assert ".venv/bin/pip install -q -e . jax\\[tpu\\]==0.10.2" in script


def test_tpu_run_sets_distributed_and_quotes_args():
  (cmd,) = tpu("run", "--", *MAIN_ARGS)
  assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pgm", "--zone=us-central2-b",
                     "--worker=all"]
  remote = shlex.split(cmd[8].removeprefix("--command="))
  i = remote.index("PGM_JAX_DISTRIBUTED=1")
  assert remote[i + 1:i + 6] == ["nohup", ".venv/bin/python", "-m", "pgm_jax.main", MAIN_ARGS[0]]
  assert remote[i + 6] == MAIN_ARGS[1]        # the space survived the remote shell
  proc = run(TPU, "--dry-run", "--name=pgm", "--zone=z", "run", check=False)
  assert proc.returncode == 2 and "needs main.py flags" in proc.stderr


def test_tpu_requires_name_and_zone():
  proc = run(TPU, "--dry-run", "create", check=False)
  assert proc.returncode == 2 and "--name" in proc.stderr


@pytest.mark.parametrize("per,tasks,local_ids", [("gpu", "8", None),
                                                  ("node", "1", "0,1,2,3,4,5,6,7")])
def test_slurm_dry_run(per, tasks, local_ids):
  out = run(SLURM, "--dry-run", "--nodes=2", "--gpus-per-node=8", f"--per={per}",
            "--partition=gpu", "--job-name=owt", "--", *MAIN_ARGS).stdout
  lines = out.splitlines()
  script = os.path.join(REPO_ROOT, "launch", "slurm_owt.sbatch")
  assert lines[0] == f"# {script}" and lines[1] == "#!/bin/bash"
  for expected in ("#SBATCH --nodes=2", f"#SBATCH --ntasks-per-node={tasks}",
                   "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                   "export PGM_JAX_DISTRIBUTED=1"):
    assert expected in lines, expected
  srun = [shlex.split(l) for l in lines if l.startswith("srun ")]
  assert srun == [["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={tasks}",
                   os.path.join(REPO_ROOT, ".venv", "bin", "python"), "-m", "pgm_jax.main",
                   *MAIN_ARGS]]
  has_ids = [l for l in lines if l.startswith("export JAX_LOCAL_DEVICE_IDS=")]
  assert (has_ids[0].split()[1] == f"JAX_LOCAL_DEVICE_IDS={local_ids}") if local_ids \
      else not has_ids
  assert commands(out)[-1] == ["sbatch", script]
  assert not os.path.exists(script)           # a dry run writes nothing


def test_slurm_rejects_bad_input():
  assert run(SLURM, "--dry-run", "--", "x", check=True).returncode == 0
  proc = run(SLURM, "--dry-run", "--per=rack", "--", "x", check=False)
  assert proc.returncode == 2 and "--per" in proc.stderr
  proc = run(SLURM, "--dry-run", check=False)
  assert proc.returncode == 2 and "after --" in proc.stderr
