"""Building blocks shared by the MDLM DiT and the PartitionDiT.

Parameter names follow the reference PyTorch state dict (docs/convert.md) so that
checkpoints map one to one: a torch `Linear` [out, in] `weight` is a Flax
`kernel` [in, out]; a torch norm `weight` is our `scale`. Every parameter carries
logical axis names (see `pgm_jax.core.sharding` for the rules that map them to mesh axes).

Logical axes: "vocab", "embed" (hidden H), "mlp" (4H), "qkv" (3H, [q|k|v] head-major),
"kv" (2H, [k|v]), "heads_dim" (H as heads*head_dim), "cond" (cond_dim), "freq" (256),
"adaln" (6H or 2H), "cond_mlp" (cond_dim, sigma_map hidden).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgm_jax.core import sharding
from pgm_jax.ops import AttentionMask, partition_attention
from pgm_jax.ops.logits import token_log_probs

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters (built from `config.model` by `model_config_from`)."""
  kind: str                     # the family's name (config.model.kind; pgm_jax.families)
  vocab_size: int               # includes MASK
  mask_id: int
  hidden: int = 768
  num_heads: int = 12
  cond_dim: int = 128
  mlp_ratio: int = 4
  num_layers: int = 12          # MDLM DiT blocks
  enc_layers: int = 6           # PGM encoder blocks
  dec_layers: int = 6           # PGM decoder blocks
  query_mode: str = "learn+freqs"  # GroupSwap query construction
  dropout: float = 0.1
  dtype: str = "bfloat16"       # compute dtype; parameters are always float32
  rope_base: float = 10000.0
  attn_impl: str = "xla"        # config.attn.impl
  block_q: int = 128            # config.attn.block_q (Pallas kernel)
  block_kv: int = 128           # config.attn.block_kv
  sorted_layout: bool | str = "auto"  # config.attn.sorted_layout: PGM training in group-sorted
                                # order ("auto": iff attn_impl resolves to the kernels)
  remat: str = "none"           # config.model.remat: jax.checkpoint policy of every block
  loss_chunk_len: int = 0       # config.model.loss_chunk_len: positions per output chunk
  time_conditioning: bool = False  # config.model.time_conditioning: the DiT reads sigma(t)
  block_len: int = 0            # config.model.block_len: tokens per block (pgm_block)
  causal: bool = False          # the DiT attends causally (the AR family sets it)
  logical_axis_rules: tuple = ()  # config.mesh.logical_axis_rules (activation constraints)
  # Images (pgm_image, maskgit): class conditioning, learned register tokens, and MaskGIT's
  # learned position table (one row per code).
  num_classes: int = 0          # config.model.num_classes; the class table has one more row
  register: int = 0             # config.model.register
  num_positions: int = 0        # config.data.grid ** 2 (maskgit)

  @property
  def head_dim(self) -> int:
    return self.hidden // self.num_heads

  def attention(self, q, k, v, mask):
    """The model's one attention call: `partition_attention` with the config's impl."""
    return partition_attention(q, k, v, mask, impl=self.attn_impl, block_q=self.block_q,
                               block_kv=self.block_kv)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def constrain(self, x_BxLxH):
    """States the [batch, length, hidden] sharding of a block's activations."""
    return sharding.with_logical_constraint(x_BxLxH, ("batch", "length", "act_embed"),
                                            self.logical_axis_rules)


REMAT_ALIASES = {"full": "nothing_saveable"}


def remat_policy(name: str):
  """None for "none", else the `jax.checkpoint_policies` policy called `name`."""
  if name == "none":
    return None
  attr = REMAT_ALIASES.get(name, name)
  policy = getattr(jax.checkpoint_policies, attr, None)
  # Policies take (prim, *args, **params); factories (save_only_these_names, ...) need
  # arguments we cannot take from a string.
  if policy is None or attr.startswith(("save_", "offload", "save_and_offload")):
    known = ["none", "full"] + sorted(
        n for n in dir(jax.checkpoint_policies) if n.endswith("saveable"))
    raise ValueError(f"config.model.remat={name!r}: expected one of {known}")
  return policy


def maybe_remat(block_cls, cfg: ModelConfig, static_argnums: tuple[int, ...]):
  """`block_cls`, rematerialised with cfg.remat's policy (same parameter names).

  `static_argnums` count `self` as 0 (flax's convention) and must cover the Python
  flags (train, decode), which the block then has to receive positionally.
  """
  policy = remat_policy(cfg.remat)
  if policy is None:
    return block_cls
  return nn.remat(block_cls, policy=policy, prevent_cse=True, static_argnums=static_argnums)


