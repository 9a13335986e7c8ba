r"""The LlamaGen VQ-8 image tokenizer (`vq_ds8_c2i.pt`) in Flax: 256x256 RGB <-> 32x32 codes.

The paper's image models work on the codes of LlamaGen's class-to-image VQGAN with
downsampling 8 (VQ-8): a convolutional encoder, a quantizer with 16384 entries of
dimension 8, and a convolutional decoder. We only run it (no training, no losses):

    vq = load_vq("vq_ds8_c2i.npz")          # or the PyTorch file itself (needs torch)
    codes = vq.encode(images)              # uint8 [B,256,256,3] or float [-1,1] -> int32 [B,32,32]
    images = vq.decode(codes)              # int32 [B,32,32] -> float32 [B,256,256,3], about [-1,1]
    pixels = images_to_uint8(images)

Architecture (LlamaGen `VQ_models["VQ-8"]`, ch 128, ch_mult (1,2,2,4), 2 res blocks,
z_channels 256, GroupNorm(32, eps 1e-6), swish):
  encoder  conv_in 3x3 -> per level i: 2 ResnetBlocks (+ self-attention at the last level),
           then a stride-2 3x3 conv with (0,1) padding except at the last level -> mid
           (res, attn, res) -> norm, swish, conv_out 3x3 to z_channels
  quant    quant_conv 1x1 to 8 dims; z and the codebook are both L2-normalised; the code is
           argmin |z - e|^2 (= argmax z.e); the code's vector is the normalised entry
  decoder  post_quant_conv 1x1 -> conv_in -> mid -> per level (reversed): 3 ResnetBlocks
           (+ attention at the first, lowest-resolution level) and a nearest x2 upsample with
           a 3x3 conv, except at the last -> norm, swish, conv_out 3x3 to RGB
Layout is NHWC (the PyTorch model is NCHW). Parameter paths mirror the PyTorch state-dict
names, with `.<digit>` folded into the module name (`encoder.conv_blocks.0.res.1.conv1.weight`
-> encoder/conv_blocks_0/res_1/conv1/kernel), so the converter is a rename plus a transpose.

Weights: `vq_ds8_c2i.pt` from LlamaGen's release (Hugging Face FoundationVision/LlamaGen,
the file the reference's download script fetches). Convert it once, with torch, to a .npz
that then loads without torch:

    python -m pgm_jax.tools.vq --from=vq_ds8_c2i.pt --to=vq_ds8_c2i.npz
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# LlamaGen's own checkpoint entries that are not weights of the forward pass.
IGNORED_TORCH_KEYS = ("quantize.codebook_used",)


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """VQ model hyperparameters; the defaults are LlamaGen's VQ-8 (`vq_ds8_c2i.pt`)."""
  codebook_size: int = 16384
  codebook_dim: int = 8
  ch: int = 128
  ch_mult: tuple = (1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 256
  norm_groups: int = 32
  dtype: str = "float32"       # compute dtype of convolutions and attention

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def validate(self):
    for i, m in enumerate(self.ch_mult):
      if (self.ch * m) % self.norm_groups:
        raise ValueError(f"VQConfig: ch*ch_mult[{i}]={self.ch * m} is not a multiple of "
                         f"norm_groups={self.norm_groups}")
    return self


def _conv(features: int, kernel: int, dtype, name: str | None, stride: int = 1,
          padding=None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, name=name)


def _norm(groups: int, name: str) -> nn.GroupNorm:
  # Exact two-pass variance (the fast E[x^2]-E[x]^2 form loses digits at eps=1e-6).
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                      dtype=jnp.float32, name=name)


