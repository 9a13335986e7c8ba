r"""ImageNet as VQ codes: image sources, the record format and the records' Grain transform.

The one-time tokenization is a tool (`pgm_jax.tools.imagenet_codes`), run by (`python -m pgm_jax.tools.preprocess` with `--tokenizer=vq_ds8`):

    # an ImageNet folder: one subfolder per class (the wnids), train/ and val/ alike
    python -m pgm_jax.tools.preprocess --tokenizer=vq_ds8 --tokenizer_path=vq_ds8_c2i.npz \
        --source=imagefolder:/data/imagenet/train --val_source=imagefolder:/data/imagenet/val \
        --out=/data/imagenet256_codes
    # or TFDS imagenet2012 prepared as ArrayRecord (splits train / validation)
    python -m pgm_jax.tools.preprocess --tokenizer=vq_ds8 --tokenizer_path=vq_ds8_c2i.npz \
        --source=tfds:imagenet2012 --data_dir=~/tensorflow_datasets --out=/data/imagenet256_codes

Each image is resized so that its shorter side is 256 (PIL bilinear, antialiased; the
longer side int(256 * long / short)), center-cropped to 256x256 (torchvision's
Resize + CenterCrop, as the reference's tokenization), and encoded by the VQ-8
tokenizer to 32x32 codes. The reference does not flip (its RandomHorizontalFlip is
commented out), so `--hflip=none` is the default; `--hflip=copy` also writes the
mirrored image's codes as a second record of the train split (LlamaGen's
augmentation), never of validation.

Output (OUT/): train.array_record, validation.array_record and meta.json. A record is a
msgpack map {"codes": bytes, "label": int}: `codes` is int32 little-endian, 1024 values,
the 32x32 grid in row-major order; `label` is the class index in [0, 1000). Classes of
an image folder are its sorted subfolder names (for ImageNet the sorted wnids, which is
also TFDS's and the reference's label order).

Training reads it with `config.data.name = "imagenet_codes"`, `config.data.data_dir = OUT`
and `config.data.seq_len = 1025` (pgm_jax.data.pipeline): every example is
{"tokens": int32 [1025] = [BOS] + codes, "labels": int32, "valid": bool [1025] (all True)}.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

CODEBOOK_SIZE = 16384
MASK_ID = 16384          # the absorbing token
BOS_ID = 16385           # the first token of every sequence
VOCAB_SIZE = 16386       # codes + MASK + BOS
NUM_CLASSES = 1000
NULL_CLASS = 1000        # the class-embedding row of the unconditional (CFG) branch
IMAGE_SIZE = 256
GRID = 32                # 256 / 8
SEQ_LEN = 1 + GRID * GRID
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
KIND = "imagenet_codes"


@dataclasses.dataclass(frozen=True)
class CodesVocab:
  """Token ids of the image-code sequences (the image counterpart of a text tokenizer)."""
  name: str = "vq_ds8_c2i"
  vocab_size: int = VOCAB_SIZE
  codebook_size: int = CODEBOOK_SIZE
  mask_id: int = MASK_ID
  bos_id: int = BOS_ID
  pad_id: int = MASK_ID   # only in eval padding rows, whose `valid` is all False
  num_classes: int = NUM_CLASSES
  null_class: int = NULL_CLASS


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def resize_center_crop(img, size: int = IMAGE_SIZE):
  """torchvision Resize(size) + CenterCrop(size) on a PIL image (RGB)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def load_image(item, image_size: int | None = IMAGE_SIZE) -> np.ndarray:
  """A path, encoded image bytes or an HxWx3 uint8 array -> uint8 [S, S, 3] (resized and
  center-cropped to image_size; image_size=None keeps the size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  if isinstance(item, np.ndarray):
    img = Image.fromarray(item if item.ndim == 3 else np.stack([item] * 3, -1))
  elif isinstance(item, (bytes, bytearray)):
    img = Image.open(io.BytesIO(item))
  else:
    img = Image.open(item)
  img = img.convert("RGB")
  if image_size:
    img = resize_center_crop(img, image_size)
  return np.asarray(img, np.uint8)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def encode_record(codes, label: int) -> bytes:
  """codes int [h, w] or [h*w] (row-major) and a label -> one ArrayRecord record."""
  import msgpack  # pylint: disable=g-import-not-at-top
  codes = np.asarray(codes)
  if codes.size == 0 or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
    raise ValueError(f"codes: expected values in [0, {CODEBOOK_SIZE})")
  return msgpack.packb({"codes": codes.reshape(-1).astype("<i4").tobytes(), "label": int(label)})


def decode_record(record: bytes) -> dict[str, np.ndarray]:
  import msgpack  # pylint: disable=g-import-not-at-top
  obj = msgpack.unpackb(record)
  return {"codes": np.frombuffer(obj["codes"], dtype="<i4").astype(np.int32),
          "label": np.int32(obj["label"])}


@dataclasses.dataclass(frozen=True)
class CodesToExample:
  """Record -> {"tokens": [BOS] + codes (int32 [seq_len]), "labels": int32, "valid": all True}."""
  seq_len: int = SEQ_LEN
  bos_id: int = BOS_ID

  def __call__(self, record) -> dict[str, np.ndarray]:
    rec = decode_record(record)
    if rec["codes"].shape != (self.seq_len - 1,):
      raise ValueError(f"config.data.seq_len: {self.seq_len} but a record has "
                       f"{rec['codes'].shape[0]} codes (seq_len must be 1 + codes per image)")
    tokens = np.empty([self.seq_len], np.int32)
    tokens[0] = self.bos_id
    tokens[1:] = rec["codes"]
    return {"tokens": tokens, "labels": rec["label"], "valid": np.ones([self.seq_len], np.bool_)}


def read_meta(data_dir: str, seq_len: int) -> dict:
  path = os.path.join(data_dir, "meta.json")
  if not os.path.isfile(path):
    raise ValueError(f"config.data.data_dir: {path} not found (write it with python -m "
                     "pgm_jax.tools.preprocess --tokenizer=vq_ds8 ...)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("kind") != KIND:
    raise ValueError(f"config.data.data_dir: {path} is not ImageNet codes (kind={meta.get('kind')!r}); "
                     "config.data.name='imagenet_codes' reads the output of --tokenizer=vq_ds8")
  if 1 + int(meta["codes_per_image"]) != int(seq_len):
    raise ValueError(f"config.data.seq_len: {seq_len}, but {path} has {meta['codes_per_image']} codes "
                     f"per image (seq_len must be {1 + int(meta['codes_per_image'])})")
  return meta


# ----------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageSource:
  """Indexable images with labels: `load(i, size)` -> (uint8 [size, size, 3], label)."""
  name: str
  size: int
  classes: list[str]
  get: Any                 # i -> (image input of load_image, label)

  def __len__(self):
    return self.size

  def load(self, i: int, image_size: int) -> tuple[np.ndarray, int]:
    item, label = self.get(i)
    return load_image(item, image_size), int(label)


@dataclasses.dataclass(frozen=True)
class _FolderItems:
  paths: Sequence[str]
  labels: Sequence[int]

  def __call__(self, i):
    return self.paths[i], self.labels[i]


def folder_source(folder: str, flag: str, classes: list[str] | None = None) -> ImageSource:
  """ImageFolder layout: FOLDER/<class>/<image>; labels = index in sorted class names."""
  folder = os.path.expanduser(folder)
  if not os.path.isdir(folder):
    raise ValueError(f"{flag}: {folder} is not a directory")
  found = sorted(d.name for d in os.scandir(folder) if d.is_dir())
  if not found:
    raise ValueError(f"{flag}: {folder} has no class subfolders (expected FOLDER/<class>/<image>)")
  classes = list(classes) if classes is not None else found
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise ValueError(f"{flag}: class folders {unknown[:5]} of {folder} are not among the "
                     f"{len(classes)} training classes")
  index = {c: i for i, c in enumerate(classes)}
  paths, labels = [], []
  for c in found:
    files = sorted(f for f in os.listdir(os.path.join(folder, c))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(folder, c, f) for f in files]
    labels += [index[c]] * len(files)
  if not paths:
    raise ValueError(f"{flag}: no {'/'.join(IMAGE_EXTENSIONS)} images under {folder}")
  return ImageSource(folder, len(paths), classes, _FolderItems(paths, labels))


@dataclasses.dataclass(frozen=True)
class _TfdsItems:
  src: Any

  def __call__(self, i):
    rec = self.src[i]
    return np.asarray(rec["image"]) if not isinstance(rec["image"], bytes) else rec["image"], \
        int(rec["label"])


def tfds_source(name: str, split: str, data_dir: str | None, flag: str) -> ImageSource:
  """`tfds.data_source(name, split)` (ArrayRecord build, no TensorFlow): 'image', 'label'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{flag}: cannot open TFDS {name!r} split {split!r} in {data_dir} (prepare it "
                     f"with file_format='array_record'): {type(e).__name__}: {e}") from e
  if len(src) == 0:
    raise ValueError(f"{flag}: TFDS {name}/{split} is empty")
  try:
    classes = list(src.dataset_info.features["label"].names)
  except Exception:  # pylint: disable=broad-except
    classes = [str(i) for i in range(NUM_CLASSES)]
  return ImageSource(f"tfds:{name}/{split}", len(src), classes, _TfdsItems(src))


def make_source(spec: str, split: str, data_dir: str | None, flag: str,
                classes: list[str] | None = None) -> ImageSource:
  kind, _, arg = spec.partition(":")
  if kind == "imagefolder":
    return folder_source(arg, flag, classes)
  if kind == "tfds":
    name, _, sp = arg.partition("/")
    return tfds_source(name, sp or split, data_dir, flag)
  raise ValueError(f"{flag}: expected imagefolder:<dir> or tfds:<name>[/split] for images, got {spec!r}")


def iter_records(path: str) -> Iterator[dict[str, np.ndarray]]:
  """All records of one .array_record file, decoded (for inspection and tests)."""
  import grain  # pylint: disable=g-import-not-at-top
  src = grain.sources.ArrayRecordDataSource([path])
  for i in range(len(src)):
    yield decode_record(src[i])
