"""MDLM (method §1): the DiT denoiser over the full, partially masked sequence, the SUBS
loss, the ddpm / ddpm_cache / confidence-threshold samplers, and the complement-MDLM ablation
(config.train.objective="complement-mdlm")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import DiTFamily
from pgm_jax.samplers import mdlm as mdlm_samplers


class MDLMFamily(DiTFamily):
  name = "mdlm"
  samplers = mdlm_samplers.MDLM_SAMPLERS
  default_sampler = "ddpm_cache"
  train_objectives = ("auto", "complement-mdlm")
  distillable = True
  time_conditioning = True

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    model_valid = None if attend_to_padding else valid
    is_masked = objectives.groups_from_uniform(noise_u_BxL, t_B, sampling_eps).astype(bool)
    time_conditioned = getattr(model.config, "time_conditioning", False)
    if objective == "complement-mdlm" and train:
      # x_t and its complement through the network as one 2B batch (in eval, train=False,
      # it is scored as the MDLM it is).
      views = objectives.complement_mdlm_views(tokens, is_masked, mask_id)
      both = lambda x: None if x is None else jnp.concatenate([x, x], axis=0)
      sigma = None
      if time_conditioned:
        sigma = jnp.concatenate([objectives.sigma(t_B, sampling_eps),
                                 objectives.sigma(1.0 - t_B, sampling_eps)])
      logp = model.apply({"params": params}, views, both(model_valid), train=train, rngs=rngs,
                         targets_BxL=both(tokens), mask_logit=objectives.NEG_INF_MDLM,
                         sigma_B=sigma)
      return objectives.complement_mdlm_loss_terms_from_log_probs(logp, is_masked, t_B, valid)
    sigma = objectives.sigma(t_B, sampling_eps) if time_conditioned else None
    logp = self.predict_hidden(params, tokens, is_masked, model_valid, model=model,
                               mask_id=mask_id, sigma_B=sigma, train=train, rngs=rngs,
                               targets_BxL=tokens)
    return objectives.mdlm_loss_terms_from_log_probs(logp, is_masked, t_B, valid)

  def predict_hidden(self, params, tokens_BxL, hidden_BxL, valid_BxL, *, model, mask_id,
                     sigma_B=None, train=False, rngs=None, targets_BxL=None, mask_logit=None):
    """The hidden positions become MASK (x_t); `sigma_B` reaches a time-conditioned model."""
    x_t = jnp.where(hidden_BxL, mask_id, tokens_BxL)
    kwargs = {} if targets_BxL is None else dict(
        targets_BxL=targets_BxL, mask_logit=self.mask_logit if mask_logit is None else mask_logit)
    return model.apply({"params": params}, x_t, valid_BxL, train=train, rngs=rngs or {},
                       sigma_B=sigma_B, **kwargs)

  def sample_text(self, params, prompt, *, model, sampler, steps, seed, mask_id, top_p,
                  temperature, bucket_size=0, progress=None, threshold=0.9):
    del bucket_size, progress
    return mdlm_samplers.mdlm_sample(params, prompt, model=model, sampler=sampler, steps=steps,
                                     seed=seed, mask_id=mask_id, top_p=top_p,
                                     temperature=temperature, threshold=threshold)

  def sampler_program(self, *, model, setting, sds, key):
    batch, length = int(setting["batch_size"]), int(setting["seq_len"])
    # pylint: disable-next=protected-access
    fn = jax.jit(lambda *a, **k: mdlm_samplers._mdlm_run(*a, **k),
                 static_argnames=("model", "steps", "cache", "mask_id", "eps", "top_p",
                                  "temperature"))
    return dict(name="mdlm_ddpm_cache_run", fn=fn, args=(sds((batch, length), jnp.int32), key),
                static=dict(model=model, steps=int(setting["steps"]), cache=True,
                            mask_id=model.config.mask_id, eps=1e-5, top_p=1.0,
                            temperature=1.0),
                flops_note="the whole run (loop bodies counted once)")


FAMILY = MDLMFamily()
