"""The group-sorted PGM layout is derived from the attention, not remembered per config:
config.attn.sorted_layout="auto" (the default) sorts iff the attention resolves to the Pallas
kernels (on TPU through `compile_target("tpu")`, as plan mode compiles), and the dense XLA
path on CPU stays unsorted."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO_ROOT, load_config
from pgm_jax import experiment, families
from pgm_jax.core import config_lib
from pgm_jax.models import pgm as pgm_model
from pgm_jax.models import pgm_image as pgm_image_model
from pgm_jax.ops.attention import compile_target, resolve_sorted_layout


def _presets(name):
  """The boolean presets of configs/<name>.py (the keywords of its `parse_arg` call)."""
  seen = {}
  real = config_lib.parse_arg

  def spy(arg, **defaults):
    seen.update(defaults)
    return real(arg, **defaults)

  config_lib.parse_arg = spy
  try:
    load_config(name)
  finally:
    config_lib.parse_arg = real
  return [None] + sorted(k for k, v in seen.items() if isinstance(v, bool))


def _every_config():
  out = []
  for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    for preset in _presets(name):
      try:
        out.append((f"{name}:{preset}", load_config(name, preset)))
      except ValueError:  # a preset that needs another one
        pass
  return out


def test_every_pgm_preset_trains_sorted_on_tpu_and_unsorted_on_cpu():
  configs = _every_config()
  kinds = {cfg.model.kind for _, cfg in configs}
  assert {"pgm", "pgm_image", "mdlm"} <= kinds, kinds
  assert len(configs) > 20
  for label, cfg in configs:
    family = families.of(cfg)
    model_cfg = families.model_config_from(cfg, vocab_size=16, mask_id=15)
    with compile_target("tpu"):
      on_tpu = families.sorted_layout(cfg)
      model_on_tpu = resolve_sorted_layout(model_cfg.sorted_layout, model_cfg.attn_impl)
    with compile_target("cpu"):
      on_cpu = families.sorted_layout(cfg)
      model_on_cpu = resolve_sorted_layout(model_cfg.sorted_layout, model_cfg.attn_impl)
    kernel_on_tpu = cfg.attn.impl in ("auto", "pallas")
    if family.group_sorted:
      # Every PGM whose attention is the kernel on TPU trains sorted there; the model reads
      # the same decision from its ModelConfig at trace time.
      assert on_tpu == model_on_tpu == kernel_on_tpu, label
      if cfg.attn.impl != "pallas":
        assert not on_cpu and not model_on_cpu, label   # the dense XLA path: unsorted
    else:
      assert not on_tpu and not on_cpu, label


def test_true_and_false_still_force_the_layout():
  cfg = load_config("shakespeare", "tiny")
  for value in (True, False):
    cfg.attn.sorted_layout = value
    for target in ("tpu", "cpu"):
      with compile_target(target):
        assert families.sorted_layout(cfg) is value
  cfg.attn.sorted_layout = "sometimes"
  with pytest.raises(ValueError, match=r"config\.attn\.sorted_layout"):
    experiment.make_setup(cfg)


@pytest.mark.parametrize("name,preset", [("shakespeare", "tiny"), ("digits", "tiny")])
def test_the_model_traces_sorted_under_the_tpu_target(name, preset, monkeypatch):
  """The decision is taken when the model is traced: the same ModelConfig (attn auto)
  builds the sorted layout under compile_target("tpu") and the unsorted one on CPU."""
  cfg = load_config(name, preset)
  setup = experiment.make_setup(cfg)
  seen = []
  module = pgm_model if cfg.model.kind == "pgm" else pgm_image_model
  real = module.partition_view
  monkeypatch.setattr(module, "partition_view",
                      lambda *a, sorted_layout, **k: seen.append(sorted_layout) or real(
                          *a, sorted_layout=sorted_layout, **k))
  family = families.of(cfg)
  params = jax.eval_shape(lambda: family.init_params(setup.model, jax.random.key(0)))
  length = cfg.data.seq_len
  tokens = jnp.zeros((2, length), jnp.int32)
  args = (tokens, tokens) + ((jnp.zeros((2,), jnp.int32),) if family.is_image else ())
  for target, want in (("cpu", False), ("tpu", True)):
    seen.clear()
    with compile_target(target):
      jax.eval_shape(lambda p: setup.model.apply({"params": p}, *args), params)
    assert seen == [want], (target, seen)
