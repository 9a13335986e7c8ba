"""Device mesh and logical-axis sharding helpers (config.mesh)."""
from __future__ import annotations

import math

import flax.linen as nn
from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def parse_mesh_shape(shape) -> list[int]:
  """config.mesh.shape as a list of ints (one-line error naming the key otherwise)."""
  try:
    return [int(s) for s in shape]
  except (TypeError, ValueError):
    raise ValueError(f"config.mesh.shape={shape!r}: expected integer sizes such as (-1, 1, 1) "
                     "(on the command line: --config.mesh.shape=-1,1,1)") from None


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
  shape = parse_mesh_shape(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={tuple(shape)}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or known == 0:
    raise ValueError(f"config.mesh.shape={tuple(shape)}: sizes must be positive or -1")
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape={tuple(shape)} does not divide the "
                       f"{num_devices} available devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  axes = tuple(mesh_config.axes)
  if len(axes) != len(shape):
    raise ValueError(f"config.mesh.axes={axes} and config.mesh.shape={shape} differ in length")
  return Mesh(np.asarray(devices).reshape(shape), axes)


def logical_rules(mesh_config):
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax)
               for name, ax in mesh_config.logical_axis_rules)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in mesh.axis_names if a in ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp"))
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(x, mesh: Mesh) -> jax.Array:
  """A host value (numpy array or PRNG key, the same on every process) -> a global array
  replicated over `mesh`: what a jitted program whose other arguments span several
  processes may take (a host-local array would need an implicit cross-host transfer)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = put_replicated(np.asarray(jax.random.key_data(x)), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.make_array_from_process_local_data(replicated(mesh), np.asarray(x))


def put_sharded(x, named: NamedSharding) -> jax.Array:
  """A host value that is the same on every process -> a global array laid out as `named`
  (each process puts the slices its devices hold)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, named, lambda index: x[index])


def host_value(x) -> np.ndarray:
  """A jax.Array as a numpy array on every process: a value that spans processes and is
  not replicated is all-gathered first (every process must call this together then)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def shardings_from_boxed(abstract_boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves carry logical axis metadata.

  A dimension that its mesh axes do not divide (e.g. a vocabulary of 2049 over
  tensor=2) is replicated along those axes instead (logged once per name).
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.meta.unbox(abstract_boxed_tree)
  return jax.tree.map(lambda x, s: fit_sharding(s, x.shape), shapes, shardings)


_WARNED = set()


def fit_sharding(named: NamedSharding, shape) -> NamedSharding:
  """`named` with the mesh axes of every dimension they do not divide dropped."""
  spec = tuple(named.spec) + (None,) * (len(shape) - len(named.spec))
  fitted = []
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(named.mesh.shape[a] for a in names)
    if names and dim % size:
      if (dim, names) not in _WARNED:
        _WARNED.add((dim, names))
        logging.warning("dimension %d is not divisible by mesh axes %s (size %d): "
                        "replicated along them", dim, names, size)
      fitted.append(None)
    else:
      fitted.append(axes)
  return NamedSharding(named.mesh, P(*fitted))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Per-host numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def with_logical_constraint(x: jax.Array, logical_names, rules) -> jax.Array:
  """States the sharding of an activation by logical axis names (e.g. ("batch",
  "length", "act_embed")), mapped to mesh axes by `rules` (config.mesh.logical_axis_rules).

  Applied under the abstract mesh that the train / eval steps are traced with
  (`experiment.with_mesh`); a no-op outside one (samplers, plain `model.apply`). Mesh axes that
  the mesh lacks, or whose size does not divide the dimension, are dropped (replicated).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.axis_names or not rules:
    return x
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  spec = nn.logical_to_mesh_axes(tuple(logical_names), rules)
  fitted = []
  for dim, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if a in sizes)
    size = math.prod(sizes[a] for a in names)
    fitted.append(names if names and dim % size == 0 else None)
  if all(a is None for a in fitted):
    return x
  return jax.lax.with_sharding_constraint(x, P(*fitted))
