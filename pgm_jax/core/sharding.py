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
  """The device mesh of config.mesh over `devices` (default: all, `jax.devices()`)."""
  return build_mesh(mesh_config, devices)[0]


# How build_mesh ordered the devices (plan.json's mesh_method).
TOPOLOGY_AWARE = "topology-aware"
TOPOLOGY_AWARE_SPLIT = "topology-aware (physical axes split)"
HYBRID = "hybrid (per-slice topology-aware, slices over DCN)"
RESHAPE = "reshape"
RESHAPE_FALLBACK = "reshape (fallback)"


def build_mesh(mesh_config, devices=None) -> tuple[Mesh, dict]:
  """make_mesh's mesh and how it was built: {"method": one of the constants above,
  "dcn_shape": slices per axis (None: one slice), "ici_shape": one slice's mesh}.

  TPU: `mesh_utils.create_device_mesh`, so that neighbours along each mesh axis (the last
  one first) are ICI neighbours; with `allow_split_physical_axes` when the shape needs it.
  Several slices (config.mesh.dcn_shape): `mesh_utils.create_hybrid_device_mesh`, the
  slices along the DCN axes and each slice topology-aware. CPU and GPU: the devices in
  order (GPU: sorted by id), as create_device_mesh orders them. Where mesh_utils cannot
  build the shape, the plain reshape of the device list (logged once).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  axes = tuple(mesh_config.axes)
  if len(axes) != len(shape):
    raise ValueError(f"config.mesh.axes={axes} and config.mesh.shape={shape} differ in length")
  dcn, ici = resolve_dcn_shape(mesh_config, shape, devices)
  if dcn is None:
    grid, method = _ici_grid(shape, devices)
  else:
    grid, method = _hybrid_grid(ici, dcn, devices)
  info = {"method": method, "dcn_shape": None if dcn is None else list(dcn),
          "ici_shape": list(ici)}
  return Mesh(grid, axes), info


def slice_count(devices) -> int | None:
  """How many slices (distinct `slice_index`) the devices span; None when they carry none
  (CPU, single-slice TPU devices of a compile-only topology)."""
  indices = {getattr(d, "slice_index", None) for d in devices}
  if None in indices:
    return None
  return len(indices)


def resolve_dcn_shape(mesh_config, shape, devices) -> tuple[tuple | None, tuple]:
  """(dcn_shape, ici_shape) of the resolved mesh `shape` over `devices`; dcn_shape None
  for one slice (ici_shape = shape). One-line errors naming config.mesh.dcn_shape."""
  from pgm_jax.core import config_lib  # pylint: disable=g-import-not-at-top
  dcn = config_lib.mesh_dcn_shape(mesh_config)
  slices = slice_count(devices)
  if dcn is None:
    if slices and slices > 1 and devices[0].platform == "tpu":
      raise ValueError(f"config.mesh.dcn_shape={_shape_str(mesh_config.get('dcn_shape'))} "
                       f"means one slice, but the {len(devices)} devices span {slices} TPU "
                       f"slices: set it, e.g. --config.mesh.dcn_shape={slices},1,1")
    return None, tuple(shape)
  have = slices or 1
  where = (f"the {len(devices)} devices span {slices} slices (slice_index)" if slices
           else f"the {len(devices)} devices have no slice_index (one slice)")
  dcn = list(dcn)
  if -1 in dcn:
    known = math.prod(s for s in dcn if s != -1)
    if have % known:
      raise ValueError(f"config.mesh.dcn_shape={tuple(dcn)} does not divide the slices: {where}")
    dcn[dcn.index(-1)] = have // known
  dcn = tuple(dcn)
  if math.prod(dcn) != have:
    raise ValueError(f"config.mesh.dcn_shape={dcn} needs {math.prod(dcn)} slices, but {where}")
  if any(m % d for m, d in zip(shape, dcn)):
    raise ValueError(f"config.mesh.dcn_shape={dcn} does not divide the mesh shape {tuple(shape)} "
                     "(config.mesh.shape) on every axis")
  ici = tuple(m // d for m, d in zip(shape, dcn))
  if all(d == 1 for d in dcn):
    return None, ici
  return dcn, ici


def _shape_str(shape) -> str:
  return "None" if shape is None else str(tuple(shape))


_MESH_LOGGED = set()


def _log_once(key, msg, *args) -> None:
  if key not in _MESH_LOGGED:
    _MESH_LOGGED.add(key)
    logging.warning(msg, *args)


def _ici_grid(shape, devices) -> tuple[np.ndarray, str]:
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  if devices[0].platform != "tpu":
    # create_device_mesh keeps the order here (GPU: sorted by id); its reason to exist
    # is the TPU torus.
    try:
      return mesh_utils.create_device_mesh(shape, devices), RESHAPE
    except (ValueError, NotImplementedError, AssertionError) as e:
      _log_once(("ici", tuple(shape), str(e)), "mesh: create_device_mesh(%s) failed (%s): "
                "the devices in order instead", shape, e)
      return np.asarray(devices).reshape(shape), RESHAPE_FALLBACK
  errors = []
  for split, method in ((False, TOPOLOGY_AWARE), (True, TOPOLOGY_AWARE_SPLIT)):
    try:
      return (mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split),
              method)
    except (ValueError, NotImplementedError, AssertionError) as e:
      errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
  _log_once(("ici", tuple(shape), len(devices)), "mesh: create_device_mesh(%s) cannot lay the "
            "mesh on the %d TPU devices' physical topology (%s): plain reshape of the device "
            "list instead (collectives may cross non-neighbouring chips)", shape, len(devices),
            errors[-1][:200])
  return np.asarray(devices).reshape(shape), RESHAPE_FALLBACK


def _hybrid_grid(ici, dcn, devices) -> tuple[np.ndarray, str]:
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  per_slice = {}
  for d in devices:
    per_slice.setdefault(d.slice_index, []).append(d)
  sizes = sorted({len(v) for v in per_slice.values()})
  if sizes != [math.prod(ici)]:
    raise ValueError(f"config.mesh.dcn_shape={tuple(dcn)}: each slice needs {math.prod(ici)} "
                     f"devices (mesh {tuple(m * d for m, d in zip(ici, dcn))} / dcn_shape), "
                     f"but the slices hold {sizes}")
  for split in (False, True):
    try:
      return (mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                   allow_split_physical_axes=split), HYBRID)
    except (ValueError, NotImplementedError, AssertionError) as e:
      error = (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]
  _log_once(("dcn", tuple(ici), tuple(dcn)), "mesh: create_hybrid_device_mesh(%s, %s) failed "
            "(%s): each slice's devices reshaped in order instead", ici, dcn, error)
  # As create_hybrid_device_mesh assembles it: slices sorted by slice_index, in blocks.
  grids = [np.asarray(per_slice[k]).reshape(ici) for k in sorted(per_slice)]
  blocks = np.empty(dcn, dtype=object)
  for i, idx in enumerate(np.ndindex(*dcn)):
    blocks[idx] = grids[i]
  return np.block(blocks.tolist()), RESHAPE_FALLBACK


def mesh_devices(mesh: Mesh, limit: int = 16) -> list[dict]:
  """The first `limit` devices in mesh order (row-major over config.mesh.axes): id, and
  the physical coords and slice_index where the devices have them (plan.json)."""
  out = []
  for d in list(mesh.devices.flat)[:limit]:
    entry = {"id": int(d.id)}
    coords = getattr(d, "coords", None)
    if coords is not None:
      entry["coords"] = [int(c) for c in coords]
    if getattr(d, "slice_index", None) is not None:
      entry["slice"] = int(d.slice_index)
    out.append(entry)
  return out


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


def any_process(flags) -> np.ndarray:
  """Element-wise OR of a bool vector over every process (a collective; as is with one)."""
  flags = np.asarray(flags, np.int32)
  if jax.process_count() == 1:
    return flags.astype(bool)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.max(multihost_utils.process_allgather(flags), axis=0).astype(bool)
