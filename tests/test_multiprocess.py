"""Multi-host for real: 2 processes x 2 CPU devices (one global mesh of 4) on localhost.

The CLI runs in 2 processes (`jax.distributed` with a coordinator on a free loopback port,
gloo CPU collectives; PGM_JAX_COORDINATOR / PGM_JAX_NUM_PROCESSES / PGM_JAX_PROCESS_ID)
on the tiny config with config.mesh.shape=(1, 2, 2): `fsdp` spans the two processes (each
holds half of most parameters), `tensor` is inside a process. One workdir goes through

  A. train; once a checkpoint exists, SIGKILL both processes;
  B. resume; SIGTERM to process 1 only -> both save the same step and exit 0;
  C. resume to step N, validation PPL at N and 2 samples (every process runs eval and the
     sampler; process 0 writes).

The reference is one process with 4 virtual devices and the same mesh shape, trained
straight to N by the train library, fed the same global batches: its input pipeline is
the two per-host Grain shards concatenated (what `make_array_from_process_local_data`
assembles from the two hosts). The same child also runs `config.ckpt.restore_from` and
`config.ckpt.init_params_from` on its 4-device mesh.

Tolerance: rtol 1e-6. Same programs on the same mesh, same data; the only difference is
how cross-process all-reduces run (gloo between the processes vs XLA's in-process CPU
collectives): partial sums of more than two devices may be added in another order, a float32
rounding difference. Observed: losses, grad norms and val PPL bitwise equal; a few parameter
elements differ by an ulp or so after 12 steps (max |diff| / max |leaf| 3.3e-7). Logged
losses / grad norms / val PPL: rtol 1e-6; every parameter / EMA / optimizer leaf at N: rtol
1e-6 plus atol 1e-6 x the leaf's largest magnitude; sample texts and tokens: exact.
restore_from and init_params_from (one process, no gloo) are compared exactly.
"""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

MESH = (1, 2, 2)
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
CKPT_EVERY = 2
N = 12         # final step: A is killed at its first checkpoint, B stops 1-3 steps after it
TIMEOUT = 400  # seconds, per phase
RTOL = 1e-6


def overrides(num_steps: int, eval_every: int = 100_000, **extra) -> dict:
  # 31 sampling steps for 31 unknown tokens: one sampler program (one token per step).
  ov = {"train.num_steps": num_steps, "train.log_every": 1, "train.eval_every": eval_every,
        "ckpt.every_steps": CKPT_EVERY, "mesh.shape": MESH, "sample.steps": 31}
  ov.update({k.replace("__", "."): v for k, v in extra.items()})
  return ov


def make_config(ov: dict):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  cfg = load_config("shakespeare", "tiny")
  for key, value in ov.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def cli_args(ov: dict) -> list:
  def fmt(v):
    return "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in ov.items()]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_rows(workdir: str) -> list:
  rows = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path, encoding="utf-8"):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut by SIGKILL
        pass
  return rows


def saved_steps(workdir: str) -> list:
  """Finalised checkpoint steps (Orbax renames a step's temporary folder when done)."""
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints",
                                                                         "*"))
                if os.path.basename(p).isdigit())