# ----------------------------------------------------------------------------
# Initialisers (PyTorch defaults, so that a fresh model matches the reference's).
# ----------------------------------------------------------------------------

def torch_linear_kernel_init():
  """nn.Linear weight default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def logical(init: Callable, names: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(init, names)


class Linear(nn.Module):
  """Dense layer with PyTorch default init (or zero init, or Xavier-uniform with a zero
  bias: `xavier=True`, MaskGIT's init) and logical axes."""
  features: int
  in_axis: str
  out_axis: str
  use_bias: bool = True
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  xavier: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    if self.zero_init:
      kernel_init, bias_init = nn.initializers.zeros_init(), nn.initializers.zeros_init()
    elif self.xavier:
      kernel_init, bias_init = nn.initializers.xavier_uniform(), nn.initializers.zeros_init()
    else:
      kernel_init, bias_init = torch_linear_kernel_init(), torch_linear_bias_init(fan_in)
    kernel = self.param("kernel", logical(kernel_init, (self.in_axis, self.out_axis)),
                        (fan_in, self.features), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param("bias", logical(bias_init, (self.out_axis,)), (self.features,),
                        jnp.float32)
    return dense(x, kernel, bias, self.dtype)


def dense(x, kernel, bias, dtype):
  """x @ kernel (+ bias) in `dtype` with float32 accumulation (every Linear's numerics)."""
  y = jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype),
                 preferred_element_type=jnp.float32).astype(dtype)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


class ScaleLayerNorm(nn.Module):
  """The reference's LayerNorm: scale only, no bias, eps 1e-5, computed in float32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale


class AffineLayerNorm(nn.Module):
  """torch.nn.LayerNorm(H): scale and bias, eps 1e-5, float32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    h = x.shape[-1]
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("embed",)), (h,),
                       jnp.float32)
    bias = self.param("bias", logical(nn.initializers.zeros_init(), ("embed",)), (h,),
                      jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


# ----------------------------------------------------------------------------
# Rotary embeddings (non-interleaved rotate-half, as flash-attn's default).
# ----------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, base: float) -> jax.Array:
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, base: float) -> jax.Array:
  """Rotates q or k at the given ORIGINAL sequence positions (float32 math)."""
  head_dim = x_BxLxHxD.shape[-1]
  freqs_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, base)
  emb_BxLxD = jnp.concatenate([freqs_BxLxF, freqs_BxLxF], axis=-1)
  cos, sin = jnp.cos(emb_BxLxD)[:, :, None, :], jnp.sin(emb_BxLxD)[:, :, None, :]
  x32 = x_BxLxHxD.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BxLxHxD.dtype)


