r"""Inception-v3 of the FID / IS literature, in Flax, from a local weights file.

This is the network behind FID and IS as most papers compute them (TensorFlow's
2015-12-05 Inception graph, as ported to PyTorch by pytorch-fid and torch-fidelity; the
reference computes its metrics with torch-fidelity's "inception-v3-compat"). It differs
from torchvision's ImageNet Inception-v3 in ways that change the numbers:
  * 1008 output classes (fc 2048 -> 1008); BatchNorm eps 1e-3; convolutions without bias;
  * the 3x3 average pools of the A, C and first E blocks ignore the padding
    (count_include_pad=False); the last E block's pool branch is a 3x3 *max* pool;
  * input: uint8 pixels x -> (x - 128) / 128 at 299x299.
Outputs: the 2048-d global-average-pooled features ("pool", FID) and the logits without
the fc bias ("logits_unbiased", IS), as torch-fidelity provides them.

Weights: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release "fid_weights";
torch-fidelity ships the same file as `weights-inception-2015-12-05-6726825d.pth`). Convert
it once (needs torch) to a .npz that then loads without torch:

    python -m pgm_jax.tools.eval_assets convert_inception --from=pt_inception-2015-12-05-6726825d.pth \
        --to=inception_fid.npz

Input pipeline of the reference (torch-fidelity behind the reference's own resize):
float images in [-1, 1] -> (x + 1) * 127.5 -> PIL bicubic resize to 299x299 in float
mode (clean-fid's "clean" resizer) -> cast to uint8 -> (x - 128) / 128. `preprocess`
does the same on device: the resize is PIL's bicubic filter (a = -0.5, antialiased when
shrinking) as two resampling matrices; the cast clips to [0, 255] and truncates
(`overflow="clip"`). The reference's torch cast wraps values outside [0, 255] modulo 256
(bicubic overshoot at sharp edges turns -1 into 255); `overflow="wrap"` reproduces that.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
BN_EPS = 1e-3


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (inference statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel: tuple
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv",
                precision=jax.lax.Precision.HIGHEST)(x)
    bn = BatchNormInference(self.features, name="bn")
    return jax.nn.relu(bn(x))


class BatchNormInference(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _avg3(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _c(f, k, s=1, p=(0, 0), name=None):
  return BasicConv2d(f, k if isinstance(k, tuple) else (k, k), s, p, name=name)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _c(64, 1, name="branch1x1")(x)
    b5 = _c(48, 1, name="branch5x5_1")(x)
    b5 = _c(64, 5, p=(2, 2), name="branch5x5_2")(b5)
    b3 = _c(64, 1, name="branch3x3dbl_1")(x)
    b3 = _c(96, 3, p=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = _c(96, 3, p=(1, 1), name="branch3x3dbl_3")(b3)
    bp = _c(self.pool_features, 1, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _c(384, 3, s=2, name="branch3x3")(x)
    bd = _c(64, 1, name="branch3x3dbl_1")(x)
    bd = _c(96, 3, p=(1, 1), name="branch3x3dbl_2")(bd)
    bd = _c(96, 3, s=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = _c(192, 1, name="branch1x1")(x)
    b7 = _c(c7, 1, name="branch7x7_1")(x)
    b7 = _c(c7, (1, 7), p=(0, 3), name="branch7x7_2")(b7)
    b7 = _c(192, (7, 1), p=(3, 0), name="branch7x7_3")(b7)
    bd = _c(c7, 1, name="branch7x7dbl_1")(x)
    bd = _c(c7, (7, 1), p=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _c(c7, (1, 7), p=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _c(c7, (7, 1), p=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _c(192, (1, 7), p=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _c(192, 1, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _c(192, 1, name="branch3x3_1")(x)
    b3 = _c(320, 3, s=2, name="branch3x3_2")(b3)
    b7 = _c(192, 1, name="branch7x7x3_1")(x)
    b7 = _c(192, (1, 7), p=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _c(192, (7, 1), p=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _c(192, 3, s=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool: bool  # False: 3x3 average pool without padding (Mixed_7b); True: 3x3 max pool (Mixed_7c)

  @nn.compact
  def __call__(self, x):
    b1 = _c(320, 1, name="branch1x1")(x)
    b3 = _c(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([_c(384, (1, 3), p=(0, 1), name="branch3x3_2a")(b3),
                          _c(384, (3, 1), p=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = _c(448, 1, name="branch3x3dbl_1")(x)
    bd = _c(384, 3, p=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([_c(384, (1, 3), p=(0, 1), name="branch3x3dbl_3a")(bd),
                          _c(384, (3, 1), p=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg3(x)
    bp = _c(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Normalised input [B, H, W, 3] ((x - 128) / 128, H, W >= 75) -> (pool [B, 2048],
  logits_unbiased [B, 1008])."""

  @nn.compact
  def __call__(self, x):
    x = _c(32, 3, s=2, name="Conv2d_1a_3x3")(x)
    x = _c(32, 3, name="Conv2d_2a_3x3")(x)
    x = _c(64, 3, p=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = _c(80, 1, name="Conv2d_3b_1x1")(x)
    x = _c(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    return pool, UnbiasedFC(name="fc")(pool)


class UnbiasedFC(nn.Module):
  """fc 2048 -> 1008; returns x @ kernel without the bias (torch-fidelity's
  "logits_unbiased", the IS feature). The bias is kept so that the weights load whole."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
    self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    return jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# Resizing exactly like PIL (Image.resize with BICUBIC on mode "F" images)
# ----------------------------------------------------------------------------------------------
def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


@functools.lru_cache(maxsize=16)
def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of PIL's bicubic resampling along one axis (its
  precompute_coeffs: support 2 scaled by the shrink factor, taps clipped to the image and
  renormalised)."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  m = np.zeros([out_size, in_size], np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    taps = np.arange(xmin, xmax)
    w = _bicubic((taps - center + 0.5) / filterscale)
    total = w.sum()
    m[i, xmin:xmax] = w / total if total != 0 else w
  return m


def resize_bicubic(images_BxHxWxC, size: int = INPUT_SIZE):
  """PIL-bicubic resize of float images [B, H, W, C] to [B, size, size, C] (no clipping)."""
  _, h, w, _ = images_BxHxWxC.shape
  if (h, w) == (size, size):
    return images_BxHxWxC
  mh = jnp.asarray(pil_bicubic_matrix(h, size), jnp.float32)
  mw = jnp.asarray(pil_bicubic_matrix(w, size), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, images_BxHxWxC, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def preprocess(images, overflow: str = "clip"):
  """uint8 [B,H,W,3] or float [-1,1] [B,H,W,3] -> normalised network input [B,299,299,3]."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  else:
    raise ValueError(f"images: expected uint8 or float in [-1, 1], got dtype {images.dtype}")
  x = resize_bicubic(x, INPUT_SIZE)
  if overflow == "clip":
    x = jnp.floor(jnp.clip(x, 0.0, 255.0))
  elif overflow == "wrap":  # the reference's float -> uint8 cast on CPU: trunc, then mod 256
    x = jnp.mod(jnp.trunc(x), 256.0)
  else:
    raise ValueError(f"overflow: expected 'clip' or 'wrap', got {overflow!r}")
  return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Weights: pytorch-fid / torch-fidelity state dict <-> Flax params
# ----------------------------------------------------------------------------------------------
_LEAF_TO_TORCH = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
                  ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
                  ("bn", "var"): "bn.running_var"}


def torch_name(path) -> str:
  """('Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  if path[0] == "fc":
    return "fc.weight" if path[-1] == "kernel" else "fc.bias"
  return ".".join(list(path[:-2]) + [_LEAF_TO_TORCH[tuple(path[-2:])]])


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if hasattr(v, "items"):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@functools.lru_cache(maxsize=1)
def abstract_params():
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros(x.shape))["params"])


def params_from_state_dict(state_dict: dict) -> dict:
  """pytorch-fid / torch-fidelity Inception state dict -> Flax params (strict: every
  parameter found with its shape; only `num_batches_tracked` counters may be extra)."""
  sd = {k[len("module."):] if k.startswith("module.") else k:
        np.asarray(v.detach().cpu().double().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()}
  out: dict = {}
  missing, used = [], set()
  for path, leaf in _paths(abstract_params()):
    name = torch_name(path)
    if name not in sd:
      missing.append(name)
      continue
    used.add(name)
    w = sd[name]
    if path[-1] == "kernel":
      w = np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w.T
    if tuple(w.shape) != tuple(leaf.shape):
      raise ValueError(f"{name}: shape {tuple(w.shape)} does not fit the FID Inception's "
                       f"{tuple(leaf.shape)}")
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.asarray(w, np.float32)
  unexpected = sorted(k for k in sd if k not in used and not k.endswith("num_batches_tracked"))
  if missing or unexpected:
    raise ValueError(f"not the FID Inception-v3 state dict (pt_inception-2015-12-05): missing "
                     f"{missing[:6]} ({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})")
  return out


def save_npz(params, path: str):
  flat = {"/".join(p): np.asarray(v) for p, v in _paths(params)}
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_params(path: str, *, unsafe_pickle: bool = False) -> dict:
  """Flax params from a converted .npz or from the PyTorch .pth itself (needs torch)."""
  if not path or not os.path.isfile(os.path.expanduser(path)):
    raise ValueError(f"Inception weights: {path} does not exist (supply pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth or its conversion by "
                     "`python -m pgm_jax.tools.eval_assets convert_inception`)")
  path = os.path.expanduser(path)
  if path.endswith(".npz"):
    params: dict = {}
    with np.load(path) as z:
      for key in z.files:
        node = params
        *mods, leaf = key.split("/")
        for m in mods:
          node = node.setdefault(m, {})
        node[leaf] = z[key]
    want = {"/".join(p): tuple(v.shape) for p, v in _paths(abstract_params())}
    got = {"/".join(p): tuple(v.shape) for p, v in _paths(params)}
    if want != got:
      diff = sorted(set(want.items()) ^ set(got.items()))[:6]
      raise ValueError(f"Inception weights: {path} is not a converted FID Inception: {diff}")
    return params
  from pgm_jax.io import torch_files  # pylint: disable=g-import-not-at-top  # torch.load, safely
  obj, _ = torch_files.read_torch(path, unsafe_pickle=unsafe_pickle)
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"Inception weights: {path} holds a {type(obj).__name__}, not a state dict")
  return params_from_state_dict(obj)


@functools.lru_cache(maxsize=2)
def _forward(overflow: str):
  """One jitted program per overflow mode, shared by every extractor (params are an input)."""
  model = FIDInceptionV3()
  return jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x, overflow)))


class InceptionExtractor:
  """Jitted pool features and unbiased logits of image batches (any size, any H x W)."""

  def __init__(self, params, overflow: str = "clip"):
    if overflow not in ("clip", "wrap"):
      raise ValueError(f"overflow: expected 'clip' or 'wrap', got {overflow!r}")
    self.params = jax.tree.map(jnp.asarray, params)
    self.overflow = overflow
    self._fn = _forward(overflow)

  @classmethod
  def from_file(cls, path: str, **kwargs) -> "InceptionExtractor":
    return cls(load_params(path), **kwargs)

  def __call__(self, images) -> tuple[Any, Any]:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images: expected [B, H, W, 3], got shape {tuple(images.shape)}")
    return self._fn(self.params, images)
