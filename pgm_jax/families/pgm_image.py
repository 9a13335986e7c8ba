"""The image PGM (method §7): the class-conditional PartitionDiT with registers
(`models/pgm_image.py`, sharing the text PGM's encoder, decoder and partition layout),
arccos partition with BOS in group 0, plain cross-entropy over every code of both groups,
the Halton / confidence samplers with classifier-free guidance (`samplers/image.py`)."""
from __future__ import annotations

import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import ALIVE_FRACTION, ImageFamily, dummy_tokens
from pgm_jax.io import torch_names
from pgm_jax.models.pgm_image import ImagePartitionDiT


class ImagePGMFamily(ImageFamily):
  name = "pgm_image"
  reference_quirks = ("registers_count",)  # config.sample.reference_compat (samplers/image.py)
  group_sorted = True
  torch_reference = torch_names.IMAGE_PGM

  def validate(self, config) -> None:
    super().validate(config)
    register = int(config.model.get("register", 0))
    if register % 2:
      raise ValueError(f"config.model.register={register} must be >= 0 (and even for "
                       "pgm_image: half of the registers go to each group)")

  def build_model(self, model_cfg):
    return ImagePartitionDiT(model_cfg)

  def init_args(self, batch_size, seq_len):
    tokens = dummy_tokens(batch_size, seq_len)
    return (tokens, tokens, jnp.zeros((batch_size,), jnp.int32)), {}

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    """tokens = [BOS] + codes, t_B = r ~ U(0, 1) per image: a code is in group 1 iff its
    uniform draw is below arccos(r)/(pi/2). Every code of both groups counts."""
    del mask_id, sampling_eps, objective, attend_to_padding
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    group = objectives.image_groups(noise_u_BxL, t_B)
    logp = model.apply({"params": params}, tokens, group, batch["labels"], valid, train=train,
                       rngs=rngs, targets_BxL=tokens, mask_logit=self.mask_logit)
    return objectives.image_loss_terms_from_log_probs(logp[:, 1:], valid[:, 1:].astype(bool))

  def torch_name(self, path: tuple[str, ...]) -> tuple[str, bool]:
    """The reference `PartitionDIT` (branch image_pretrain): the text PGM's names, plus
    cls_embed.embedding_table.weight and reg_tokens.weight."""
    return torch_names.image_pgm_torch_name(path)

  def attention_layers(self, model_cfg, seq_len):
    return ([("same_group", ALIVE_FRACTION["same_group"])] * model_cfg.enc_layers
            + [("other_group", ALIVE_FRACTION["other_group"])] * (model_cfg.dec_layers + 1))

  def step_flops(self, model_cfg, *, revealed: int, count: int, num_codes: int,
                 sampler: str) -> float:
    """Matmul FLOPs of one sampling step with `revealed` known codes, `count` revealed now:
    Ne (24 n H^2 + 4 n^2 H) + (Nd + 1)(4 n H^2 + 4 m n H) + (20 Nd + 4) m H^2 + 2 m H V,
    n known tokens (+ the group-0 registers), m queries."""
    h, v = model_cfg.hidden, model_cfg.vocab_size
    n = 1 + revealed + (model_cfg.register - model_cfg.register // 2)
    m = int(count) if sampler == "halton" else num_codes - revealed
    ne, nd = model_cfg.enc_layers, model_cfg.dec_layers
    return (ne * (24 * n * h * h + 4 * n * n * h) + (nd + 1) * (4 * n * h * h + 4 * m * n * h)
            + (20 * nd + 4) * m * h * h + 2 * m * h * v)


FAMILY = ImagePGMFamily()
