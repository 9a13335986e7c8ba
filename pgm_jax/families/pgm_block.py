"""The block PGM (docs/method.md, "Block PGM"): blocks of `config.model.block_len` tokens
generated left to right with a KV cache, each block generated as a PGM generates a sequence.

Model: `pgm_jax.models.pgm_block.BlockPartitionDiT` (the PartitionDiT's modules over a clean
and a partition stream). Times: one t per block, stratified (antithetic) over the batch.
Loss: the PGM's complement loss per block (group 1 at its block's t, weight 1/t; group 0 at
1 - t; halved); the validation NLL is the block ELBO (group-1 tokens, weight 1/t). With
block_len = seq_len it is exactly the PGM. Samplers: `pgm_jax.samplers.pgm_block`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.families.base import Family, dummy_tokens, matmul_params, stratified_times
from pgm_jax.models.pgm_block import BLOCK_QUERY_MODES, BlockPartitionDiT
from pgm_jax.ops import masks
from pgm_jax.samplers import pgm_block as block_samplers


def block_times(rng, batch: int, num_blocks: int, *, groups: int, sampling_eps: float,
                antithetic: bool):
  """t [B, num_blocks]: each block's column stratified over the batch on its own. Column 0
  is the PGM's draw from `rng` (so one block is exactly the PGM), column j > 0 is drawn from
  fold_in(rng, j)."""
  cols = [stratified_times(rng if j == 0 else jax.random.fold_in(rng, j), batch, groups=groups,
                           sampling_eps=sampling_eps, antithetic=antithetic)
          for j in range(num_blocks)]
  return jnp.stack(cols, axis=1)


class BlockPGMFamily(Family):
  name = "pgm_block"
  samplers = block_samplers.BLOCK_SAMPLERS
  default_sampler = "block-efficient"
  stops_at_eos = True
  mask_logit = -jnp.inf  # MASK is never an input of a PGM, nor a prediction

  def validate(self, config) -> None:
    super().validate(config)
    m = config.model
    b = int(m.get("block_len", 0) or 0)
    seq_len = int(config.data.seq_len)
    if b <= 0 or seq_len % b:
      raise ValueError(f"config.model.block_len={b} must be a positive divisor of "
                       f"config.data.seq_len={seq_len} for config.model.kind='pgm_block'")
    if m.query_mode not in BLOCK_QUERY_MODES:
      raise ValueError(f"config.model.query_mode={m.query_mode!r} is not available for the "
                       f"block PGM: use one of {BLOCK_QUERY_MODES} (its KV cache holds keys and "
                       f"values, not the encoder outputs an aggregate reads)")
    max_len = int(config.sample.get("max_len", 0) or 0)
    if max_len < 0 or max_len % b:
      raise ValueError(f"config.sample.max_len={max_len} must be 0 (= config.data.seq_len) or a "
                       f"positive multiple of config.model.block_len={b}")

  def model_config_fields(self, config, *, vocab_size, mask_id):
    return {"vocab_size": vocab_size, "block_len": int(config.model.block_len)}

  def build_model(self, model_cfg):
    return BlockPartitionDiT(model_cfg)

  def init_args(self, batch_size, seq_len):
    tokens = dummy_tokens(batch_size, seq_len)
    return (tokens, tokens), {}

  def _num_blocks(self, config, seq_len: int) -> int:
    return seq_len // int(config.model.block_len)

  def train_times(self, rng, batch, config):
    tokens = batch["tokens"]
    t_BxK = block_times(rng, tokens.shape[0], self._num_blocks(config, tokens.shape[1]),
                        groups=1, sampling_eps=config.train.sampling_eps,
                        antithetic=config.train.antithetic)
    return t_BxK, batch

  def eval_times(self, rng, batch_size, config, data_parallel):
    return block_times(rng, batch_size, self._num_blocks(config, int(config.data.seq_len)),
                       groups=data_parallel, sampling_eps=config.train.sampling_eps,
                       antithetic=config.train.antithetic)

  def loss_terms(self, params, batch, t_B, noise_u_BxL, rngs, *, model, mask_id, train,
                 sampling_eps, objective="auto", attend_to_padding=False):
    del mask_id, objective
    tokens = batch["tokens"]
    valid = batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)
    t_BxL = position_times(t_B, tokens.shape[1])
    group = (noise_u_BxL < objectives.mask_prob(t_BxL, sampling_eps)).astype(jnp.int32)
    logp = model.apply({"params": params}, tokens, group,
                       None if attend_to_padding else valid, train=train, rngs=rngs or {},
                       targets_BxL=tokens, mask_logit=self.mask_logit)
    return objectives.pgm_loss_terms_from_log_probs(logp, group, t_BxL, valid)

  def sample_text(self, params, prompt, *, model, sampler, steps, seed, mask_id, top_p,
                  temperature, bucket_size=0, progress=None, threshold=0.9, eos_id=None):
    return block_samplers.block_sample(params, prompt, model=model, sampler=sampler,
                                       steps=steps, seed=seed, mask_id=mask_id, eos_id=eos_id,
                                       top_p=top_p, temperature=temperature,
                                       bucket_size=bucket_size, progress=progress,
                                       threshold=threshold)

  def sample_length(self, config) -> int:
    return int(config.sample.get("max_len", 0) or 0) or int(config.data.seq_len)

  def attention_layers(self, model_cfg, seq_len):
    # Expected alive (query, key) pairs per layer in units of L^2 (`block_alive_fraction` is
    # over the 2L x 2L encoder layout and the L x 2L decoder layout, one t per block).
    b = model_cfg.block_len or seq_len
    enc = 4.0 * masks.block_alive_fraction("block_same_group", seq_len, b)
    dec = 2.0 * masks.block_alive_fraction("block_other_group", seq_len, b)
    return ([("block_same_group", enc)] * model_cfg.enc_layers
            + [("block_other_group", dec)] * (model_cfg.dec_layers + 1))

  def train_flops(self, model_cfg, params, batch_size, seq_len):
    """As `Family.train_flops`, with the encoder's matmuls over both streams (2L tokens) and
    the decoder's key/value projections over the 2L encoder outputs."""
    out = super().train_flops(model_cfg, params, batch_size, seq_len)
    enc_mm = matmul_params(params.get("encoder", {}))
    kv_mm = sum(matmul_params({"k": p}) for p in _decoder_kv_kernels(params.get("decoder", {})))
    extra = 6.0 * (enc_mm + kv_mm) * batch_size * seq_len
    out["dense_flops"] += extra
    out["total"] += extra
    return out


def _decoder_kv_kernels(decoder_params) -> list:
  """The key/value projections of GroupSwap and the decoder layers (they run on 2L keys)."""
  found = []
  for name, sub in decoder_params.items():
    if not isinstance(sub, dict):
      continue
    for inner in ("hidden_to_key_value", "attn_kv"):
      if inner in sub:
        found.append(sub[inner])
  return found


def position_times(t_BxK, length: int):
  """t per position [B, L] from t per block [B, K] (L / K positions per block)."""
  return jnp.repeat(t_BxK, length // t_BxK.shape[1], axis=1)


FAMILY = BlockPGMFamily()
