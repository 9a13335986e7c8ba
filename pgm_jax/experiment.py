"""The experiment a config describes: model, tokenizer, mesh, optimizer and shardings.

Everything that runs a config (train, eval, sample, convert, plan, bench, the Colab
notebook) starts from `make_setup(config)` and, to read a workdir, from
`restore_eval_params(setup, workdir)`. This module sits below all of them and imports
none of them.

    setup = make_setup(config)                      # validated config -> Setup
    state = init_state(setup, rng)                  # sharded fresh TrainState
    step, params = restore_eval_params(setup, dir)  # EMA weights of the latest checkpoint
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from pgm_jax import distill, families, steps
from pgm_jax.core import checkpointing, config_lib, fileio, sharding
from pgm_jax.data import tokenizers
from pgm_jax.models.layers import remat_policy


@dataclasses.dataclass
class Setup:
  """Everything derived from a config, shared by train, eval and sampling."""
  config: Any
  tokenizer: Any
  mesh: jax.sharding.Mesh
  model_cfg: Any
  model: Any
  tx: Any
  state_shardings: Any        # TrainState of NamedSharding
  abstract_state: Any         # TrainState of ShapeDtypeStruct (with shardings)
  batch_sharding: Any
  data_parallel: int

  @property
  def mask_id(self) -> int:
    return self.tokenizer.mask_id

  @property
  def family(self) -> families.Family:
    return families.get(self.model_cfg.kind)


def validate(config, *, num_devices: int = 1, data_parallel: int = 1,
             mesh_shape: dict | None = None) -> None:
  """Every start-up check of a config, in one place; each error is one line naming the
  config key. The family (`config.model.kind`) adds its own (`Family.validate`);
  `mesh_shape` ({axis: size} of the resolved mesh) enables the mesh checks."""
  family = families.of(config)  # an unknown kind fails first
  m = config.model
  if m.hidden % m.num_heads:
    raise ValueError(f"config.model.hidden={m.hidden} is not divisible by "
                     f"config.model.num_heads={m.num_heads}")
  if (m.hidden // m.num_heads) % 2:
    raise ValueError("config.model.hidden / config.model.num_heads must be even (RoPE)")
  from pgm_jax.ops.attention import IMPLS, SORTED_LAYOUTS  # pylint: disable=g-import-not-at-top
  if config.attn.impl not in IMPLS:
    raise ValueError(f"config.attn.impl must be one of {IMPLS}, got {config.attn.impl!r}")
  layout = config.attn.get("sorted_layout", "auto")
  if not (isinstance(layout, bool) or layout == "auto"):
    raise ValueError(f"config.attn.sorted_layout must be one of {SORTED_LAYOUTS}, "
                     f"got {layout!r}")
  from pgm_jax.models.pgm import QUERY_MODES  # pylint: disable=g-import-not-at-top
  if m.query_mode not in QUERY_MODES:
    raise ValueError(f"config.model.query_mode must be one of {QUERY_MODES}, "
                     f"got {m.query_mode!r}")
  remat_policy(m.get("remat", "none"))  # a clear error for an unknown policy name
  if int(m.get("loss_chunk_len", 0) or 0) < 0:
    raise ValueError(f"config.model.loss_chunk_len must be >= 0, got {m.loss_chunk_len}")
  config_lib.check_sections(config, num_devices=num_devices, data_parallel=data_parallel,
                            mesh_shape=mesh_shape)
  family.validate(config)
  if not 1 <= config.sample.steps <= config.data.seq_len - 1:
    raise ValueError(f"config.sample.steps={config.sample.steps} must be in "
                     f"[1, config.data.seq_len - 1 = {config.data.seq_len - 1}]")
  if config.attn.impl == "pallas":
    from pgm_jax.ops import pallas_attention  # pylint: disable=g-import-not-at-top
    pallas_attention.check_block_sizes(config.data.seq_len, config.data.seq_len,
                                       config.attn.block_q, config.attn.block_kv)
  families.check_sampler(config)


def make_setup(config, devices=None) -> Setup:
  """Validates the config (`validate`) and builds the model, optimizer, mesh and shardings.

  `devices`: the devices of the mesh (default: all, `jax.devices()`).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  validate(config, num_devices=mesh.size, data_parallel=sharding.data_parallel_size(mesh),
           mesh_shape=dict(mesh.shape))
  tokenizer = tokenizers.get_tokenizer(config.data)
  model_cfg = families.model_config_from(config, vocab_size=tokenizer.vocab_size,
                                         mask_id=tokenizer.mask_id)
  model = families.build_model(model_cfg)
  tx = steps.make_optimizer(config.opt, config.train.num_steps)
  boxed = jax.eval_shape(_boxed_init_fn(model, tx, config), jax.random.key(0))
  rules = sharding.logical_rules(config.mesh)
  state_shardings = sharding.shardings_from_boxed(boxed, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      steps.unbox(boxed), state_shardings)
  return Setup(config=config, tokenizer=tokenizer, mesh=mesh, model_cfg=model_cfg, model=model,
               tx=tx, state_shardings=state_shardings, abstract_state=abstract_state,
               batch_sharding=sharding.batch_sharding(mesh),
               data_parallel=sharding.data_parallel_size(mesh))


