"""Reliability cases of issue 21 that need no training run.

* Relative paths in every checkpoint key (config.ckpt.init_params_from, restore_from,
  config.distill.teacher_workdir, --workdir) are made absolute against the working
  directory: Orbax refuses relative ones ("Checkpoint path should be absolute").
* Results files (config.json, eval.json, samples, bench.json, PNG grids) follow the umask.
* Image sampling keys and the class table are checked before any work.
* One writer per workdir (`fileio.WorkdirLock`).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_jax.core import checkpointing


def _save(directory, tree, step=3):
  manager = checkpointing.make_manager(directory)
  try:
    checkpointing.save(manager, step, tree, wait=True)
  finally:
    manager.close()


def test_a_relative_checkpoint_folder_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tree = {"params": {"w": jnp.arange(6.0).reshape(2, 3)},
          "ema_params": {"w": jnp.full((2, 3), 2.0)}}
  _save(os.path.join("run", "checkpoints"), tree)                  # relative, as a user types it
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3" / "state")
  assert checkpointing.latest_step(os.path.join("run", "checkpoints")) == 3
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree["ema_params"])
  for src in ("run", os.path.join("run", "checkpoints"), os.path.join("run", "checkpoints", "3"),
              os.path.join(".", "run")):
    got = checkpointing.restore_params(src, target)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.full((2, 3), 2.0))
  assert checkpointing.checkpoint_dir("run") == os.path.join(str(tmp_path), "run", "checkpoints")


def test_a_missing_checkpoint_names_the_key(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "empty").mkdir()
  target = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
  with pytest.raises(ValueError, match="config.distill.teacher_workdir: no checkpoint found"):
    checkpointing.restore_params("empty", target, flag="config.distill.teacher_workdir")
  with pytest.raises(ValueError, match="config.ckpt.init_params_from: no checkpoint found"):
    checkpointing.restore_params("empty", target)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_files_follow_the_umask(tmp_path, umask, mode):
  """config.json, eval.json, samples, bench.json and PNG grids are written by
  fileio.atomic_write_*: readable by whoever the umask lets read them, as metrics.jsonl."""
  from pgm_jax.core import fileio  # pylint: disable=g-import-not-at-top
  old = os.umask(umask)
  try:
    assert fileio.current_umask() == umask
    fileio.atomic_write_text(str(tmp_path / "eval.json"), "{}")
    fileio.atomic_write_bytes(str(tmp_path / "samples.png"), b"\x89PNG")
    with open(tmp_path / "plain.txt", "w") as f:
      f.write("x")
  finally:
    os.umask(old)
  for name in ("eval.json", "samples.png", "plain.txt"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


@pytest.mark.parametrize("key,value", [
    ("sample.cfg_w", float("nan")), ("sample.cfg_w", -1.0), ("sample.cfg_w", 1e30),
    ("sample.samples_per_class", 0), ("eval.samples_per_class", 0),
    ("sample.temperature_min", float("inf")), ("sample.r_temp", -0.5)])
def test_image_sampling_keys_are_checked_at_startup(key, value):
  """A NaN guidance weight used to exit 0 with a black PNG grid; a zero count failed with
  "need at least one array to concatenate". Now one line naming the key, before any work."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  config = load_config("digits", "tiny")
  experiment.validate(config)                                    # the preset itself is fine
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=f"config.{key}=") as e:
    experiment.validate(config)
  assert "\n" not in str(e.value)


