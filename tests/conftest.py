"""Shared test helpers: config loading and absl flags (Grain workers need them parsed)."""
import importlib.util
import os
import sys

from absl import flags

# The suite runs on CPU. With libtpu installed (the `tpu` extra, for the TPU-compiler
# tests), jax would otherwise try to bring up a TPU backend in every process (slow, noisy);
# `jax.experimental.topologies` still builds TPU devices to compile against.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py:get_config(arg), as `--config=configs/<name>.py:arg` would."""
  path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"test_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def random_params(model, *init_args, seed: int = 0, scale: float = 0.3):
  """`model`'s parameters with every leaf drawn from N(0, scale^2): non-zero everywhere (the
  output layers are zero-initialised) and peaked enough for sampler tests to matter."""
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.jit(model.init)(jax.random.key(seed), *init_args)["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def restored_state(config, workdir):
  """(latest step, the whole train state of WORKDIR's checkpoint, on the host), restored
  with `config`'s abstract state (a TrainState, or a DistillState for distillation)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pgm_jax import experiment  # pylint: disable=g-import-not-at-top
  from pgm_jax.core import checkpointing
  setup = experiment.make_setup(config)
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), read_only=True)
  step = manager.latest_step()
  state, _ = checkpointing.restore(manager, step, setup.abstract_state)
  manager.close()
  return step, jax.device_get(state)


def tiny_gpt2_state(rng, vocab=96, e=32, layers=1, positions=16):
  """A GPT-2 state dict in Hugging Face's names (transformer.*, lm_head.weight), float32,
  the output head tied to the token embedding (tests of the judge and its converters)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  state = {"transformer.wte.weight": rng.normal(0, 0.1, (vocab, e)),
           "transformer.wpe.weight": rng.normal(0, 0.1, (positions, e)),
           "transformer.ln_f.weight": 1 + rng.normal(0, 0.1, e),
           "transformer.ln_f.bias": rng.normal(0, 0.1, e)}
  for i in range(layers):
    for name, shape in (("ln_1.weight", (e,)), ("ln_1.bias", (e,)),
                        ("attn.c_attn.weight", (e, 3 * e)), ("attn.c_attn.bias", (3 * e,)),
                        ("attn.c_proj.weight", (e, e)), ("attn.c_proj.bias", (e,)),
                        ("ln_2.weight", (e,)), ("ln_2.bias", (e,)),
                        ("mlp.c_fc.weight", (e, 4 * e)), ("mlp.c_fc.bias", (4 * e,)),
                        ("mlp.c_proj.weight", (4 * e, e)), ("mlp.c_proj.bias", (e,))):
      state[f"transformer.h.{i}.{name}"] = rng.normal(0, 0.2, shape)
  state = {k: v.astype(np.float32) for k, v in state.items()}
  state["lm_head.weight"] = state["transformer.wte.weight"]
  return state