def init_state(setup: Setup, rng):
  """Sharded fresh init: abstract shapes -> shardings -> jit(init, out_shardings)."""
  init_fn = _boxed_init_fn(setup.model, setup.tx, setup.config)
  return jax.jit(lambda r: steps.unbox(init_fn(r)), out_shardings=setup.state_shardings)(rng)


def _boxed_init_fn(model, tx, config):
  """rng -> boxed (logically partitioned) TrainState; shapes do not depend on the
  dummy input length (RoPE, no position table), so 8 tokens keep init cheap.
  With config.distill.enabled: a DistillState (the same + teacher, round, dt)."""
  init = functools.partial(steps.init_state, model=model, tx=tx, batch_size=1,
                           seq_len=min(config.data.seq_len, 8))
  if config_lib.distill_enabled(config):
    return functools.partial(distill.init_state, base_init=init, config=config)
  return init


def abstract_batch(setup: Setup, batch_size: int | None = None) -> dict:
  """ShapeDtypeStructs (with the batch sharding) of one global training batch."""
  b = setup.config.train.batch_size if batch_size is None else batch_size
  shape = (b, setup.config.data.seq_len)
  batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding),
           "valid": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=setup.batch_sharding)}
  if setup.model_cfg.num_classes:  # image models: one class label per example
    batch["labels"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=setup.batch_sharding)
  return batch


def with_mesh(mesh, fn):
  """`fn` traced under `mesh` as the abstract mesh, so that the attention op can wrap its
  Pallas kernels in `jax.shard_map` (batch over data/fsdp, heads over tensor)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def eval_params(state) -> Any:
  return state.ema_params


def restore_eval_params(setup: Setup, workdir: str, key: str = "--workdir"):
  """(step, EMA params) of the latest checkpoint in `workdir` that restores (clear error
  naming `key` if none; a corrupt latest step falls back to the previous kept one, with a
  warning, and is left where it is)."""
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  if checkpointing.latest_step(ckpt_dir) is None:
    raise ValueError(f"{key}: no checkpoint found in {ckpt_dir}")
  manager = checkpointing.make_manager(ckpt_dir, read_only=True)
  try:
    step, state, _ = checkpointing.restore_latest(manager, setup.abstract_state, key=key)
  finally:
    manager.close()
  return step, eval_params(state)


def abspath(path: str) -> str:
  """Absolute local path; URLs (gs://...) are left alone (they are shared by all hosts)."""
  return path if "://" in path else os.path.abspath(path)


def write_text(path: str, text: str) -> None:
  """Writes a small file (local or gs://) atomically: a crash leaves the old file or the
  new one, never a truncated one. Call it from process 0 only."""
  fileio.atomic_write_text(path, text)
