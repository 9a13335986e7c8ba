"""Models: the MDLM DiT baseline and the PartitionDiT (PGM)."""
from __future__ import annotations

from pgm_jax.models.dit import DiT
from pgm_jax.models.layers import ModelConfig, remat_policy
from pgm_jax.sharding import logical_rules
from pgm_jax.models.pgm import QUERY_MODES, PartitionDiT

MODEL_KINDS = ("pgm", "mdlm", "ar")


def model_config_from(config, *, vocab_size: int, mask_id: int) -> ModelConfig:
  """Frozen ModelConfig from the ConfigDict (`config.model`, `config.attn`)."""
  m = config.model
  if m.kind not in MODEL_KINDS:
    raise ValueError(f"config.model.kind must be one of {MODEL_KINDS}, got {m.kind!r}")
  if m.hidden % m.num_heads:
    raise ValueError(f"config.model.hidden={m.hidden} is not divisible by "
                     f"config.model.num_heads={m.num_heads}")
  if (m.hidden // m.num_heads) % 2:
    raise ValueError("config.model.hidden / config.model.num_heads must be even (RoPE)")
  from pgm_jax.ops.attention import IMPLS  # pylint: disable=g-import-not-at-top
  if config.attn.impl not in IMPLS:
    raise ValueError(f"config.attn.impl must be one of {IMPLS}, got {config.attn.impl!r}")
  if m.query_mode not in QUERY_MODES:
    raise ValueError(f"config.model.query_mode must be one of {QUERY_MODES}, "
                     f"got {m.query_mode!r}")
  remat_policy(m.get("remat", "none"))  # a clear error for an unknown policy name
  if int(m.get("loss_chunk_len", 0) or 0) < 0:
    raise ValueError(f"config.model.loss_chunk_len must be >= 0, got {m.loss_chunk_len}")
  time_conditioning = bool(m.get("time_conditioning", False))
  if time_conditioning and m.kind != "mdlm":
    raise ValueError(f"config.model.time_conditioning=True needs config.model.kind='mdlm' "
                     f"(got {m.kind!r}): the reference's PGM and AR models are never time "
                     f"conditioned")
  return ModelConfig(
      kind=m.kind, vocab_size=vocab_size, mask_id=mask_id, hidden=m.hidden,
      num_heads=m.num_heads, cond_dim=m.cond_dim, mlp_ratio=m.mlp_ratio,
      num_layers=m.num_layers, enc_layers=m.enc_layers, dec_layers=m.dec_layers,
      query_mode=m.query_mode, dropout=m.dropout, dtype=m.dtype,
      attn_impl=config.attn.impl, block_q=config.attn.block_q,
      block_kv=config.attn.block_kv, sorted_layout=config.attn.sorted_layout,
      remat=m.get("remat", "none"), loss_chunk_len=int(m.get("loss_chunk_len", 0) or 0),
      time_conditioning=time_conditioning,
      logical_axis_rules=logical_rules(config.mesh))


def build_model(cfg: ModelConfig):
  return PartitionDiT(cfg) if cfg.kind == "pgm" else DiT(cfg)


__all__ = ["DiT", "PartitionDiT", "ModelConfig", "QUERY_MODES", "MODEL_KINDS",
           "model_config_from", "build_model"]