def sinusoidal_embedding(positions: jax.Array, dim: int, max_period: float = 10000.0):
  """[cos(p f_k) | sin(p f_k)], f_k = max_period^(-k/(dim/2)) for k < dim/2 (float32)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = positions.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------
# Embeddings and conditioning.
# ----------------------------------------------------------------------------

class VocabEmbedding(nn.Module):
  """`vocab_embed.embedding` [V, H], init U(+-1/sqrt(H)) (kaiming_uniform a=sqrt(5))."""
  vocab_size: int
  hidden: int

  @nn.compact
  def __call__(self, tokens_BxL):
    bound = 1.0 / math.sqrt(self.hidden)

    def init(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    table = self.param("embedding", logical(init, ("vocab", "embed")),
                       (self.vocab_size, self.hidden), jnp.float32)
    return jnp.take(table, tokens_BxL, axis=0)


class ClassEmbedding(nn.Module):
  """A class-label table [num_classes + 1, H] (the last row is the null class of
  classifier-free guidance), init N(0, stddev^2); returns float32 [B, H]."""
  num_embeddings: int
  features: int
  stddev: float = 1.0

  @nn.compact
  def __call__(self, labels_B):
    table = self.param("embedding", logical(nn.initializers.normal(self.stddev), (None, "cond")),
                       (self.num_embeddings, self.features), jnp.float32)
    return jnp.take(table, labels_B, axis=0)


class TimestepEmbedder(nn.Module):
  """`sigma_map`: sinusoid(256) -> Linear(256, c) -> SiLU -> Linear(c, c)."""
  cond_dim: int
  freq_dim: int = 256

  @nn.compact
  def __call__(self, sigma_B):
    freqs = sinusoidal_embedding(sigma_B, self.freq_dim)
    h = Linear(self.cond_dim, "freq", "cond", name="mlp_0")(freqs)
    h = nn.silu(h)
    return Linear(self.cond_dim, "cond_mlp", "cond", name="mlp_2")(h)


class MLP(nn.Module):
  """Linear(H, 4H) -> tanh-GELU -> Linear(4H, H), with biases."""
  hidden: int
  mlp_ratio: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    h = Linear(self.mlp_ratio * self.hidden, "embed", "mlp", dtype=self.dtype, name="fc_0")(x)
    h = nn.gelu(h, approximate=True)
    return Linear(self.hidden, "mlp", "embed", dtype=self.dtype, name="fc_2")(h)


def split_heads(x_BxLxE, num_heads):
  b, l, e = x_BxLxE.shape
  return x_BxLxE.reshape(b, l, num_heads, e // num_heads)


def merge_heads(x_BxLxHxD):
  b, l, h, d = x_BxLxHxD.shape
  return x_BxLxHxD.reshape(b, l, h * d)


# ----------------------------------------------------------------------------
# Transformer blocks.
# ----------------------------------------------------------------------------

def attention_out_and_mlp(cfg: ModelConfig, skip_BxLxH, att_BxLxHxD, mods_Bx1x6H, *,
                          train: bool):
  """The tail every block shares (call inside a compact method; creates the submodules
  `attn_out`, `norm2`, `mlp`): W_out, gated residual, then the adaLN-modulated MLP branch.
  """
  _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods_Bx1x6H, 6, -1)
  att = Linear(cfg.hidden, "heads_dim", "embed", use_bias=False, dtype=cfg.compute_dtype,
               name="attn_out")(merge_heads(att_BxLxHxD))
  att = nn.Dropout(cfg.dropout, deterministic=not train)(att)
  x = skip_BxLxH + gate_msa * att.astype(jnp.float32)
  h = modulate(ScaleLayerNorm(name="norm2")(x), shift_mlp, scale_mlp)
  h = MLP(cfg.hidden, cfg.mlp_ratio, cfg.compute_dtype, name="mlp")(h)
  h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
  return x + gate_mlp * h.astype(jnp.float32)


class DiTBlock(nn.Module):
  """MDLM DDiT block (also the PGM encoder block): adaLN-modulated self-attention + MLP."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxH, cond_BxC, positions_BxL, mask: AttentionMask, train: bool,
               decode: bool = False, kv_prefix=None, return_kv: bool = False):
    """With decode=True (autoregressive sampling) k/v are appended to a "cache"
    collection of full length (created by an init call on a full-length input) and
    the new queries attend to every cached key up to and including their own.

    kv_prefix: optional (k, v) [B, P, heads, head_dim] (RoPE applied) put before this
    call's own keys (an explicit cache: the block PGM); `mask` then covers the P + L keys.
    return_kv: also return this call's own (k, v), for the caller to cache."""
    cfg = self.config
    dt = cfg.compute_dtype
    mods = Linear(6 * cfg.hidden, "cond", "adaln", zero_init=True,
                  name="adaLN_modulation")(cond_BxC)[:, None, :]
    shift_msa, scale_msa = jnp.split(mods, 6, -1)[:2]

    skip = x_BxLxH
    h = modulate(ScaleLayerNorm(name="norm1")(x_BxLxH), shift_msa, scale_msa)
    qkv = Linear(3 * cfg.hidden, "embed", "qkv", use_bias=False, dtype=dt, name="attn_qkv")(h)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q = apply_rope(split_heads(q, cfg.num_heads), positions_BxL, cfg.rope_base)
    k = apply_rope(split_heads(k, cfg.num_heads), positions_BxL, cfg.rope_base)
    v = split_heads(v, cfg.num_heads)
    own_kv = (k, v)
    if decode:
      k, v, mask = self._update_cache(k, v)
    if kv_prefix is not None:
      k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)
    att = cfg.attention(q, k, v, mask)
    out = cfg.constrain(attention_out_and_mlp(cfg, skip, att, mods, train=train))
    return (out, own_kv) if return_kv else out

  def _update_cache(self, k_BxNxHxD, v_BxNxHxD):
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxNxHxD.shape, k_BxNxHxD.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxNxHxD.shape,
                             v_BxNxHxD.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    batch, max_len = cached_k.value.shape[:2]
    if not initialized:  # the init call: full-length shapes, causal over the input
      return k_BxNxHxD, v_BxNxHxD, AttentionMask(kind="causal")
    i, n = index.value, k_BxNxHxD.shape[1]
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxNxHxD, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxNxHxD, (0, i, 0, 0))
    index.value = i + n
    # n new queries at cache slots i..i+n-1; each sees the keys up to its own slot.
    if n != 1:
      raise ValueError("decode=True feeds one token per call")
    mask = AttentionMask.packed(jnp.full((batch,), i + 1, jnp.int32), max_len)
    return cached_k.value, cached_v.value, mask


