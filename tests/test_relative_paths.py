"""Relative paths in every checkpoint key (config.ckpt.init_params_from, restore_from,
config.distill.teacher_workdir, --workdir) are made absolute against the working
directory: Orbax refuses relative ones ("Checkpoint path should be absolute")."""
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
