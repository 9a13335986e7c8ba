"""MaskGIT (the image baseline of method §7): a bidirectional transformer over the codes
(never BOS) with MASK, arccos masking, cross-entropy over the masked codes, the same
Halton / confidence samplers as the image PGM (full-length passes)."""
from __future__ import annotations

import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import ImageFamily, dummy_tokens, valid_mask
from pgm_jax.io import torch_names
from pgm_jax.models.maskgit import MaskGIT, swiglu_hidden


class MaskGITFamily(ImageFamily):
  name = "maskgit"
  torch_reference = torch_names.MASKGIT
  reference_quirks = ("halton_redraw",)  # config.sample.reference_compat (samplers/image.py)

  def model_config_fields(self, config, *, vocab_size, mask_id):
    # codes + MASK: MaskGIT never sees BOS
    return super().model_config_fields(config, vocab_size=mask_id + 1, mask_id=mask_id)

  def build_model(self, model_cfg):
    return MaskGIT(model_cfg)

  def init_args(self, batch_size, seq_len):
    tokens = dummy_tokens(batch_size, seq_len)  # codes only: position 0 of a batch is BOS
    return (tokens[:, 1:], jnp.zeros((batch_size,), jnp.int32)), {}

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    """A code is masked iff its uniform draw is below arccos(r)/(pi/2); the masked codes
    count."""
    del sampling_eps, objective, attend_to_padding
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    codes = tokens[:, 1:]
    masked = noise_u_BxL[:, 1:] < objectives.arccos_rate(t_B)[:, None]
    logp = model.apply({"params": params}, jnp.where(masked, mask_id, codes), batch["labels"],
                       train=train, rngs=rngs, targets_BxN=codes, mask_logit=self.mask_logit)
    return objectives.image_loss_terms_from_log_probs(logp, masked & valid[:, 1:].astype(bool))

  def loss_token_count(self, batch, t_B, noise_u_BxL, *, sampling_eps):
    """The masked valid codes (`loss_terms`' count)."""
    del sampling_eps
    masked = noise_u_BxL[:, 1:] < objectives.arccos_rate(t_B)[:, None]
    return (masked & valid_mask(batch)[:, 1:]).astype(jnp.float32).sum()

  def torch_name(self, path: tuple[str, ...]) -> tuple[str, bool]:
    """The reference `Transformer` (branch image_pretrain, models/transformer.py); its
    head.weight is tok_emb.weight (tied, `torch_reference.tied`)."""
    return torch_names.maskgit_torch_name(path)

  def step_flops(self, model_cfg, *, revealed: int, count: int, num_codes: int,
                 sampler: str) -> float:
    """Every step on T = N + register tokens with SwiGLU width F:
    Nl (8 T H^2 + 6 T H F + 4 T^2 H) + 2 N H V."""
    del revealed, count, sampler
    h, v = model_cfg.hidden, model_cfg.vocab_size
    t = num_codes + model_cfg.register
    f = swiglu_hidden(model_cfg.mlp_ratio * h)
    return (model_cfg.num_layers * (8 * t * h * h + 6 * t * h * f + 4 * t * t * h)
            + 2 * num_codes * h * v)


FAMILY = MaskGITFamily()