# ----------------------------------------------------------------------------- child
class _TwoHosts:
  """Both hosts' Grain iterators in one process: their batches concatenated in process
  order (rows of process 0 first, as `make_array_from_process_local_data` lays them out
  over a mesh whose devices are ordered by process)."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:  # Grain's checkpoint handler takes bytes from non-Grain
    return json.dumps({"hosts": [it.get_state() for it in self.iterators]}).encode()

  def set_state(self, state: bytes):
    for it, s in zip(self.iterators, json.loads(state)["hosts"]):
      it.set_state(s)

  def start_prefetch(self):
    for it in self.iterators:
      getattr(it, "start_prefetch", lambda: None)()


def _reference(out_dir: str, n: int) -> None:
  """1 process, 4 devices, the 2-host input pipeline; trains straight to n; then
  restore_from and init_params_from on the same 4-device mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  from pgm_jax import train  # pylint: disable=g-import-not-at-top
  from pgm_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 1 and jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
  build_train, build_eval = input_pipeline.build_train_iterator, input_pipeline.build_eval_iterator

  def two_hosts(build):
    def wrapped(*args, process_index=0, process_count=1, **kwargs):
      assert (process_index, process_count) == (0, 1)
      return _TwoHosts([build(*args, process_index=i, process_count=NUM_PROCESSES, **kwargs)
                        for i in range(NUM_PROCESSES)])
    return wrapped

  input_pipeline.build_train_iterator = two_hosts(build_train)
  input_pipeline.build_eval_iterator = two_hosts(build_eval)
  ref = os.path.join(out_dir, "ref")
  train.train_and_evaluate(make_config(overrides(n, eval_every=n)), ref)
  # restore_from (full state + data position) must continue exactly like resuming `ref`.
  cont = os.path.join(out_dir, "continued")
  shutil.copytree(ref, cont)
  quick = dict(train__num_final_samples=0)
  train.train_and_evaluate(make_config(overrides(n + 1, **quick)), cont)
  train.train_and_evaluate(make_config(overrides(n + 1, ckpt__restore_from=ref, **quick)),
                           os.path.join(out_dir, "restore_from"))
  # init_params_from: params = ref's EMA weights, a fresh optimizer. The first update is 0
  # (the warmup starts at lr 0), so after step 1 the params are still exactly those read.
  train.train_and_evaluate(make_config(overrides(1, ckpt__init_params_from=ref, **quick)),
                           os.path.join(out_dir, "init_params_from"))


# ----------------------------------------------------------------------------- driver
def _die_with_parent():
  """Children get SIGKILL if the test process dies (Linux), so none outlives a timeout."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("PGM_JAX_")}
  env.update(JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.join(REPO_ROOT, "tests") + os.pathsep + REPO_ROOT, **extra)
  return env


class _Job:
  """The CLI in NUM_PROCESSES processes sharing one coordinator."""

  def __init__(self, base, name, workdir, ov, cache_dir):
    port = free_port()
    self.logs = [os.path.join(base, f"{name}_{i}.log") for i in range(NUM_PROCESSES)]
    self.procs = []
    for i in range(NUM_PROCESSES):
      env = _env(PGM_JAX_COORDINATOR=f"127.0.0.1:{port}",
                 PGM_JAX_NUM_PROCESSES=str(NUM_PROCESSES), PGM_JAX_PROCESS_ID=str(i),
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
                 # Phases B and C reuse A's compiled programs (2 loaded cores).
                 JAX_COMPILATION_CACHE_DIR=cache_dir,
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "pgm_jax.main", "--config=configs/shakespeare.py:tiny",
             f"--workdir={workdir}", *cli_args(ov)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent))

  def log(self, i) -> str:
    with open(self.logs[i], encoding="utf-8", errors="replace") as f:
      return f.read()

  def check_alive(self):
    for i, p in enumerate(self.procs):
      if p.poll() is not None:
        self.kill()
        pytest.fail(f"process {i} exited early ({p.returncode}):\n{self.log(i)[-4000:]}")

  def wait(self, timeout=TIMEOUT) -> list:
    deadline = time.time() + timeout
    for i, p in enumerate(self.procs):
      try:
        p.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"process {i} timed out:\n{self.log(i)[-4000:]}")
    return [p.returncode for p in self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _until(condition, job, timeout=TIMEOUT, what=""):
  deadline = time.time() + timeout
  while not condition():
    job.check_alive()
    if time.time() > deadline:
      job.kill()
      pytest.fail(f"timed out waiting for {what}:\n{job.log(0)[-4000:]}")
    time.sleep(0.2)


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    return hasattr(_jax, "make_gloo_tcp_collectives")
  except ImportError:
    return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  base = str(tmp_path_factory.mktemp("multiprocess"))
  workdir, cache = os.path.join(base, "mp"), os.path.join(base, "jax_cache")
  started = time.time()
  out = {"base": base, "workdir": workdir, "n": N, "seconds": {}}
  # The reference (1 process, 4 devices) runs meanwhile; its own compilation cache lets its
  # four train_and_evaluate calls share one train-step compilation.
  ref_log = os.path.join(base, "reference.log")
  with open(ref_log, "w") as log:
    ref = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), base, str(N)], cwd=REPO_ROOT, stdout=log,
        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count="
                 f"{NUM_PROCESSES * LOCAL_DEVICES}",
                 JAX_COMPILATION_CACHE_DIR=os.path.join(base, "jax_cache_ref"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"))
  try:
    _multiprocess_phases(base, workdir, cache, out, started)
    ref.wait(timeout=TIMEOUT)
  finally:
    if ref.poll() is None:
      ref.kill()
      ref.wait()
  with open(ref_log, encoding="utf-8") as f:
    assert ref.returncode == 0, f.read()[-6000:]
  out["seconds"]["total"] = time.time() - started
  print(f"multiprocess runs: {out['seconds']}; killed at checkpoint {out['killed_at']}, "
        f"SIGTERM stop at {out['stopped_at']}, N={N}")
  return out


def _multiprocess_phases(base, workdir, cache, out, started):

  # A: train; SIGKILL both processes once a checkpoint is on disk.
  job = _Job(base, "A", workdir, overrides(100_000), cache)
  _until(lambda: saved_steps(workdir), job, what="a first checkpoint")
  for p in job.procs:
    p.send_signal(signal.SIGKILL)
  job.wait()
  out["killed_at"] = saved_steps(workdir)[-1]
  out["seconds"]["A"] = time.time() - started
  out["logged_before_kill"] = max(r["step"] for r in read_rows(workdir) if "train/loss" in r)

  # B: resume; SIGTERM to process 1 only, once B has logged a step of its own.
  rows_before = len(read_rows(workdir))
  job = _Job(base, "B", workdir, overrides(100_000), cache)
  _until(lambda: any("train/loss" in r for r in read_rows(workdir)[rows_before:]), job,
         what="training to resume")
  job.procs[1].send_signal(signal.SIGTERM)
  out["B_returncodes"] = job.wait()
  out["B_logs"] = [job.log(i) for i in range(NUM_PROCESSES)]
  out["B_resumed_from"] = min(r["step"] for r in read_rows(workdir)[rows_before:]
                              if "train/loss" in r) - 1
  out["stopped_at"] = saved_steps(workdir)[-1]
  out["seconds"]["A+B"] = time.time() - started
  assert out["stopped_at"] < N - 1, f"stopped at {out['stopped_at']}: raise N"

  # C: resume and finish at N (val PPL and samples at N).
  job = _Job(base, "C", workdir, overrides(N, eval_every=N), cache)
  out["C_returncodes"] = job.wait()
  out["C_logs"] = [job.log(i) for i in range(NUM_PROCESSES)]
  out["seconds"]["A+B+C"] = time.time() - started


_SETUP = []


def flat_state(workdir: str, step: int) -> dict:
  """The checkpoint at `step`, restored on this process's single device."""
  import jax  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import checkpointing
  if not _SETUP:
    _SETUP.append(experiment.make_setup(make_config(overrides(1, mesh__shape=(1, 1, 1)))))
  setup = _SETUP[0]
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), read_only=True)
  try:
    state, _ = checkpointing.restore(manager, step, setup.abstract_state)
  finally:
    manager.close()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  path_str = checkpointing._path_str  # pylint: disable=protected-access
  return {path_str(p): np.asarray(v) for p, v in leaves}


