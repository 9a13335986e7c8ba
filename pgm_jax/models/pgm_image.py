"""The PGM image model (method §7): the PartitionDiT of §3 on code grids, conditioned on a
class, with learned register tokens.

Differences from the text model:
  * Conditioning: t_cond = the class embedding (a table of num_classes + 1 rows, the last
    one the null class of classifier-free guidance), used as it is (no SiLU, no sigma map);
    the adaLN layers take it at width H (cond_dim = H).
  * Registers: `register` learned vectors (N(0, 0.02)) are prepended to the sequence.
    In training, the first half is in group 1 and the second half in group 0, at RoPE /
    query positions 0 .. register-1; the tokens follow (BOS at position `register`). A
    register in each group keeps every attention row non-empty. At inference only the
    group-0 registers are kept, in front of the packed clean tokens (the queries all belong
    to group 1, so the group-1 registers could never be read).
  * The loss is a plain cross-entropy (objectives.image_pgm_groups); logit[MASK] = -1e6.
Positions given to and returned by the methods are TOKEN positions (0 = BOS); the register
offset is added inside.

Parameter tree (Flax) <-> the authors' state dict (branch `image_pretrain`, `PartitionDIT`
in models/encoder_decoder.py; the `model_state_dict` of their `.ckpt` files), as
`python -m pgm_jax.tools.convert` maps it (`io/torch_names.image_pgm_torch_name`, the family's
`torch_name`; tables in docs/convert.md):
  vocab_embed/embedding        <- vocab_embed.embedding            [V, H]
  cls_embed/embedding          <- cls_embed.embedding_table.weight [num_classes + 1, H]
  reg_tokens                   <- reg_tokens.weight                [register, H]
  encoder/..., decoder/..., output_layer/...   as the text PartitionDiT (models/pgm.py), with
                                  adaLN_modulation kernels [H, 6H] / [H, 2H] (cond_dim = H)
  rotary_emb.inv_freq          (a buffer: checked, not stored); there is no sigma_map.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgm_jax.ops.logits import NEG_INF_MDLM
from pgm_jax.models.layers import ClassEmbedding, FinalLayer, ModelConfig, VocabEmbedding, logical
from pgm_jax.models.pgm import Decoder, Encoder
from pgm_jax.ops import AttentionMask
from pgm_jax.ops.attention import resolve_sorted_layout
from pgm_jax.ops.partition_layout import partition_view


def prepend_valid_keys(mask: AttentionMask, n: int) -> AttentionMask:
  """A packed-inference ("full") mask with `n` always-valid keys put in front."""
  if n == 0:
    return mask
  if mask.kind != "full":
    raise ValueError(f"prepend_valid_keys: expected a 'full' (packed) mask, got {mask.kind!r}")
  kv_valid = mask.kv_valid
  if kv_valid is not None:
    kv_valid = jnp.concatenate([jnp.ones((kv_valid.shape[0], n), bool), kv_valid], axis=1)
  kv_length = None if mask.kv_length is None else mask.kv_length + n
  return AttentionMask(kind="full", kv_valid=kv_valid, kv_length=kv_length)


def prepend_keys_within_count(mask: AttentionMask, n: int) -> AttentionMask:
  """The reference's packed-inference mask (`image_pretrain`, `PartitionDIT.forward`): `n`
  registers put in front of the keys while the valid-key count stays `kv_length` (the known
  tokens, BOS included, without the registers), so the last `n` known tokens become padding.
  `config.sample.reference_compat="registers_count"` (docs/images.md)."""
  if n == 0:
    return mask
  if mask.kind != "full" or mask.kv_length is None:
    raise ValueError("prepend_keys_within_count: expected a packed mask (AttentionMask.packed)")
  batch = mask.kv_length.shape[0]
  kv_len = n + (mask.kv_valid.shape[1] if mask.kv_valid is not None else 0)
  kv_valid = jnp.arange(kv_len)[None, :] < mask.kv_length[:, None]
  if mask.kv_valid is not None:
    kv_valid = kv_valid & jnp.concatenate([jnp.ones((batch, n), bool), mask.kv_valid], axis=1)
  return AttentionMask(kind="full", kv_valid=kv_valid, kv_length=mask.kv_length)


def encoder_key_mask(mask: AttentionMask, n_registers: int, registers_in_count: bool
                     ) -> AttentionMask:
  """The key mask of `infer` over [group-0 registers, packed known tokens]: ours counts the
  registers as valid keys in addition to the known tokens; the reference's count includes
  them (`prepend_keys_within_count`)."""
  if registers_in_count:
    return prepend_keys_within_count(mask, n_registers)
  return prepend_valid_keys(mask, n_registers)


class ImagePartitionDiT(nn.Module):
  """Class-conditional PartitionDiT with register tokens (see module docstring)."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    if cfg.register % 2:
      raise ValueError(f"config.model.register={cfg.register} must be even (half of the "
                       "registers go to each group)")
    self.vocab_embed = VocabEmbedding(cfg.vocab_size, cfg.hidden)
    self.cls_embed = ClassEmbedding(cfg.num_classes + 1, cfg.hidden, stddev=1.0)
    if cfg.register:
      self.reg_tokens = self.param("reg_tokens", logical(nn.initializers.normal(0.02),
                                                         (None, "embed")),
                                   (cfg.register, cfg.hidden), jnp.float32)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.output_layer = FinalLayer(cfg)

  def _registers(self, batch: int, first: int):
    """Registers first..register-1 as [B, n, H] and their positions [B, n]."""
    r = self.config.register
    reg_nxH = self.reg_tokens[first:]
    n = r - first
    return (jnp.broadcast_to(reg_nxH[None], (batch, n, reg_nxH.shape[-1])),
            jnp.broadcast_to(jnp.arange(first, r, dtype=jnp.int32)[None], (batch, n)))

  def __call__(self, tokens_BxL: jax.Array, group_BxL: jax.Array, labels_B: jax.Array,
               valid_BxL: Optional[jax.Array] = None, *, train: bool = False,
               sorted_layout: Optional[bool] = None, targets_BxL: Optional[jax.Array] = None,
               mask_logit: float = NEG_INF_MDLM) -> jax.Array:
    """Training layout: every token is predicted from the other group (registers included).

    Args:
      tokens_BxL: clean tokens, [BOS] + codes.
      group_BxL: 0/1 partition (BOS belongs to group 0).
      labels_B: class ids; num_classes is the null class.
      valid_BxL: optional key validity.
      sorted_layout: group-sorted layout (registers sorted with the tokens); None: the
        config's ("auto": iff the attention resolves to the kernels).
      targets_BxL: if given, return float32 log p(targets) [B, L] after logit[MASK] =
        mask_logit instead of the logits (see `FinalLayer`).
    Returns:
      float32 logits [B, L, V] or log-probabilities [B, L], registers dropped.
    """
    cfg = self.config
    if sorted_layout is None:
      sorted_layout = resolve_sorted_layout(cfg.sorted_layout, cfg.attn_impl)
    batch, length = tokens_BxL.shape
    r = cfg.register
    x_BxTxH = self.vocab_embed(tokens_BxL)
    group_BxT = group_BxL.astype(jnp.int32)
    valid_BxT, targets_BxT = valid_BxL, targets_BxL
    if r:
      reg_x, _ = self._registers(batch, 0)
      reg_group = jnp.asarray([1] * (r // 2) + [0] * (r - r // 2), jnp.int32)
      x_BxTxH = jnp.concatenate([reg_x, x_BxTxH], axis=1)
      group_BxT = jnp.concatenate([jnp.broadcast_to(reg_group[None], (batch, r)), group_BxT], 1)
      if valid_BxT is not None:
        valid_BxT = jnp.concatenate([jnp.ones((batch, r), bool), valid_BxT.astype(bool)], 1)
      if targets_BxT is not None:
        targets_BxT = jnp.concatenate([jnp.zeros((batch, r), targets_BxT.dtype), targets_BxT],
                                      1)
    view = partition_view(group_BxT, valid_BxT, sorted_layout=sorted_layout)
    cond_BxH = self.cls_embed(labels_B)
    enc = self.encoder(cfg.constrain(view.gather(x_BxTxH)), cond_BxH, view.positions, view.same,
                       train=train)
    dec = self.decoder(enc, cond_BxH, view.positions, view.positions, view.other, train=train)
    out = view.restore(self.output_layer(dec, cond_BxH, view.gather(targets_BxT), mask_logit))
    return out[:, r:]

  def canvas_logits(self, canvas_BxL: jax.Array, labels_B: jax.Array) -> jax.Array:
    """The samplers' full-length pass over a canvas ([BOS] + codes, MASK where unknown), in
    the training layout: the unknown positions are group 1. Float32 logits [B, L, V]."""
    return self(canvas_BxL, (canvas_BxL == self.config.mask_id).astype(jnp.int32), labels_B)

  def infer(self, tokens_BxN: jax.Array, positions_BxN: jax.Array, mask: AttentionMask,
            query_pos_BxQ: jax.Array, labels_B: jax.Array, *,
            registers_in_count: bool = False) -> jax.Array:
    """Packed inference: float32 logits [B, Q, V] at `query_pos_BxQ` from the clean tokens.

    tokens_BxN / positions_BxN: the packed clean tokens (BOS included) and their token
    positions; `mask`: `AttentionMask.packed(clean_len, N)`. The group-0 registers are put in
    front of them. registers_in_count=True reproduces the authors' samplers, whose valid-key
    count (`concrete_lengths`) leaves the registers out although they sit in front: the last
    register // 2 known tokens are then padding (`encoder_key_mask`).
    """
    cfg = self.config
    batch = tokens_BxN.shape[0]
    r = cfg.register
    x_BxKxH = self.vocab_embed(tokens_BxN)
    kv_pos_BxK = positions_BxN.astype(jnp.int32) + r
    if r:
      reg_x, reg_pos = self._registers(batch, r // 2)
      x_BxKxH = jnp.concatenate([reg_x, x_BxKxH], axis=1)
      kv_pos_BxK = jnp.concatenate([reg_pos, kv_pos_BxK], axis=1)
    mask = encoder_key_mask(mask, r - r // 2, registers_in_count)
    cond_BxH = self.cls_embed(labels_B)
    enc = self.encoder(x_BxKxH, cond_BxH, kv_pos_BxK, mask, train=False)
    dec = self.decoder(enc, cond_BxH, kv_pos_BxK, query_pos_BxQ.astype(jnp.int32) + r, mask,
                       train=False)
    return self.output_layer(dec, cond_BxH)
