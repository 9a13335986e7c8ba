"""The autoregressive baseline: the MDLM DiT with causal attention, next-token
cross-entropy (an exact likelihood over tokens 1..L-1), left-to-right sampling with a KV
cache; also the offline judge of generative perplexity (config.eval.judge_workdir)."""
from __future__ import annotations

import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import DiTFamily, valid_mask
from pgm_jax.samplers import ar as ar_samplers


class ARFamily(DiTFamily):
  name = "ar"
  samplers = ar_samplers.AR_SAMPLERS
  default_sampler = "ar"
  exact_likelihood = True
  mask_logit = -jnp.inf  # MASK is never predicted

  def model_config_fields(self, config, *, vocab_size, mask_id):
    return dict(super().model_config_fields(config, vocab_size=vocab_size, mask_id=mask_id),
                causal=True)

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    del t_B, noise_u_BxL, mask_id, sampling_eps, objective  # no noise: the clean sequence
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    logp = model.apply({"params": params}, tokens, None if attend_to_padding else valid,
                       train=train, rngs=rngs, targets_BxL=objectives.next_token_targets(tokens),
                       mask_logit=self.mask_logit)
    return objectives.ar_loss_terms_from_log_probs(logp[:, :-1], valid)

  def loss_token_count(self, batch, t_B, noise_u_BxL, *, sampling_eps):
    """The valid targets: positions 1..L-1 (BOS is never predicted)."""
    del t_B, noise_u_BxL, sampling_eps
    return valid_mask(batch)[:, 1:].astype(jnp.float32).sum()

  def sample_text(self, params, prompt, *, model, sampler, steps, seed, mask_id, top_p,
                  temperature, bucket_size=0, progress=None, threshold=0.9):
    del bucket_size, progress, threshold  # left to right: no confidence-threshold sampler
    return ar_samplers.ar_sample(params, prompt, model=model, sampler=sampler, steps=steps,
                                 seed=seed, mask_id=mask_id, top_p=top_p,
                                 temperature=temperature)

  def attention_layers(self, model_cfg, seq_len):
    return [("causal", (seq_len + 1) / (2 * seq_len))] * model_cfg.num_layers


FAMILY = ARFamily()
