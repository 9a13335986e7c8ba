"""Model families and their registry: `config.model.kind` -> the one module that says how
to build the model, its loss, its samplers, and its plan / convert hooks.

    family = families.of(config)           # or families.get("pgm")
    model_cfg = families.model_config_from(config, vocab_size=..., mask_id=...)
    model = families.build_model(model_cfg)

A new family is one module in this package (a `Family` subclass and its `FAMILY`
instance, see base.py and docs/adding_a_family.md) and one line in REGISTRY below. Code
outside this package asks the family; it never compares a kind string.
"""
from __future__ import annotations

from pgm_jax.core.sharding import logical_rules
from pgm_jax.families import ar, maskgit, mdlm, pgm, pgm_block, pgm_image
from pgm_jax.families.base import Family, ImageFamily
from pgm_jax.models.layers import ModelConfig
from pgm_jax.ops.attention import resolve_sorted_layout

REGISTRY: dict[str, Family] = {
    "pgm": pgm.FAMILY,
    "pgm_block": pgm_block.FAMILY,
    "mdlm": mdlm.FAMILY,
    "ar": ar.FAMILY,
    "pgm_image": pgm_image.FAMILY,
    "maskgit": maskgit.FAMILY,
}
KINDS = tuple(REGISTRY)


def get(kind: str, key: str = "config.model.kind") -> Family:
  """The family registered under `kind` (a one-line error naming `key` otherwise)."""
  try:
    return REGISTRY[kind]
  except (KeyError, TypeError):
    raise ValueError(f"{key} must be one of {KINDS}, got {kind!r}") from None


def of(config) -> Family:
  """The family of a config (`config.model.kind`)."""
  return get(config.model.kind)


def resolve_sampler(config) -> str:
  """config.sample.sampler, with "auto" resolved to the family's default."""
  sampler = config.sample.sampler
  return of(config).default_sampler if sampler == "auto" else sampler


def check_sampler(config) -> str:
  """The resolved sampler, or a one-line error if the family does not have it."""
  family, sampler = of(config), resolve_sampler(config)
  if sampler not in family.samplers:
    raise ValueError(f"config.sample.sampler={sampler!r} is not a {family.name} sampler; "
                     f"use one of {family.samplers} or 'auto'")
  return sampler


def model_config_from(config, *, vocab_size: int, mask_id: int) -> ModelConfig:
  """Frozen ModelConfig from the ConfigDict (`config.model`, `config.attn`, `config.mesh`);
  the family sets the fields it decides (vocabulary, conditioning, causal, ...)."""
  m, family = config.model, of(config)
  fields = dict(
      kind=family.name, vocab_size=vocab_size, mask_id=mask_id, hidden=m.hidden,
      num_heads=m.num_heads, cond_dim=m.cond_dim, mlp_ratio=m.mlp_ratio,
      num_layers=m.num_layers, enc_layers=m.enc_layers, dec_layers=m.dec_layers,
      query_mode=m.query_mode, dropout=m.dropout, dtype=m.dtype, attn_impl=config.attn.impl,
      block_q=config.attn.block_q, block_kv=config.attn.block_kv,
      sorted_layout=config.attn.sorted_layout, remat=m.get("remat", "none"),
      loss_chunk_len=int(m.get("loss_chunk_len", 0) or 0),
      time_conditioning=bool(m.get("time_conditioning", False)),
      logical_axis_rules=logical_rules(config.mesh))
  fields.update(family.model_config_fields(config, vocab_size=vocab_size, mask_id=mask_id))
  return ModelConfig(**fields)


def sorted_layout(config, attn_impl: str | None = None) -> bool:
  """Whether training passes of `config` run in the group-sorted layout: a family with a
  partition to sort (`Family.group_sorted`, the PGMs) and config.attn.sorted_layout True,
  or "auto" (the default) with the attention resolving to the Pallas kernels.
  `attn_impl`: the resolved attention (default: config.attn.impl resolved now, i.e. for
  the current `compile_target` or the local backend)."""
  if not of(config).group_sorted:
    return False
  return resolve_sorted_layout(config.attn.get("sorted_layout", "auto"),
                               config.attn.impl if attn_impl is None else attn_impl)


def build_model(model_cfg: ModelConfig):
  """The Flax module of a ModelConfig (its `kind` names the family)."""
  return get(model_cfg.kind).build_model(model_cfg)


__all__ = ["Family", "ImageFamily", "KINDS", "REGISTRY", "build_model", "check_sampler", "get",
           "model_config_from", "of", "resolve_sampler", "sorted_layout"]