def swish(x):
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  out_ch: int
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    h = swish(_norm(self.groups, "norm1")(x_BxHxWxC))
    h = _conv(self.out_ch, 3, self.dtype, "conv1")(h)
    h = swish(_norm(self.groups, "norm2")(h))
    h = _conv(self.out_ch, 3, self.dtype, "conv2")(h)
    if x_BxHxWxC.shape[-1] != self.out_ch:
      x_BxHxWxC = _conv(self.out_ch, 1, self.dtype, "nin_shortcut")(x_BxHxWxC)
    return x_BxHxWxC + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions (1x1-conv q, k, v, proj_out)."""
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, hh, ww, c = x_BxHxWxC.shape
    h = _norm(self.groups, "norm")(x_BxHxWxC)
    q_BxNxC = _conv(c, 1, self.dtype, "q")(h).reshape(b, hh * ww, c)
    k_BxNxC = _conv(c, 1, self.dtype, "k")(h).reshape(b, hh * ww, c)
    v_BxNxC = _conv(c, 1, self.dtype, "v")(h).reshape(b, hh * ww, c)
    att_BxNxN = jnp.einsum("bic,bjc->bij", q_BxNxC, k_BxNxC,
                           preferred_element_type=jnp.float32) * (c ** -0.5)
    att_BxNxN = jax.nn.softmax(att_BxNxN, axis=-1).astype(v_BxNxC.dtype)
    out = jnp.einsum("bij,bjc->bic", att_BxNxN, v_BxNxC).reshape(b, hh, ww, c)
    return x_BxHxWxC + _conv(c, 1, self.dtype, "proj_out")(out)


class Downsample(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    # PyTorch pads (0, 1) on the right and bottom, then a stride-2 3x3 conv without padding.
    return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, x2
    return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


class Level(nn.Module):
  """One resolution of the encoder or decoder: res_j (+ attn_j), then down/upsample."""
  out_ch: int
  num_blocks: int
  attn: bool
  resample: str | None   # "down" | "up" | None
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_blocks):
      h = ResnetBlock(self.out_ch, self.groups, self.dtype, name=f"res_{j}")(h)
      if self.attn:
        h = AttnBlock(self.groups, self.dtype, name=f"attn_{j}")(h)
    if self.resample == "down":
      h = Downsample(self.dtype, name="downsample")(h)
    elif self.resample == "up":
      h = Upsample(self.dtype, name="upsample")(h)
    return h


class Encoder(nn.Module):
  cfg: VQConfig

  @nn.compact
  def __call__(self, x_BxHxWx3):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    n = len(cfg.ch_mult)
    h = _conv(cfg.ch, 3, dt, "conv_in")(x_BxHxWx3.astype(dt))
    for i, mult in enumerate(cfg.ch_mult):
      h = Level(cfg.ch * mult, cfg.num_res_blocks, attn=i == n - 1,
                resample="down" if i != n - 1 else None, groups=cfg.norm_groups, dtype=dt,
                name=f"conv_blocks_{i}")(h)
    c = h.shape[-1]
    h = ResnetBlock(c, cfg.norm_groups, dt, name="mid_0")(h)
    h = AttnBlock(cfg.norm_groups, dt, name="mid_1")(h)
    h = ResnetBlock(c, cfg.norm_groups, dt, name="mid_2")(h)
    h = swish(_norm(cfg.norm_groups, "norm_out")(h))
    return _conv(cfg.z_channels, 3, dt, "conv_out")(h)


class Decoder(nn.Module):
  cfg: VQConfig

  @nn.compact
  def __call__(self, z_BxhxwxZ):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    n = len(cfg.ch_mult)
    c = cfg.ch * cfg.ch_mult[-1]
    h = _conv(c, 3, dt, "conv_in")(z_BxhxwxZ.astype(dt))
    h = ResnetBlock(c, cfg.norm_groups, dt, name="mid_0")(h)
    h = AttnBlock(cfg.norm_groups, dt, name="mid_1")(h)
    h = ResnetBlock(c, cfg.norm_groups, dt, name="mid_2")(h)
    for i, level in enumerate(reversed(range(n))):
      h = Level(cfg.ch * cfg.ch_mult[level], cfg.num_res_blocks + 1, attn=i == 0,
                resample="up" if i != n - 1 else None, groups=cfg.norm_groups, dtype=dt,
                name=f"conv_blocks_{i}")(h)
    h = swish(_norm(cfg.norm_groups, "norm_out")(h))
    return _conv(3, 3, dt, "conv_out")(h).astype(jnp.float32)


def l2_normalize(x, axis=-1):
  """x / max(|x|, 1e-12), as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