def test_a_class_table_smaller_than_the_labels_is_refused(tmp_path):
  """config.model.num_classes below the data's classes used to train into a NaN reported as
  a learning-rate problem; now training and eval refuse it in one line."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from pgm_jax import train  # pylint: disable=g-import-not-at-top
  from pgm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = load_config("digits", "tiny")
  assert pipeline.num_label_classes(config.data) == 10
  pipeline.check_label_classes(config.data, 10)
  assert pipeline.num_label_classes(load_config("shakespeare", "tiny").data) is None
  config.model.num_classes = 6
  with pytest.raises(ValueError, match=r"config.model.num_classes=6 is smaller than the 10 "
                     r"classes of config.data.name='digits' \(labels 0..9\)"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()                  # refused before any work


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_writer_per_workdir(tmp_path):
  """A second job on a workdir that a live job holds is refused in one line naming the
  holder; a killed holder (kill -9) blocks nobody; the lock is released when training ends."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO_ROOT, load_config  # pylint: disable=g-import-not-at-top
  from pgm_jax import train  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import fileio  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from pgm_jax.core import fileio; "
       "lock = fileio.WorkdirLock(sys.argv[1]); print('held', flush=True); time.sleep(120)", wd],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  try:
    assert holder.stdout.readline().strip() == "held"
    config = load_config("shakespeare", "tiny")
    config.train.num_steps = 2
    with pytest.raises(ValueError, match=rf"--workdir={wd} is in use by another job \(host "
                       rf"\S+, pid {holder.pid}, since ") as e:
      train.train_and_evaluate(config, wd)
    assert "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(wd, "checkpoints"))     # refused before any work
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with fileio.WorkdirLock(wd):                     # the dead holder's lock blocks nobody
    pass
  train.train_and_evaluate(config, wd)
  with fileio.WorkdirLock(wd):                     # and training released its own
    pass


def test_malformed_zero_shot_lines_and_vq_files_name_their_file(tmp_path):
  """A zero-shot .jsonl line that is a bare number, and a VQ .npz of the wrong kind, used to
  end in "unexpected TypeError/KeyError"; now one line naming the file (and the key)."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from pgm_jax import sample  # pylint: disable=g-import-not-at-top
  from pgm_jax.evaluation import zero_shot  # pylint: disable=g-import-not-at-top
  path = tmp_path / "set.jsonl"
  path.write_text('{"text": "fine"}\n5\n')
  with pytest.raises(ValueError, match=rf"config.eval.datasets: {path}:2 is a JSON int, not "
                     r"an object with a 'text' field"):
    zero_shot._read_jsonl([str(path)], "text", "config.eval.datasets")  # pylint: disable=protected-access
  npz = tmp_path / "not_a_vq.npz"
  np.savez(npz, codes=np.zeros(3))
  config = load_config("digits", "tiny")
  config.data.name = "imagenet_codes"
  config.data.tokenizer_path = str(npz)
  with pytest.raises(ValueError, match=rf"config.data.tokenizer_path: VQ weights: {npz} is not "
                     r"a converted VQ-8 .npz"):
    sample.image_decoder(config)


def _zero_4kib_in_the_middle(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  assert size > 3 * 4096, size
  with open(path, "r+b") as f:
    f.seek(size // 2)
    f.write(bytes(4096))
  return path


def test_checksums_catch_silent_damage_and_the_previous_step_is_used(tmp_path, caplog):
  """4 KiB zeroed in the middle of a data file of the latest step (a disk or copy fault;
  OCDBT chunks carry no checksum) restored as valid before; now the step's checksums fail,
  the previous kept step is restored with a warning naming the bad one, and training's
  restore moves the bad step to corrupt_checkpoints/."""
  directory = str(tmp_path / "checkpoints")
  state = {"w": jnp.arange(64 * 1024, dtype=jnp.float32).reshape(256, 256),
           "b": jnp.zeros((7,))}
  manager = checkpointing.make_manager(directory)
  for step in (1, 2):
    checkpointing.save(manager, step, jax.tree.map(lambda x, s=step: x + s, state))
  checkpointing.wait(manager)
  manager.close()
  for step in (1, 2):
    assert checkpointing.verify_checksums(os.path.join(directory, str(step))) is True
  _zero_4kib_in_the_middle(os.path.join(directory, "2"))
  with pytest.raises(checkpointing.ChecksumError, match="differ from the checksums"):
    checkpointing.verify_checksums(os.path.join(directory, "2"))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  manager = checkpointing.make_manager(directory)
  step, restored, _ = checkpointing.restore_latest(manager, abstract, move_bad=True)
  manager.close()
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]) + 1)
  assert "Checkpoint step 2" in caplog.text and "ChecksumError" in caplog.text
  assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "2")          # quarantined, kept
  assert sorted(os.listdir(directory)) == ["1"]



def test_a_stop_request_ends_sampling_between_steps():
  """The final samples of a run stop at a SIGTERM (train passes `should_stop`): checked
  before each batch and at every step of the PGM sampler."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment, sample  # pylint: disable=g-import-not-at-top
  config = load_config("shakespeare", "tiny")
  setup = experiment.make_setup(config)
  params = experiment.init_state(setup, jax.random.key(0)).ema_params
  kw = dict(num_samples=2, num_steps=4, seed=0)
  assert len(sample.generate_samples(setup, params, should_stop=lambda: False, **kw)) == 2
  with pytest.raises(sample.SamplingStopped, match="after 0 of 2 samples"):
    sample.generate_samples(setup, params, should_stop=lambda: True, **kw)
  asked = []

  def stop_after_the_first_step():
    asked.append(1)
    return len(asked) > 2   # the batch check, step 1, then stop at step 2

  with pytest.raises(sample.SamplingStopped, match="stopped at sampling step 2/"):
    sample.generate_samples(setup, params, should_stop=stop_after_the_first_step, **kw)