def assert_states_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key, value in a.items():
    np.testing.assert_array_equal(value, b[key], err_msg=key)


def max_rel_diff(a: dict, b: dict) -> float:
  """Largest |a - b| over a leaf, relative to that leaf's largest magnitude."""
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) /
             max(float(np.max(np.abs(b[k]))), 1e-30) for k in a if a[k].size)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_sigkill_then_sigterm_to_one_process(runs):
  assert runs["killed_at"] >= CKPT_EVERY
  # B really resumed from the SIGKILLed run's last checkpoint.
  assert runs["B_resumed_from"] == runs["killed_at"]
  assert runs["B_returncodes"] == [0, 0], runs["B_logs"][1][-3000:]
  stopped = []
  for log in runs["B_logs"]:
    lines = [l for l in log.splitlines() if "after SIGTERM; checkpoint saved" in l]
    assert len(lines) == 1, log[-3000:]
    stopped.append(int(lines[0].split("Stopped at step ")[1].split()[0]))
  assert stopped[0] == stopped[1] == runs["stopped_at"] > runs["killed_at"]
  assert "SIGTERM received" in runs["B_logs"][1] and "SIGTERM received" not in runs["B_logs"][0]
  assert runs["C_returncodes"] == [0, 0], runs["C_logs"][0][-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_two_processes_match_one_process(runs):
  n, mp, ref = runs["n"], runs["workdir"], os.path.join(runs["base"], "ref")
  ref_rows, mp_rows = read_rows(ref), read_rows(mp)
  ref_train = {r["step"]: r for r in ref_rows if "train/loss" in r}
  assert sorted(ref_train) == list(range(1, n + 1))
  mp_train = [r for r in mp_rows if "train/loss" in r]
  # Every step was logged (any logged after the SIGKILLed checkpoint twice: before the kill
  # and after the resume) and matches the reference.
  assert {r["step"] for r in mp_train} == set(ref_train)
  for r in mp_train:
    for key in ("train/loss", "train/nll", "train/grad_norm"):
      np.testing.assert_allclose(r[key], ref_train[r["step"]][key], rtol=RTOL,
                                 err_msg=f"{key} at step {r['step']}")
  ref_val = [r for r in ref_rows if "val/ppl" in r]
  mp_val = [r for r in mp_rows if "val/ppl" in r]
  assert [r["step"] for r in mp_val] == [r["step"] for r in ref_val] == [n]
  np.testing.assert_allclose(mp_val[0]["val/ppl"], ref_val[0]["val/ppl"], rtol=RTOL)
  # Samples (efficient PGM sampler on the 2-process mesh), written by process 0.
  name = f"samples_step{n}.txt"
  with open(os.path.join(mp, name)) as a, open(os.path.join(ref, name)) as b:
    text = a.read()
    assert text == b.read() and text.count("=== sample") == 2
  # Final state: params, EMA, optimizer state, step.
  assert saved_steps(mp)[-1] == saved_steps(ref)[-1] == n
  got, want = flat_state(mp, n), flat_state(ref, n)
  assert sorted(got) == sorted(want)
  print(f"final state: max |diff| / max |leaf| = {max_rel_diff(got, want):.2e}")
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=RTOL,
                               atol=RTOL * float(np.max(np.abs(value), initial=0.0)),
                               err_msg=key)
  # Each process saved its own Grain iterator position; the reference's halves match.
  ref_data = json.load(open(glob.glob(os.path.join(ref, "checkpoints", str(n), "data",
                                                   "*.json"))[0]))
  for i in range(NUM_PROCESSES):
    path = os.path.join(mp, "checkpoints", str(n), "data",
                        f"process_{i}-of-{NUM_PROCESSES}.json")
    assert json.load(open(path)) == ref_data["hosts"][i]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_restore_from_on_a_multi_device_mesh(runs):
  n, base = runs["n"], runs["base"]
  rows = [r for r in read_rows(os.path.join(base, "restore_from")) if "train/loss" in r]
  assert [r["step"] for r in rows] == [n + 1]        # started from ref's step n
  assert_states_equal(flat_state(os.path.join(base, "restore_from"), n + 1),
                      flat_state(os.path.join(base, "continued"), n + 1))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_init_params_from_on_a_multi_device_mesh(runs):
  n, base = runs["n"], runs["base"]
  wd = os.path.join(base, "init_params_from")
  rows = [r for r in read_rows(wd) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["train/loss"])
  assert rows[0]["train/learning_rate"] == 0.0       # warmup: the first update is zero
  got, src = flat_state(wd, 1), flat_state(os.path.join(base, "ref"), n)
  for key, value in got.items():
    if key.startswith("params/"):                    # the source's EMA weights
      np.testing.assert_array_equal(value, src["ema_params/" + key[len("params/"):]],
                                    err_msg=key)
  counts = [v for k, v in got.items() if k.startswith("opt_state/") and k.endswith("count")]
  assert counts and all(int(c) == 1 for c in counts)  # a fresh optimizer, one update