class VQModel(nn.Module):
  """Encoder, quantizer and decoder; `encode` and `decode` are the two entry points."""
  cfg: VQConfig
  # Positions per distance block in the nearest-code search: a [chunk, codebook] float32
  # block (4096 x 16384 = 256 MiB) instead of [B*H*W, codebook] at once.
  search_chunk: int = 4096

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = _conv(cfg.codebook_dim, 1, jnp.float32, None)
    self.post_quant_conv = _conv(cfg.z_channels, 1, jnp.float32, None)
    self.quantize = Codebook(cfg.codebook_size, cfg.codebook_dim)

  def latents(self, images_BxHxWx3):
    """Pre-quantisation latents z (not normalised), float32 [B, H/8, W/8, codebook_dim]."""
    return self.quant_conv(self.encoder(images_BxHxWx3).astype(jnp.float32))

  def encode(self, images_BxHxWx3):
    """Images float [-1, 1] (NHWC) -> codes int32 [B, H/8, W/8]."""
    return self.encode_with_latents(images_BxHxWx3)[0]

  def encode_with_latents(self, images_BxHxWx3):
    z = self.latents(images_BxHxWx3)
    b, h, w, d = z.shape
    codes = nearest_code(z.reshape(b * h * w, d), self.quantize.normalized(), self.search_chunk)
    return codes.reshape(b, h, w), z

  def decode(self, codes_Bxhxw):
    """Codes int32 [B, h, w] -> images float32 [B, 8h, 8w, 3] (about [-1, 1], not clipped)."""
    quant = jnp.take(self.quantize.normalized(), codes_Bxhxw, axis=0)
    return self.decoder(self.post_quant_conv(quant))

  def __call__(self, images_BxHxWx3):
    return self.decode(self.encode(images_BxHxWx3))


class Codebook(nn.Module):
  codebook_size: int
  codebook_dim: int

  def setup(self):
    self.embedding = nn.Embed(self.codebook_size, self.codebook_dim,
                              embedding_init=nn.initializers.uniform(2.0 / self.codebook_size))

  def normalized(self):
    return l2_normalize(self.embedding.embedding.astype(jnp.float32))