def test_an_out_of_space_save_is_one_line_naming_the_step_and_the_last_good_one(tmp_path):
  """Orbax reports a full disk as a tensorstore ValueError ("RESOURCE_EXHAUSTED ... No space
  left on device [os_error_code='28']"), from the save that failed or one save later (async),
  and every writer thread and pending asyncio task logs its own traceback of it."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  tree = {"w": jnp.arange(6.0)}
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"))
  try:
    checkpointing.save(manager, 3, tree, wait=True)
    full = ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database: Failed "
                      "writing: No space left on device [os_error_code='28']")
    assert checkpointing.is_disk_full(full)
    assert checkpointing.is_disk_full(OSError(28, "No space left on device"))
    assert not checkpointing.is_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = full
    assert checkpointing.is_disk_full(wrapped)

    def raise_full(*args, **kwargs):
      raise full

    real_save = manager.save
    manager.save = raise_full
    with pytest.raises(checkpointing.DiskFullError) as e:
      checkpointing.save(manager, 6, tree)
    message = str(e.value)
    assert message.startswith(f"no space left on the device while saving checkpoint step 6 "
                              f"to {tmp_path / 'ckpt'} (")
    assert "last complete checkpoint: step 3" in message and "\n" not in message
    assert e.value.errno == 28 and isinstance(e.value, OSError)   # cli.guarded: one line
    manager.save = real_save
    other = ValueError("a bug, not a full disk")

    def raise_other(*args, **kwargs):
      raise other

    manager.save = raise_other
    with pytest.raises(ValueError, match="a bug, not a full disk"):
      checkpointing.save(manager, 6, tree)               # anything else goes through as is
  finally:
    manager.save = real_save
    manager.close()

  # The tracebacks Orbax's threads and asyncio log for it are dropped; other errors are kept.
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler = Keep()
  logging.getLogger().addHandler(handler)
  try:
    for logger_name in ("absl", "asyncio"):
      for error in (full, ValueError("something else")):
        try:
          raise error
        except ValueError:
          if logger_name == "absl":
            absl_logging.exception("writer thread failed: %s", error)
          else:
            logging.getLogger("asyncio").error("Task exception was never retrieved",
                                               exc_info=True)
  finally:
    logging.getLogger().removeHandler(handler)
  assert records == ["writer thread failed: something else", "Task exception was never retrieved"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_full_disk_ends_training_in_one_line(tmp_path):
  """A real full disk (a 1 MiB tmpfs; needs root, skipped otherwise): one error line that
  names the step and the folder, exit 1, no traceback (there were 126 before)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  disk = tmp_path / "disk"
  disk.mkdir()
  if (os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
      capture_output=True).returncode != 0):
    pytest.skip("needs root to mount a small tmpfs")
  try:
    wd = disk / "wd"
    run = subprocess.run(
        [sys.executable, "-m", "pgm_jax.main", "--config=configs/shakespeare.py:tiny",
         f"--workdir={wd}", "--config.train.num_steps=4", "--config.ckpt.every_steps=2",
         "--config.train.num_final_samples=0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"))
  finally:
    subprocess.run(["umount", str(disk)], check=False)
  ours = [l for l in run.stderr.splitlines() if l.startswith("pgm_jax:")]
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  assert len(ours) == 1 and ours[0].startswith(
      f"pgm_jax: error: no space left on the device while saving checkpoint step 2 to "
      f"{wd}/checkpoints ("), ours
  assert "last complete checkpoint: none" in ours[0]