def test_explicit_coordinator_needs_process_count_and_id():
  from pgm_jax import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="PGM_JAX_NUM_PROCESSES"):
    main.init_distributed({"PGM_JAX_COORDINATOR": "127.0.0.1:1"})
  with pytest.raises(ValueError, match="PGM_JAX_PROCESS_ID=2"):
    main.init_distributed({"PGM_JAX_COORDINATOR": "127.0.0.1:1", "PGM_JAX_NUM_PROCESSES": "2",
                           "PGM_JAX_PROCESS_ID": "2"})


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_sigterm_to_one_process_stops_the_final_samples_of_both(tmp_path):
  """The final samples are collective: a SIGTERM that reaches one process during them stops
  both at the same sampler step (they agree at each step), exit 0, no samples written, the
  checkpoint kept. Before, the signalled process went on to the end (should_stop was off
  with several processes)."""
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  base, workdir = str(tmp_path), str(tmp_path / "wd")
  # 2 steps, then 400 samples one at a time: minutes of sampling unless the stop works.
  ov = overrides(2, train__num_final_samples=400, sample__batch_size=1)
  job = _Job(base, "final", workdir, ov, str(tmp_path / "jax_cache"))
  _until(lambda: "Final samples: 400" in job.log(1), job, what="the final samples")
  time.sleep(3)                                            # some sampler steps in
  job.procs[1].send_signal(signal.SIGTERM)
  assert job.wait(timeout=120) == [0, 0], [job.log(i)[-3000:] for i in range(NUM_PROCESSES)]
  where = [[l.split("SIGTERM during the final samples: ")[1].split(";")[0]
            for l in job.log(i).splitlines() if "SIGTERM during the final samples: " in l]
           for i in range(NUM_PROCESSES)]
  assert where[0] == where[1] and len(where[0]) == 1, where    # both at the same check
  assert where[0][0].startswith("stopped "), where
  assert not glob.glob(os.path.join(workdir, "samples_step*"))
  assert saved_steps(workdir) == [2]


