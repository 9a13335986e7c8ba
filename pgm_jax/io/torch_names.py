"""The authors' PyTorch parameter names of the text models (DiT, PartitionDiT): a Flax
parameter path -> its reference state-dict name. Families use it as their `torch_name`
(pgm_jax.families.base); the converter checks and maps checkpoints with it."""
from __future__ import annotations

import re


def flax_path_to_torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """('encoder', 'blocks_0', 'mlp', 'fc_0', 'kernel') -> ('encoder.blocks.0.mlp.0.weight', True).

  The bool says whether the tensor is transposed (a Linear kernel [in, out] is a torch
  weight [out, in]).
  """
  parts: list[str] = []
  for p in path[:-1]:
    m = re.fullmatch(r"(blocks|layers)_(\d+)", p)
    if m:
      parts += [m.group(1), m.group(2)]
    elif re.fullmatch(r"fc_\d+", p):          # MLP inside a block: mlp.{0,2}
      parts.append(p[3:])
    elif re.fullmatch(r"mlp_\d+", p):         # sigma_map: mlp.{0,2}
      parts += ["mlp", p[4:]]
    else:
      parts.append(p)
  leaf = path[-1]
  transpose = leaf == "kernel"
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(parts + [leaf]), transpose
