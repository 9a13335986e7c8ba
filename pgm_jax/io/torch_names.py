"""The authors' PyTorch parameter names: a Flax parameter path -> its reference state-dict
name, for the text models (DiT, PartitionDIT: branch `text_pretrain`) and the image models
(image PartitionDIT, Halton-MaskGIT `Transformer`: branch `image_pretrain`,
`models/encoder_decoder.py`, `models/transformer.py`). Families use these as their
`torch_name` and `torch_reference` (pgm_jax.families.base); the converter checks and maps
checkpoints with them. docs/convert.md has the tables.
"""
from __future__ import annotations

import dataclasses
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
    elif re.fullmatch(r"mlp_\d+", p):         # sigma_map, MaskGIT adaLN: mlp.{0,2} / mlp.1
      parts += ["mlp", p[4:]]
    else:
      parts.append(p)
  leaf = path[-1]
  transpose = leaf == "kernel"
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(parts + [leaf]), transpose


# Image PartitionDIT: the text layout, plus a LabelEmbedder (`cls_embed.embedding_table`, an
# nn.Embedding) and the registers (`reg_tokens`, an nn.Embedding): both [rows, H], as is.
_IMAGE_PGM_NAMES = {
    ("cls_embed", "embedding"): "cls_embed.embedding_table.weight",
    ("reg_tokens",): "reg_tokens.weight",
}


def image_pgm_torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """The image PartitionDIT's name of a Flax path (`models/pgm_image.py`)."""
  name = _IMAGE_PGM_NAMES.get(tuple(path))
  return (name, False) if name else flax_path_to_torch_name(path)


# MaskGIT `Transformer`: nn.Embedding tables are `<name>.weight` [rows, H]; the output head
# is an nn.Linear whose weight is tied to tok_emb (only its bias is a parameter of ours).
_MASKGIT_NAMES = {
    ("cls_emb", "embedding"): "cls_emb.weight",
    ("tok_emb",): "tok_emb.weight",
    ("pos_emb",): "pos_emb.weight",
    ("reg_tokens",): "reg_tokens.weight",
    ("head_bias",): "head.bias",
}


def maskgit_torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """The MaskGIT Transformer's name of a Flax path (`models/maskgit.py`); the rest
  (transformer.layers.{i}.{mlp.1, ln1, ln2, attn.w{q,k,v,o}, ff.w{1,2,3}}, last_norm.*)
  follows the generic rule."""
  name = _MASKGIT_NAMES.get(tuple(path))
  return (name, False) if name else flax_path_to_torch_name(path)


@dataclasses.dataclass(frozen=True)
class ReferenceModel:
  """What a reference checkpoint of one model looks like, for the converter's messages.

  description: what a file with these names is ("an image PGM checkpoint (...)").
  markers: state-dict name prefixes that this model's files have (the guess counts them).
  tied: {name: the name it repeats}: entries of a state dict that are another parameter
    again (tied weights), checked equal to it and not converted.
  config_hint: the configs that build this model.
  """
  description: str
  markers: tuple[str, ...]
  tied: tuple[tuple[str, str], ...] = ()
  config_hint: str = ""


TEXT_PGM = ReferenceModel(
    "a text PGM checkpoint (PartitionDIT with sigma_map, no class embedding)",
    ("encoder.blocks.", "decoder.group_swap.", "sigma_map."),
    config_hint="a config with config.model.kind='pgm', e.g. configs/owt.py:pgm_6_6")
DIT = ReferenceModel(
    "an MDLM checkpoint (DiT)", ("blocks.", "sigma_map."),
    config_hint="a config with config.model.kind='mdlm' (or 'ar'), e.g. configs/owt.py:mdlm")
IMAGE_PGM = ReferenceModel(
    "an image PGM checkpoint (PartitionDIT with class embedding)",
    ("encoder.blocks.", "decoder.group_swap.", "cls_embed.", "reg_tokens."),
    config_hint="a config with config.model.kind='pgm_image', e.g. configs/imagenet.py:pgm_12_12 "
                "or :pgm_14_10")
MASKGIT = ReferenceModel(
    "a MaskGIT checkpoint (Halton-MaskGIT Transformer)",
    ("transformer.layers.", "tok_emb.", "pos_emb.", "cls_emb.", "head."),
    tied=(("head.weight", "tok_emb.weight"),),
    config_hint="a config with config.model.kind='maskgit', e.g. configs/imagenet.py:maskgit")


def marker_score(names, ref: ReferenceModel) -> tuple[int, float]:
  """(markers found among `names`, their fraction): the larger, the more `names` look like
  a checkpoint of `ref`."""
  found = sum(any(n.startswith(m) for n in names) for m in ref.markers)
  return found, found / max(len(ref.markers), 1)


def best_references(names, refs) -> list[ReferenceModel]:
  """The references (among `refs`) that `names` look most like, [] if none at all."""
  names = list(names)
  scored = [(marker_score(names, r), r) for r in refs]
  top = max((s for s, _ in scored), default=(0, 0.0))
  if top[0] == 0:
    return []
  return [r for s, r in scored if s == top]