def _restore_child(directory: str, bad_steps: str) -> None:
  """One process of the restore agreement test: saves steps 2 and 4 of a small replicated
  tree; process 1 then fails to restore `bad_steps` (comma-separated, or "all"), as a
  host whose local copy is damaged would, and restore_latest runs on both processes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from pgm_jax import main  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import checkpointing  # pylint: disable=g-import-not-at-top
  main.init_distributed(os.environ)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  manager = checkpointing.make_manager(directory)
  for step in (2, 4):
    value = np.full((4,), float(step), np.float32)
    tree = {"w": jax.make_array_from_callback((4,), replicated, lambda index: value[index])}
    checkpointing.save(manager, step, tree, wait=True)
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated)}
  kind, _, which = bad_steps.partition(":")
  bad = lambda step: which == "all" or str(step) in which.split(",")
  if jax.process_index() == 1 and kind == "read":      # fails before Orbax's restore barrier
    real_restore = checkpointing.restore

    def restore(mgr, step, *args, **kwargs):
      if bad(step):
        raise OSError(f"step {step} is damaged on this host")
      return real_restore(mgr, step, *args, **kwargs)

    checkpointing.restore = restore
  if jax.process_index() == 1 and kind == "checksum":  # this host's copy differs
    real_verify = checkpointing.verify_checksums

    def verify_checksums(step_dir):
      if bad(os.path.basename(os.fspath(step_dir))):
        raise checkpointing.ChecksumError(f"{step_dir} differs on this host")
      return real_verify(step_dir)

    checkpointing.verify_checksums = verify_checksums
  try:
    step, state, _ = checkpointing.restore_latest(manager, abstract, move_bad=True)
    print(f"RESULT restored {step} {float(np.asarray(state['w'].addressable_data(0))[0])}",
          flush=True)
  except ValueError as e:
    print(f"RESULT error {e}", flush=True)
  manager.close()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
@pytest.mark.parametrize("bad_steps", ["read:4", "read:all", "checksum:4", "checksum:all"])
def test_processes_agree_on_the_restored_step_or_all_fail(tmp_path, bad_steps):
  """Process 1 alone cannot restore step 4 (a read error before Orbax's restore barrier, or
  checksums that differ on its host): both restore step 2 and quarantine 4. Or process 1
  restores no kept step: every process stops with an error. No process waits for the
  others forever (the second case hung before)."""
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  port, directory = free_port(), str(tmp_path / "checkpoints")
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "restore", directory, bad_steps],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      preexec_fn=_die_with_parent,
      env=_env(PGM_JAX_COORDINATOR=f"127.0.0.1:{port}", PGM_JAX_NUM_PROCESSES="2",
               PGM_JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a process hung in restore_latest:\n" + "\n".join(
          q.communicate()[0][-3000:] for q in procs))
  assert [p.returncode for p in procs] == [0, 0], outputs
  results = [[l[len("RESULT "):] for l in out.splitlines() if l.startswith("RESULT ")]
             for out in outputs]
  assert all(len(r) == 1 for r in results), outputs
  (first,), (second,) = results
  if bad_steps.endswith(":4"):
    assert first == second == "restored 2 2.0", outputs
    assert sorted(os.listdir(tmp_path / "corrupt_checkpoints")) == ["4"]
    assert sorted(os.listdir(directory)) == ["2"]
  else:
    for result in (first, second):                       # the same decision everywhere
      assert result.startswith(f"error --workdir: no checkpoint in {directory} restores "
                               "(step 4: "), outputs
    assert "step 2: does not restore on another process" in first or "step 2: damaged as " \
        "another process reads it" in first, first
    assert "differs on this host" in second or "is damaged on this host" in second, second
    assert sorted(os.listdir(directory)) == ["2", "4"]         # nothing moved or deleted


class _FakeExtractor:
  """Stands in for the Inception net (what is under test is how the images are split and
  the features gathered): deterministic per-image features from the pixels."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def features(images):
      x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
      reps = -(-2048 // x.shape[1])                      # per image: no batch mixing
      pool = jnp.sin(jnp.arange(1, 2049, dtype=jnp.float32)[None] * x[:, :1]
                     + jnp.tile(x, (1, reps))[:, :2048])
      return pool, pool[:, :1008] * 3.0

    self._fn = jax.jit(features)

  def __call__(self, images):
    return self._fn(images)


def _data_parallel_child(out_path: str, mesh: str) -> None:
  """Sampling (text PGM / MDLM / AR, image PGM with guidance, MaskGIT), gen PPL and FID on
  `mesh` over every device of every process, from parameters that are the same whatever
  the mesh (init and a perturbation with fixed keys). Process 0 writes the results, and
  each process the shard shapes its devices held."""
  import jax  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment, main, sample  # pylint: disable=g-import-not-at-top
  from pgm_jax.evaluation import fid, judges  # pylint: disable=g-import-not-at-top
  from pgm_jax.samplers import common  # pylint: disable=g-import-not-at-top
  if os.environ.get("PGM_JAX_COORDINATOR"):
    main.init_distributed(os.environ)
  shape = tuple(int(x) for x in mesh.split(","))
  devices = jax.devices()[:int(np.prod(shape))]
  shards = []
  real_put = common.device_put_fn

  def spying_put(params, batch=None):
    put = real_put(params, batch)

    def wrapped(x):
      y = put(x)
      if np.ndim(x) >= 2 and hasattr(y, "addressable_shards"):
        shards.append([list(np.shape(x))] + [list(s.data.shape) for s in y.addressable_shards])
      return y
    return wrapped

  import pgm_jax.samplers.pgm, pgm_jax.samplers.mdlm, pgm_jax.samplers.ar  # pylint: disable=g-import-not-at-top,multiple-imports
  import pgm_jax.samplers.image  # pylint: disable=g-import-not-at-top
  for module in (pgm_jax.samplers.pgm, pgm_jax.samplers.mdlm, pgm_jax.samplers.ar,
                 pgm_jax.samplers.image):
    module.device_put_fn = spying_put

  def setup_and_params(name, preset, kind=None):
    cfg = load_config(name, preset)
    if kind:
      cfg.model.kind = kind
    cfg.model.dtype = "float32"
    cfg.mesh.shape = shape
    cfg.sample.batch_size = 8
    setup = experiment.make_setup(cfg, devices)
    # Random N(0, 0.3^2) parameters drawn on the host (the same on every process and mesh),
    # laid out as training would.
    abstract = setup.abstract_state.params
    leaves, treedef = jax.tree.flatten(abstract)
    values = [0.3 * np.random.default_rng(i).standard_normal(x.shape).astype(x.dtype)
              for i, x in enumerate(leaves)]
    shardings = jax.tree.leaves(setup.state_shardings.params)
    params = treedef.unflatten([
        jax.make_array_from_callback(v.shape, s, lambda index, v=v: v[index])
        for v, s in zip(values, shardings)])
    return setup, params

  out = {"samples": {}, "process": jax.process_index()}
  for kind in ("pgm", "mdlm", "ar"):
    setup, params = setup_and_params("shakespeare", "tiny", kind)
    rows = sample.generate_samples(setup, params, num_samples=8, num_steps=8, seed=0)
    out["samples"][kind] = [r["tokens"] for r in rows]
    if kind == "ar":
      judge = judges.ARJudge.from_setup(setup, params)
      out["gen_ppl"] = judge.score_texts([r["text"] for r in rows], batch_size=8)["gen_ppl"]
      out["gen_ppl_uneven"] = judge.score_texts([r["text"] for r in rows[:5]],
                                                batch_size=6)["gen_ppl"]
  for preset in ("pgm,tiny", "maskgit,tiny"):
    setup, params = setup_and_params("digits", preset)
    tokens = sample.generate_images(setup, params, np.arange(8) % 10, num_steps=8, seed=0,
                                    cfg_w=1.5)
    out["samples"][preset] = np.asarray(tokens).tolist()
  images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), np.uint8)
  ref = (np.zeros(2048), np.eye(2048))
  scores = fid.fid_and_is(images, ref, "unused", batch_size=4, splits=2,
                          extractor=_FakeExtractor(), split_across_processes=True)
  out["fid"], out["inception_score"] = scores["fid"], scores["inception_score"]
  out["shards"] = shards
  with open(f"{out_path}.{jax.process_index()}.json", "w") as f:
    json.dump(out, f)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_sampling_gen_ppl_and_fid_are_data_parallel_and_equal_one_device(tmp_path):
  """On 2 processes x 2 devices (mesh (2,2,1): data x fsdp = 4) every sampler batch of 8
  is split 2 rows per device; the samples (text PGM, MDLM, AR; image PGM with guidance;
  MaskGIT), gen PPL (the judge pass, also with a batch the devices do not divide) and FID /
  IS (Inception on each process's share of every batch) equal one process with 4 devices
  and one process with 1 device."""
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  port, base = free_port(), str(tmp_path / "dp")
  runs = {"2x2": [dict(PGM_JAX_COORDINATOR=f"127.0.0.1:{port}", PGM_JAX_NUM_PROCESSES="2",
                       PGM_JAX_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_"
                       "device_count=2") for i in range(2)],
          "1x4": [dict(XLA_FLAGS="--xla_force_host_platform_device_count=4")],
          "1x1": [dict()]}
  meshes = {"2x2": "2,2,1", "1x4": "2,2,1", "1x1": "1,1,1"}
  procs = {}
  for name, envs in runs.items():
    procs[name] = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "data_parallel", f"{base}_{name}",
         meshes[name]], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, preexec_fn=_die_with_parent, env=_env(**env)) for env in envs]
  for name, group in procs.items():
    for p in group:
      try:
        log = p.communicate(timeout=TIMEOUT)[0]
      except subprocess.TimeoutExpired:
        for q in (q for g in procs.values() for q in g):
          q.kill()
        pytest.fail(f"{name} timed out")
      assert p.returncode == 0, f"{name}:\n{log[-4000:]}"
  got = {name: [json.load(open(f"{base}_{name}.{i}.json")) for i in range(len(envs))]
         for name, envs in runs.items()}
  one = got["1x1"][0]
  for name in ("2x2", "1x4"):
    for result in got[name]:
      assert result["samples"] == one["samples"], name        # token for token
      np.testing.assert_allclose(result["gen_ppl"], one["gen_ppl"], rtol=1e-6)
      np.testing.assert_allclose(result["gen_ppl_uneven"], one["gen_ppl_uneven"], rtol=1e-6)
      np.testing.assert_allclose(result["fid"], one["fid"], rtol=1e-9)
      np.testing.assert_allclose(result["inception_score"], one["inception_score"], rtol=1e-9)
  # Each device held a quarter of every batch of 8 (2 rows) of every [B, L] sampler input.
  for result in got["2x2"]:
    assert result["shards"], "no sampler input was recorded"
    for full, *local in result["shards"]:
      assert full[0] == 8 and len(local) == 2, (full, local)   # 2 devices per process
      assert all(s == [2] + full[1:] for s in local), (full, local)
  assert all(len(s) == 2 for s in one["shards"])               # one device: the whole batch


if __name__ == "__main__":
  sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
  if sys.argv[1] == "restore":
    _restore_child(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "data_parallel":
    _data_parallel_child(sys.argv[2], sys.argv[3])
  else:
    _reference(sys.argv[1], int(sys.argv[2]))
