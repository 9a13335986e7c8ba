"""Images as token grids: the code vocabulary, the vendored digits, PNG grids.

An image is a row-major grid of G x G discrete codes (pixels for the digits, VQ codes for
ImageNet). A training example is {"tokens": int32 [1 + G*G] = [BOS] + codes, "labels": int32},
so that position 0 holds BOS as in text and a code at grid cell (row, col) sits at position
1 + row * G + col. The vocabulary is the codes, then MASK, then BOS (`ImageVocab`).

Sources (`config.data.name`):
  "digits"  third_party/digits/digits.csv.gz: the 1,797 8x8 UCI handwritten digits (17 grey
            levels, 10 classes) that scikit-learn ships. Images whose index is a multiple of 5
            (360) are held out ("validation"), the other 1,437 are "train".
The VQ codes of ImageNet are the pipeline's "imagenet_codes" source (pgm_jax.data.imagenet),
with the same example layout; for it, `ImageVocab(16384, 32)` has the ids of
`imagenet.CodesVocab` (MASK 16384, BOS 16385).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import os

import grain
import numpy as np
from PIL import Image

import pgm_jax

DIGITS_PATH = "third_party/digits/digits.csv.gz"
DIGITS_LEVELS = 17        # grey levels 0..16
DIGITS_GRID = 8
DIGITS_CLASSES = 10
DIGITS_HELD_OUT_EVERY = 5  # image i is held out iff i % 5 == 0


@dataclasses.dataclass(frozen=True)
class ImageVocab:
  """Codes 0..num_codes-1, then MASK = num_codes, BOS = num_codes + 1.

  Duck-types the text tokenizers' ids (`vocab_size`, `mask_id`, `bos_id`, `eos_id`, `pad_id`,
  `name`) so that the experiment builder treats both modalities alike. There is no EOS; `eos_id`
  and `pad_id` are BOS, which no image sampler ever draws.
  """
  num_codes: int
  grid: int

  @property
  def vocab_size(self) -> int:
    return self.num_codes + 2

  @property
  def mask_id(self) -> int:
    return self.num_codes

  @property
  def bos_id(self) -> int:
    return self.num_codes + 1

  eos_id = bos_id
  pad_id = bos_id

  @property
  def name(self) -> str:
    return f"image_codes:{self.num_codes}"

  @property
  def seq_len(self) -> int:
    return 1 + self.grid * self.grid


def image_vocab(data_config) -> ImageVocab:
  """The vocabulary of `config.data` (`num_codes`, `grid`), checked against `seq_len`."""
  num_codes, grid = int(data_config.num_codes), int(data_config.grid)
  if num_codes < 2 or grid < 1:
    raise ValueError(f"config.data.num_codes={num_codes} and config.data.grid={grid} must be "
                     ">= 2 and >= 1")
  vocab = ImageVocab(num_codes, grid)
  if int(data_config.seq_len) != vocab.seq_len:
    raise ValueError(f"config.data.seq_len={data_config.seq_len} must be 1 + config.data.grid^2 "
                     f"= {vocab.seq_len} (BOS + the code grid)")
  return vocab


# ----------------------------------------------------------------------------------------------
# The digits.
# ----------------------------------------------------------------------------------------------
def _resolve(path: str, key: str) -> str:
  cands = [path] if os.path.isabs(path) else [os.path.join(pgm_jax.REPO_ROOT, path),
                                              os.path.abspath(path)]
  for c in cands:
    if os.path.isfile(c):
      return c
  raise ValueError(f"{key}: file not found: {path}")


_DIGITS_CACHE: dict = {}


def load_digits(path: str = DIGITS_PATH) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 8, 8] with levels 0..16, labels int32 [1797]) from the vendored CSV."""
  path = _resolve(path, "config.data.digits_path")
  if path not in _DIGITS_CACHE:
    with gzip.open(path, "rt") as f:
      rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != DIGITS_GRID ** 2 + 1:
      raise ValueError(f"config.data.digits_path: {path} has shape {rows.shape}, expected "
                       f"[N, {DIGITS_GRID ** 2 + 1}]")
    images = rows[:, :-1].reshape(-1, DIGITS_GRID, DIGITS_GRID)
    if images.min() < 0 or images.max() >= DIGITS_LEVELS:
      raise ValueError(f"config.data.digits_path: pixels outside 0..{DIGITS_LEVELS - 1}")
    _DIGITS_CACHE[path] = (images.astype(np.uint8), rows[:, -1].astype(np.int32))
  return _DIGITS_CACHE[path]