class VocabProjection(nn.Module):
  """`output_layer.linear`: Linear(H, V) with bias, zero init (same parameters as `Linear`).

  `__call__` gives float32 logits [B, L, V]. `target_log_probs` gives only
  log p(target) [B, L]: the projection, logit[MASK] = mask_logit, the float32
  log-softmax and the gather run over chunks of `loss_chunk_len` positions under
  `jax.checkpoint`, so neither the forward nor the backward pass ever holds more than
  one float32 [B, chunk, V] block (6.6 GB at B 32, L 1024, V 50258 otherwise).
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    zeros = nn.initializers.zeros_init()
    self.kernel = self.param("kernel", logical(zeros, ("embed", "vocab")),
                             (cfg.hidden, cfg.vocab_size), jnp.float32)
    self.bias = self.param("bias", logical(zeros, ("vocab",)), (cfg.vocab_size,), jnp.float32)

  def __call__(self, h_BxLxH):
    return dense(h_BxLxH, self.kernel, self.bias, self.config.compute_dtype).astype(jnp.float32)

  def target_log_probs(self, h_BxLxH, targets_BxL, mask_logit: float):
    return projected_log_probs(self.config, h_BxLxH, self.kernel, self.bias, targets_BxL,
                               mask_logit)


def projected_log_probs(cfg: ModelConfig, h_BxLxH, kernel_HxV, bias_V, targets_BxL,
                        mask_logit: float):
  """log p(target) [B, L] of the projection h @ kernel + bias, after logit[MASK] =
  mask_logit, chunked over `cfg.loss_chunk_len` positions (see `VocabProjection`)."""

  def chunk_log_probs(h, targets):
    logits = dense(h, kernel_HxV, bias_V, cfg.compute_dtype)
    return token_log_probs(logits, targets, cfg.mask_id, mask_logit=mask_logit)

  batch, length, hidden = h_BxLxH.shape
  chunk = cfg.loss_chunk_len
  if chunk <= 0 or chunk >= length:
    return chunk_log_probs(h_BxLxH, targets_BxL)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  if pad:
    h_BxLxH = jnp.pad(h_BxLxH, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
  h_NxBxCxH = h_BxLxH.reshape(batch, num_chunks, chunk, hidden).swapaxes(0, 1)
  t_NxBxC = targets_BxL.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
  # The kernel and bias are closed over: their cotangents accumulate across chunks.
  step = jax.checkpoint(chunk_log_probs)
  logp_NxBxC = jax.lax.map(lambda args: step(*args), (h_NxBxCxH, t_NxBxC))
  return logp_NxBxC.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]


class FinalLayer(nn.Module):
  """`output_layer`: LN, modulate([shift, scale]), Linear(H, V) (zero init).

  Returns float32 logits [B, L, V], or, given `targets_BxL`, float32 log p(target)
  [B, L] after logit[MASK] = `mask_logit` (see `VocabProjection.target_log_probs`).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxH, cond_BxC, targets_BxL=None, mask_logit: float = -jnp.inf):
    cfg = self.config
    mods = Linear(2 * cfg.hidden, "cond", "adaln", zero_init=True,
                  name="adaLN_modulation")(cond_BxC)[:, None, :]
    shift, scale = jnp.split(mods, 2, -1)
    h = modulate(ScaleLayerNorm(name="norm_final")(x_BxLxH), shift, scale)
    projection = VocabProjection(cfg, name="linear")
    if targets_BxL is None:
      return projection(h)
    return projection.target_log_probs(h, targets_BxL, mask_logit)


def conditioning(cfg: ModelConfig, batch: int, sigma_B=None, name: str = "sigma_map"):
  """t_cond = SiLU(sigma_map(sigma)).

  Without time conditioning (every released config) sigma = 0 whatever is passed, as
  the reference's `_process_sigma` does; with it, sigma_B = -log alpha(t) is required.
  """
  if not cfg.time_conditioning:
    sigma_B = jnp.zeros((batch,), jnp.float32)
  elif sigma_B is None:
    raise ValueError("config.model.time_conditioning=True: the model needs sigma_B "
                     "(-log alpha(t)) on every call")
  sigma_B = jnp.broadcast_to(jnp.asarray(sigma_B, jnp.float32), (batch,))
  return nn.silu(TimestepEmbedder(cfg.cond_dim, name=name)(sigma_B))

