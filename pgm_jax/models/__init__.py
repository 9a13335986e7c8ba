"""Models: text (the MDLM DiT baseline, its causal AR variant, the PartitionDiT) and images
(the class-conditional PartitionDiT with registers, the MaskGIT baseline)."""
from __future__ import annotations

from pgm_jax.models.dit import DiT
from pgm_jax.models.layers import ModelConfig, remat_policy
from pgm_jax.models.maskgit import MaskGIT
from pgm_jax.core.sharding import logical_rules
from pgm_jax.models.pgm import QUERY_MODES, PartitionDiT
from pgm_jax.models.pgm_image import ImagePartitionDiT

from pgm_jax.objectives import IMAGE_KINDS  # ("pgm_image", "maskgit")

TEXT_KINDS = ("pgm", "mdlm", "ar")
MODEL_KINDS = TEXT_KINDS + IMAGE_KINDS


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
  image = {}
  if m.kind in IMAGE_KINDS:
    num_classes, register = int(m.get("num_classes", 0)), int(m.get("register", 0))
    if num_classes <= 0:
      raise ValueError(f"config.model.num_classes must be positive for {m.kind}, got "
                       f"{num_classes}")
    if register < 0 or (m.kind == "pgm_image" and register % 2):
      raise ValueError(f"config.model.register={register} must be >= 0 (and even for "
                       "pgm_image: half of the registers go to each group)")
    image = dict(num_classes=num_classes, register=register,
                 num_positions=int(config.data.grid) ** 2)
    if m.kind == "maskgit":  # codes + MASK: MaskGIT never sees BOS
      vocab_size = mask_id + 1
  return ModelConfig(
      kind=m.kind, vocab_size=vocab_size, mask_id=mask_id, hidden=m.hidden,
      num_heads=m.num_heads,
      # Images condition on a class embedding of width H (cond_dim = H, as the reference).
      cond_dim=m.hidden if m.kind in IMAGE_KINDS else m.cond_dim, mlp_ratio=m.mlp_ratio,
      num_layers=m.num_layers, enc_layers=m.enc_layers, dec_layers=m.dec_layers,
      query_mode=m.query_mode, dropout=m.dropout, dtype=m.dtype,
      attn_impl=config.attn.impl, block_q=config.attn.block_q,
      block_kv=config.attn.block_kv, sorted_layout=config.attn.sorted_layout,
      remat=m.get("remat", "none"), loss_chunk_len=int(m.get("loss_chunk_len", 0) or 0),
      time_conditioning=time_conditioning,
      logical_axis_rules=logical_rules(config.mesh), **image)


def build_model(cfg: ModelConfig):
  if cfg.kind == "pgm":
    return PartitionDiT(cfg)
  if cfg.kind == "pgm_image":
    return ImagePartitionDiT(cfg)
  if cfg.kind == "maskgit":
    return MaskGIT(cfg)
  return DiT(cfg)


__all__ = ["DiT", "PartitionDiT", "ImagePartitionDiT", "MaskGIT", "ModelConfig", "QUERY_MODES",
           "MODEL_KINDS", "TEXT_KINDS", "IMAGE_KINDS", "model_config_from", "build_model"]