def nearest_code(z_NxD, codebook_KxD, chunk: int):
  """argmin_k |normalize(z) - e_k|^2 with e already normalised, in blocks of `chunk` rows."""
  z = l2_normalize(z_NxD.astype(jnp.float32))
  e_sq = jnp.sum(jnp.square(codebook_KxD), axis=1)
  n = z.shape[0]

  def block(zb):
    d = (jnp.sum(jnp.square(zb), axis=1, keepdims=True) + e_sq[None, :]
         - 2.0 * jnp.einsum("nd,kd->nk", zb, codebook_KxD, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=1).astype(jnp.int32)

  if n <= chunk:
    return block(z)
  pad = (-n) % chunk
  zp = jnp.pad(z, ((0, pad), (0, 0))).reshape(-1, chunk, z.shape[1])
  return jax.lax.map(block, zp).reshape(-1)[:n]


# ----------------------------------------------------------------------------------------------
# Images <-> model inputs
# ----------------------------------------------------------------------------------------------
def images_to_float(images):
  """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as ToTensor + Normalize(0.5, 0.5));
  floating input is taken to be in [-1, 1] already."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images: expected uint8 or float in [-1, 1], got dtype {images.dtype}")
  return images.astype(jnp.float32)


def images_to_uint8(images):
  """float [-1, 1] -> uint8: round((x + 1) * 127.5) clipped to [0, 255]."""
  x = jnp.clip(jnp.round((jnp.asarray(images, jnp.float32) + 1.0) * 127.5), 0, 255)
  return x.astype(jnp.uint8)


@functools.lru_cache(maxsize=8)
def _programs(cfg: VQConfig, search_chunk: int):
  """Jitted (encode_with_latents, decode), shared by every VQTokenizer of the same config."""
  model = VQModel(cfg, search_chunk=search_chunk)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, images_to_float(x),
                                            method=VQModel.encode_with_latents))
  decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQModel.decode))
  return encode, decode


def decode_program(cfg: VQConfig = VQConfig(), search_chunk: int = 4096):
  """The jitted decode(params, codes) that every VQTokenizer of `cfg` runs (plan mode
  compiles it)."""
  return _programs(cfg, search_chunk)[1]


class VQTokenizer:
  """A VQModel with its parameters and jitted `encode` / `decode` (any batch size)."""

  def __init__(self, params, cfg: VQConfig = VQConfig(), search_chunk: int = 4096):
    self.cfg = cfg.validate()
    self.model = VQModel(cfg, search_chunk=search_chunk)
    self.params = params
    self._encode, self._decode = _programs(cfg, search_chunk)

  @property
  def codebook_size(self) -> int:
    return self.cfg.codebook_size

  def encode(self, images):
    """uint8 [B,H,W,3] or float [-1,1] [B,H,W,3] -> int32 [B, H/8, W/8]."""
    return self.encode_with_latents(images)[0]

  def encode_with_latents(self, images):
    """(codes int32 [B, h, w], pre-quantisation latents float32 [B, h, w, codebook_dim])."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images: expected [B, H, W, 3], got shape {tuple(images.shape)}")
    f = self.cfg.downsample
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"images: height and width must be multiples of {f}, got {images.shape[1:3]}")
    return self._encode(self.params, images)

  def decode(self, codes):
    """int32 [B, h, w] in [0, codebook_size) -> float32 [B, 8h, 8w, 3]."""
    codes = jnp.asarray(codes)
    if codes.ndim != 3:
      raise ValueError(f"codes: expected [B, h, w], got shape {tuple(codes.shape)}")
    return self._decode(self.params, codes.astype(jnp.int32))


def init_params(cfg: VQConfig, rng, image_size: int = 256):
  """Randomly initialised parameters (for tests and shapes)."""
  x = jnp.zeros([1, image_size, image_size, 3], jnp.float32)
  return jax.jit(VQModel(cfg).init)(rng, x)["params"]


@functools.lru_cache(maxsize=8)
def abstract_params(cfg: VQConfig, image_size: int = 256):
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), image_size))


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# PyTorch state dict <-> Flax parameters
# ----------------------------------------------------------------------------------------------
def torch_name(path: Sequence[str]) -> str:
  """('encoder', 'conv_blocks_0', 'res_1', 'conv1', 'kernel') -> encoder.conv_blocks.0.res.1.conv1.weight"""
  *mods, leaf = path
  parts = []
  for m in mods:
    match = re.fullmatch(r"(.*)_(\d+)", m)
    parts += [match.group(1), match.group(2)] if match else [m]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
  return ".".join(parts + [leaf])


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def params_from_state_dict(state_dict: dict, cfg: VQConfig = VQConfig()) -> dict:
  """LlamaGen VQModel state dict (name -> array) -> Flax params of `VQModel(cfg)`.

  Every Flax parameter must be found with the right shape; unknown keys are an error
  (except LlamaGen's `quantize.codebook_used` usage buffer).
  """
  sd = {}
  for k, v in state_dict.items():
    for prefix in ("module.", "_orig_mod."):
      k = k[len(prefix):] if k.startswith(prefix) else k
    sd[k] = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v)
  abstract = abstract_params(cfg)
  out: dict = {}
  missing, used = [], set()
  for path, leaf in _paths(abstract):
    name = torch_name(path)
    if name not in sd:
      missing.append(name)
      continue
    w = sd[name]
    used.add(name)
    if path[-1] == "kernel":  # torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]
      if w.ndim != 4:
        raise ValueError(f"{name}: expected a 4-d conv weight, got shape {w.shape}")
      w = np.transpose(w, (2, 3, 1, 0))
    if tuple(w.shape) != tuple(leaf.shape):
      raise ValueError(f"{name}: shape {tuple(w.shape)} does not fit the VQ model's "
                       f"{tuple(leaf.shape)} (is this a VQ-8 checkpoint with codebook "
                       f"{cfg.codebook_size}x{cfg.codebook_dim}?)")
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.asarray(w, np.float32)
  unexpected = sorted(k for k in sd if k not in used and k not in IGNORED_TORCH_KEYS)
  if missing or unexpected:
    raise ValueError(f"VQ state dict does not match VQConfig {dataclasses.asdict(cfg)}: "
                     f"missing {missing[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)}), "
                     f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} "
                     f"({len(unexpected)})")
  return out