def digits_split(split: str, path: str = DIGITS_PATH) -> tuple[np.ndarray, np.ndarray]:
  """The "train" (1,437) or "validation" (360, every 5th image) digits."""
  images, labels = load_digits(path)
  held_out = np.arange(len(images)) % DIGITS_HELD_OUT_EVERY == 0
  keep = held_out if split == "validation" else ~held_out
  return images[keep], labels[keep]


@dataclasses.dataclass(frozen=True)
class GridToExample:
  """(codes [G, G], label) -> {"tokens": [BOS] + row-major codes, "labels", "valid"}."""
  bos_id: int

  def __call__(self, item) -> dict[str, np.ndarray]:
    codes, label = item
    tokens = np.concatenate([[self.bos_id], np.asarray(codes, np.int32).reshape(-1)])
    return {"tokens": tokens.astype(np.int32), "labels": np.int32(label),
            "valid": np.ones(tokens.shape, np.bool_)}


@dataclasses.dataclass(frozen=True)
class _Indexed:
  """Picklable (images[i], labels[i]) lookup for grain."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return self.images[i], self.labels[i]


def _digits_source(data_config, vocab: ImageVocab, split: str) -> grain.MapDataset:
  if vocab.num_codes != DIGITS_LEVELS or vocab.grid != DIGITS_GRID:
    raise ValueError(f"config.data: digits have {DIGITS_LEVELS} levels on an {DIGITS_GRID}x"
                     f"{DIGITS_GRID} grid; set config.data.num_codes={DIGITS_LEVELS}, "
                     f"config.data.grid={DIGITS_GRID}")
  path = data_config.get("digits_path", None) or DIGITS_PATH
  images, labels = digits_split(split, path)
  return grain.MapDataset.source(_Indexed(images, labels)).map(GridToExample(vocab.bos_id))


def _digits_classes(data_config) -> int:
  path = data_config.get("digits_path", None) or DIGITS_PATH
  return int(load_digits(path)[1].max()) + 1


# config.data.name -> builder(data_config, vocab, split) -> MapDataset of example dicts with
# "tokens" int32 [1 + G*G] (BOS first), "labels" int32 and "valid" bool [1 + G*G].
IMAGE_SOURCES = {"digits": _digits_source}
# config.data.name -> (data_config -> the number of classes its labels span).
IMAGE_SOURCE_CLASSES = {"digits": _digits_classes}


def build_source(data_config, vocab: ImageVocab, split: str) -> grain.MapDataset:
  name = data_config.name
  if name not in IMAGE_SOURCES:
    raise ValueError(f"config.data.name: {name!r} is not an image source; expected one of "
                     f"{sorted(IMAGE_SOURCES)}")
  return IMAGE_SOURCES[name](data_config, vocab, split)


# ----------------------------------------------------------------------------------------------
# Tokens -> pixels -> PNG.
# ----------------------------------------------------------------------------------------------
def digits_to_pixels(tokens_BxL: np.ndarray) -> np.ndarray:
  """Digit token grids (BOS first) -> uint8 [B, 8, 8] grey images (level 16 = 255).

  Any id outside the 17 levels (MASK/BOS, which no sampler returns) shows as black.
  """
  codes = np.asarray(tokens_BxL)[:, 1:].reshape(-1, DIGITS_GRID, DIGITS_GRID).astype(np.int64)
  codes = np.where((codes >= 0) & (codes < DIGITS_LEVELS), codes, 0)
  return np.round(codes * (255.0 / (DIGITS_LEVELS - 1))).astype(np.uint8)


def tile_grid(images: np.ndarray, rows: int, cols: int, *, scale: int = 1,
              pad: int = 1) -> np.ndarray:
  """uint8 [rows*cols, H, W(, C)] -> one uint8 image: a rows x cols grid, row-major, each
  image upscaled `scale` times (nearest), separated by `pad` white pixels."""
  images = np.asarray(images, np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  if n != rows * cols:
    raise ValueError(f"tile_grid: {n} images do not fill {rows} x {cols}")
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = h * scale, w * scale
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = \
        images[i]
  return out[..., 0] if c == 1 else out


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W] (grey, PNG mode L) or [H, W, 3] (RGB) -> PNG bytes, written by Pillow."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and
                                                             image.shape[2] != 3):
    raise ValueError(f"encode_png: expected uint8 [H, W] or [H, W, 3], got {image.dtype} "
                     f"{image.shape}")
  buf = io.BytesIO()
  # zlib level 9, as the hand-written encoder this replaced used (Pillow's default is 6).
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=9)
  return buf.getvalue()
