"""A toy model family, the one docs/adding_a_family.md walks through: a per-position unigram
"denoiser" that ignores its context. It joins the registry with this module and one line
(`families.REGISTRY["unigram"] = toy_family.FAMILY`) and then trains, evaluates and samples
through the unchanged pgm_jax programs (tests/test_families.py)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import Family
from pgm_jax.models.layers import ModelConfig
from pgm_jax.ops.logits import NEG_INF_MDLM, token_log_probs
from pgm_jax.samplers import mdlm as mdlm_samplers


class PositionUnigram(nn.Module):
  """p(x_i) = softmax(table[i]): one learned distribution per position, context ignored.
  It takes the MDLM denoiser's arguments, so the MDLM samplers can run it."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_t_BxL, valid_BxL=None, *, train: bool = False, targets_BxL=None,
               mask_logit: float = NEG_INF_MDLM, sigma_B=None):
    del valid_BxL, train, sigma_B
    cfg = self.config
    table_PxV = self.param("table", nn.initializers.zeros, (cfg.num_positions, cfg.vocab_size))
    length = x_t_BxL.shape[1]
    logits_BxLxV = jnp.broadcast_to(table_PxV[None, :length], x_t_BxL.shape + (cfg.vocab_size,))
    if targets_BxL is None:
      return logits_BxLxV
    return token_log_probs(logits_BxLxV, targets_BxL, cfg.mask_id, mask_logit=mask_logit)


class UnigramFamily(Family):
  name = "unigram"
  samplers = mdlm_samplers.MDLM_SAMPLERS      # it reuses MDLM's samplers
  default_sampler = "ddpm_cache"

  def model_config_fields(self, config, *, vocab_size, mask_id):
    return dict(vocab_size=vocab_size, num_positions=config.data.seq_len)

  def build_model(self, model_cfg):
    return PositionUnigram(model_cfg)

  def init_args(self, batch_size, seq_len):
    return (jnp.zeros((batch_size, seq_len), jnp.int32),), {}

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    is_masked = objectives.groups_from_uniform(noise_u_BxL, t_B, sampling_eps).astype(bool)
    logp = self.predict_hidden(params, tokens, is_masked, valid, model=model, mask_id=mask_id,
                               train=train, rngs=rngs, targets_BxL=tokens)
    return objectives.mdlm_loss_terms_from_log_probs(logp, is_masked, t_B, valid)

  def predict_hidden(self, params, tokens_BxL, hidden_BxL, valid_BxL, *, model, mask_id,
                     sigma_B=None, train=False, rngs=None, targets_BxL=None, mask_logit=None):
    x_t = jnp.where(hidden_BxL, mask_id, tokens_BxL)
    kwargs = {} if targets_BxL is None else dict(
        targets_BxL=targets_BxL, mask_logit=self.mask_logit if mask_logit is None else mask_logit)
    return model.apply({"params": params}, x_t, valid_BxL, train=train, **kwargs)

  def sample_text(self, params, prompt, *, model, sampler, steps, seed, mask_id, top_p,
                  temperature, bucket_size=0, progress=None, threshold=0.9):
    return mdlm_samplers.mdlm_sample(params, prompt, model=model, sampler=sampler, steps=steps,
                                     seed=seed, mask_id=mask_id, top_p=top_p,
                                     temperature=temperature, threshold=threshold)


FAMILY = UnigramFamily()