def state_dict_from_checkpoint(obj: Any, path: str) -> dict:
  """The VQModel weights of a loaded LlamaGen checkpoint: its "model" (or "ema", or
  "state_dict") entry, or the object itself when it is already a flat state dict."""
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
  for key in ("model", "ema", "state_dict"):
    if isinstance(obj.get(key), dict):
      return obj[key]
  if any(k.startswith("encoder.") for k in obj):
    return obj
  raise ValueError(f"{path}: no 'model' / 'ema' / 'state_dict' entry and no encoder.* keys "
                   f"(top-level keys: {sorted(obj)[:10]})")


def save_npz(params, path: str, cfg: VQConfig = VQConfig()):
  """Flat .npz: one array per parameter path ('encoder/conv_in/kernel'), plus the config."""
  flat = {"/".join(p): np.asarray(v) for p, v in _paths(params)}
  flat["__config__"] = np.frombuffer(json.dumps(dataclasses.asdict(cfg)).encode(), np.uint8)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_params(path: str, cfg: VQConfig | None = None, *, unsafe_pickle: bool = False):
  """(params, cfg) from a converted .npz, or from the PyTorch .pt itself (needs torch)."""
  if not os.path.isfile(path):
    raise ValueError(f"VQ weights: {path} does not exist (supply LlamaGen's vq_ds8_c2i.pt or its "
                     "conversion: python -m pgm_jax.tools.vq --from=vq_ds8_c2i.pt --to=vq.npz)")
  if path.endswith(".npz"):
    with np.load(path) as z:
      try:
        saved = VQConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in json.loads(bytes(z["__config__"]).decode()).items()})
      except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"VQ weights: {path} is not a converted VQ-8 .npz (its __config__ "
                         f"entry is missing or unreadable: {type(e).__name__}); convert "
                         f"LlamaGen's vq_ds8_c2i.pt with python -m pgm_jax.tools.vq") from None
      cfg = cfg or saved
      params: dict = {}
      for key in z.files:
        if key == "__config__":
          continue
        node = params
        *mods, leaf = key.split("/")
        for m in mods:
          node = node.setdefault(m, {})
        node[leaf] = z[key]
    want = {"/".join(p): tuple(v.shape) for p, v in _paths(abstract_params(cfg))}
    got = {"/".join(p): tuple(v.shape) for p, v in _paths(params)}
    if want != got:
      diff = sorted(set(want.items()) ^ set(got.items()))[:6]
      raise ValueError(f"VQ weights: {path} does not fit VQConfig {dataclasses.asdict(cfg)}: {diff}")
    return params, cfg
  from pgm_jax.io import torch_files  # pylint: disable=g-import-not-at-top  # torch.load, safely
  obj, _ = torch_files.read_torch(path, unsafe_pickle=unsafe_pickle)
  cfg = cfg or VQConfig()
  return params_from_state_dict(state_dict_from_checkpoint(obj, path), cfg), cfg


def load_vq(path: str, cfg: VQConfig | None = None, **kwargs) -> VQTokenizer:
  params, cfg = load_params(path, cfg, unsafe_pickle=kwargs.pop("unsafe_pickle", False))
  return VQTokenizer(jax.tree.map(jnp.asarray, params), cfg, **kwargs)


if __name__ == "__main__":
  raise SystemExit("pgm_jax.models.vq: error: the conversion command moved; run python -m "
                   "pgm_jax.tools.vq --from=vq_ds8_c2i.pt --to=vq_ds8_c2i.npz")
