"""The text PGM (method §2-§3): PartitionDiT, the complement loss, the PGM samplers.

Model: `pgm_jax.models.pgm.PartitionDiT` (the training layout, and `encode`/`decode` for
the samplers). Loss: `objectives.pgm_loss_terms_from_log_probs`: group 1 at time t (weight
1/t), group 0 at the complement time 1 - t (weight 1/(1 - t)), halved. Samplers:
`pgm_jax.samplers.pgm` (efficient-uniform, efficient-non-uniform, naive,
confidence-threshold).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import ALIVE_FRACTION, Family, dummy_tokens
from pgm_jax.io import torch_names
from pgm_jax.models.pgm import PartitionDiT
from pgm_jax.samplers import pgm as pgm_samplers


class PGMFamily(Family):
  name = "pgm"
  samplers = pgm_samplers.PGM_SAMPLERS
  default_sampler = "efficient-uniform"
  distillable = True
  group_sorted = True
  mask_logit = -jnp.inf  # MASK is never an input of a PGM, nor a prediction
  torch_reference = torch_names.TEXT_PGM

  def build_model(self, model_cfg):
    return PartitionDiT(model_cfg)

  def init_args(self, batch_size, seq_len):
    tokens = dummy_tokens(batch_size, seq_len)
    return (tokens, tokens), {}

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    group = objectives.groups_from_uniform(noise_u_BxL, t_B, sampling_eps)
    # log p(target) [B, L] directly: the float32 [B, L, V] logits are never materialised.
    logp = self.predict_hidden(params, tokens, group, None if attend_to_padding else valid,
                               model=model, mask_id=mask_id, train=train, rngs=rngs,
                               targets_BxL=tokens)
    return objectives.pgm_loss_terms_from_log_probs(logp, group, t_B, valid)

  def predict_hidden(self, params, tokens_BxL, hidden_BxL, valid_BxL, *, model, mask_id,
                     sigma_B=None, train=False, rngs=None, targets_BxL=None, mask_logit=None):
    """The hidden positions are group 1; every position is predicted from the other
    group, so a hidden position only ever sees the visible ones (whatever it holds)."""
    del mask_id, sigma_B  # a PGM is never time conditioned and never reads MASK
    kwargs = {} if targets_BxL is None else dict(
        targets_BxL=targets_BxL, mask_logit=self.mask_logit if mask_logit is None else mask_logit)
    return model.apply({"params": params}, tokens_BxL, hidden_BxL.astype(jnp.int32), valid_BxL,
                       train=train, rngs=rngs or {}, **kwargs)

  def sample_text(self, params, prompt, *, model, sampler, steps, seed, mask_id, top_p,
                  temperature, bucket_size=0, progress=None, threshold=0.9):
    return pgm_samplers.pgm_sample(params, prompt, model=model, sampler=sampler, steps=steps,
                                   seed=seed, mask_id=mask_id, top_p=top_p,
                                   temperature=temperature, bucket_size=bucket_size,
                                   progress=progress, threshold=threshold)

  def attention_layers(self, model_cfg, seq_len):
    # Encoder self-attention within the group; GroupSwap + every decoder block cross-attend
    # to the other group.
    return ([("same_group", ALIVE_FRACTION["same_group"])] * model_cfg.enc_layers
            + [("other_group", ALIVE_FRACTION["other_group"])] * (model_cfg.dec_layers + 1))

  def sampler_program(self, *, model, setting, sds, key):
    batch, length = int(setting["batch_size"]), int(setting["seq_len"])
    # A fresh wrapper, so that no trace cached outside the compile target is reused.
    # pylint: disable-next=protected-access
    fn = jax.jit(lambda *a, **k: pgm_samplers._pgm_efficient_step(*a, **k),
                 static_argnames=pgm_samplers._STATIC,  # pylint: disable=protected-access
                 donate_argnames=("st",))
    st = pgm_samplers.PGMState(canvas=sds((batch, length), jnp.int32),
                               clean_tok=sds((batch, length), jnp.int32),
                               clean_pos=sds((batch, length), jnp.int32),
                               clean_len=sds((batch,), jnp.int32),
                               order=sds((batch, length), jnp.int32),
                               cursor=sds((batch,), jnp.int32))
    return dict(name="pgm_efficient_step", fn=fn, args=(st, sds((batch,), jnp.int32), key),
                static=dict(model=model, n_enc=length, n_query=int(setting["n_query"]),
                            mask_id=model.config.mask_id, top_p=1.0, temperature=1.0),
                flops_note="per call (the PGM run calls it once per step, at growing n_enc)")


FAMILY = PGMFamily()
