"""The Pallas attention kernels compiled by the real TPU compiler (libtpu), from a CPU.

`attention.compile_target("tpu")` builds the Mosaic kernels with interpret off; the
devices come from `jax.experimental.topologies.get_topology_desc` (no TPU needed, only
the libtpu package). Each compile takes about a second. Skipped without libtpu.
"""
import os

# Another process on this machine (a planner, a second test worker) may hold libtpu's
# lockfile; compiling needs no exclusive TPU access.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

pytest.importorskip("libtpu")

from pgm_jax.ops import AttentionMask, compile_target, partition_attention  # noqa: E402
from pgm_jax.ops.masks import block_training_masks  # noqa: E402


@pytest.fixture(scope="module")
def tpu_devices():
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no TPU topology from libtpu: {e}")
  return np.asarray(topo.devices)


def _compile_grad(mesh, kind, batch, q_len, kv_len, heads=2, head_dim=64):
  """Compiled HLO text of jax.grad (dq, dk, dv) through partition_attention(impl=pallas)."""
  rep = NamedSharding(mesh, P())
  shard = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)) if (
      batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
      and heads % mesh.shape["tensor"] == 0) else rep
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), jnp.bfloat16, sharding=shard)
  kv = jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), jnp.bfloat16, sharding=shard)
  vec = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep)
  # Block PGM layouts ("encoder" / "decoder" / "clean", masks.block_training_masks, b = 16):
  # the group of the L partition tokens; the others: one group id per query.
  group_len = kv_len // 2 if kind in ("encoder", "decoder") else q_len
  grp = jax.ShapeDtypeStruct((batch, group_len), jnp.int32, sharding=rep)

  def loss(q, k, v, split, group, length):
    if kind == "packed":
      mask = AttentionMask.packed(length, kv_len)
    elif kind in ("encoder", "decoder", "clean"):
      mask = block_training_masks(group, 16)[kind]
    else:
      mask = AttentionMask.sorted_groups(kind, group, split)
    out = partition_attention(q, k, v, mask, impl="pallas", block_q=128, block_kv=128)
    return jnp.sum(out.astype(jnp.float32))

  with compile_target("tpu"), jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, kv, kv, vec, grp, vec).compile()
  return compiled.as_text()


def test_topology_is_the_four_v5e_chips_the_meshes_use(tpu_devices):
  """Cheap (no compile): libtpu's v5e:2x2 topology, 4 TPU devices, as the meshes below
  reshape them ((2, 1, 2), (4, 1, 1), (1, 1, 1))."""
  assert tpu_devices.shape == (4,)
  assert all(d.platform == "tpu" for d in tpu_devices)
  assert tpu_devices[0].device_kind == "TPU v5 lite"


@pytest.mark.parametrize("kind,length", [("same_group", 256), ("other_group", 512),
                                         ("packed", 256)])
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_kernels_compile_for_tpu(tpu_devices, kind, length):
  """Forward + backward (3 Mosaic kernels) at the configs' blocks 128/128, bf16,
  head_dim 64, batch over data and heads over tensor."""
  mesh = Mesh(tpu_devices.reshape(2, 1, 2), ("data", "fsdp", "tensor"))
  text = _compile_grad(mesh, kind, 4, length, length)
  assert text.count("tpu_custom_call") >= 3


@pytest.mark.parametrize("layout,q_len,kv_len", [("encoder", 512, 512), ("decoder", 256, 512),
                                                ("clean", 192, 192)])
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_block_kernels_compile_for_tpu(tpu_devices, layout, q_len, kv_len):
  """The block kinds (the block PGM's training layout, L = 256 (clean: 192, padded keys),
  b = 16): forward + backward with the live-tile table in scalar prefetch, blocks 128/128,
  bf16, batch over data and heads over tensor."""
  mesh = Mesh(tpu_devices.reshape(2, 1, 2), ("data", "fsdp", "tensor"))
  text = _compile_grad(mesh, layout, 4, q_len, kv_len)
  assert text.count("tpu_custom_call") >= 3


@pytest.mark.parametrize("mesh_shape,batch,q_len,kv_len", [
    ((4, 1, 1), 4, 7, 192),     # sampler: 7 queries -> 8, encoder bucket 192 keys -> 256
    ((4, 1, 1), 3, 8, 24),      # batch 3 does not divide data=4: replicated shard_map
    ((1, 1, 1), 1, 192, 192),   # a 1-device mesh; queries 2 x 96, keys -> 256
])
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_padded_shapes_compile_for_tpu(tpu_devices, mesh_shape, batch, q_len, kv_len):
  n = int(np.prod(mesh_shape))
  mesh = Mesh(tpu_devices[:n].reshape(mesh_shape), ("data", "fsdp", "tensor"))
  kind = "packed" if q_len != kv_len else "other_group"
  text = _compile_grad(mesh, kind, batch, q_len, kv_len)
  assert text.count("tpu_custom_call") >= 3
