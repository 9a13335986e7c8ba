"""ImageNet images -> VQ-8 code records (the tool behind `python -m pgm_jax.tools.preprocess
--tokenizer=vq_ds8`; the record format, the image sources and the Grain transform are in
`pgm_jax.data.imagenet`, which never runs a model).

    preprocess_images(source, out, vq_path, val_source=..., ...) -> meta dict
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time

import numpy as np

from pgm_jax.data.imagenet import (BOS_ID, IMAGE_SIZE, KIND, MASK_ID, VOCAB_SIZE, ImageSource,
                                   encode_record, make_source)


class _Encoder:
  """VQ encode of uint8 batches, data-parallel over the local devices."""

  def __init__(self, vq, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top
    self.vq = vq
    self.jax = jax
    devices = jax.local_devices()
    # Every call has this many rows (the last batch is padded): one compiled program.
    self.rows = -(-batch_size // len(devices)) * len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    b = images.shape[0]
    pad = self.rows - b
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    codes = self.vq.encode(self.jax.device_put(images, self.sharding))
    return np.asarray(codes)[:b]


def _write_split(source: ImageSource, path: str, encode, *, image_size: int, batch_size: int,
                 num_workers: int, hflip: bool, limit: int | None, log_every_s: float) -> dict:
  """Loads images on a thread pool (one batch ahead), encodes them and writes the records."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  n = min(len(source), limit) if limit else len(source)
  batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  t0 = last = time.time()
  records, done = 0, 0
  counts = np.zeros([max(len(source.classes), 1)], np.int64)
  with concurrent.futures.ThreadPoolExecutor(max(num_workers, 1)) as pool:
    submit = lambda idx: [pool.submit(source.load, i, image_size) for i in idx]
    ahead = submit(batches[0]) if batches else []
    for k in range(len(batches)):
      futures, ahead = ahead, (submit(batches[k + 1]) if k + 1 < len(batches) else [])
      loaded = [f.result() for f in futures]
      images = np.stack([im for im, _ in loaded])
      labels = np.asarray([y for _, y in loaded], np.int64)
      if labels.min() < 0 or labels.max() >= len(counts):
        raise ValueError(f"{source.name}: label {labels.max()} outside [0, {len(counts)})")
      for imgs in ([images, images[:, :, ::-1]] if hflip else [images]):
        for c, y in zip(encode(np.ascontiguousarray(imgs)), labels):
          writer.write(encode_record(c, int(y)))
          records += 1
      np.add.at(counts, labels, 1)
      done += len(labels)
      now = time.time()
      if now - last >= log_every_s:
        last = now
        print(f"[preprocess] {os.path.basename(path)}: {done}/{n} images "
              f"({done / max(now - t0, 1e-9):.1f} images/s)", file=sys.stderr, flush=True)
  writer.close()
  return {"images": int(n), "records": records, "hflip_copies": bool(hflip),
          "source": source.name, "seconds": round(time.time() - t0, 1),
          "images_per_class_min": int(counts.min()), "images_per_class_max": int(counts.max())}


def _write_images(train, val, tmp: dict, vq, vq_path: str, *, image_size: int, batch_size: int,
                  num_workers: int, hflip: str, limit: int | None, log_every_s: float) -> dict:
  """Writes both splits and meta.json to the paths in `tmp`; returns the meta dict."""
  encode = _Encoder(vq, batch_size)
  kw = dict(image_size=image_size, batch_size=batch_size, num_workers=num_workers,
            limit=limit, log_every_s=log_every_s)
  grid = image_size // vq.cfg.downsample
  train_info = _write_split(train, tmp["train.array_record"], encode,
                            hflip=hflip == "copy", **kw)
  val_info = _write_split(val, tmp["validation.array_record"], encode,
                          hflip=False, **kw)
  meta = dict(kind=KIND, tokenizer="vq_ds8", tokenizer_path=vq_path, image_size=image_size,
              codes_shape=[grid, grid], codes_per_image=grid * grid,
              codebook_size=vq.cfg.codebook_size, mask_id=MASK_ID, bos_id=BOS_ID,
              vocab_size=VOCAB_SIZE, seq_len=1 + grid * grid, num_classes=len(train.classes),
              classes=train.classes,
              transform=f"resize shorter side to {image_size} (PIL bilinear), center crop "
                        f"{image_size}x{image_size}, hflip={hflip}",
              record_format="msgpack map {codes: int32 little-endian bytes, row-major "
                            f"{grid}x{grid}; label: int}}",
              train=train_info, validation=val_info)
  with open(tmp["meta.json"], "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def preprocess_images(source: str, out: str, vq_path: str, *, val_source: str | None = None,
                      data_dir: str | None = None, image_size: int = IMAGE_SIZE,
                      batch_size: int = 64, num_workers: int = 8, hflip: str = "none",
                      limit: int | None = None, unsafe_pickle: bool = False,
                      log_every_s: float = 30.0, vq=None) -> dict:
  """Tokenizes a train and a validation image source to OUT/{train,validation}.array_record
  and OUT/meta.json; returns the meta dict. `vq` (a VQTokenizer) overrides `vq_path`."""
  if hflip not in ("none", "copy"):
    raise ValueError(f"--hflip: expected none or copy, got {hflip!r}")
  if batch_size < 1:
    raise ValueError(f"--batch_size: must be >= 1, got {batch_size}")
  if vq is None:
    from pgm_jax.models import vq as vq_lib  # pylint: disable=g-import-not-at-top
    vq = vq_lib.load_vq(vq_path, unsafe_pickle=unsafe_pickle)
  if image_size % vq.cfg.downsample:
    raise ValueError(f"--image_size: {image_size} is not a multiple of the VQ's "
                     f"downsampling {vq.cfg.downsample}")
  train = make_source(source, "train", data_dir, "--source")
  if val_source is None:
    if not source.startswith("tfds:") or "/" in source.partition(":")[2]:
      raise ValueError("--val_source: needed for an image folder (e.g. imagefolder:/data/imagenet/val)")
    val_source = f"{source}/validation"
  val = make_source(val_source, "validation", data_dir, "--val_source",
                    classes=train.classes if val_source.startswith("imagefolder:") else None)
  os.makedirs(out, exist_ok=True)
  # Temporary names, renamed over the old files only at the end (meta.json last): a failure
  # midway (a bad image, a full disk, Ctrl-C) leaves an existing OUT as it was.
  names = ("train.array_record", "validation.array_record", "meta.json")
  tmp = {name: os.path.join(out, f".{name}.tmp-{os.getpid()}") for name in names}
  try:
    meta = _write_images(train, val, tmp, vq, vq_path, image_size=image_size,
                         batch_size=batch_size, num_workers=num_workers, hflip=hflip,
                         limit=limit, log_every_s=log_every_s)
    for name in names:
      os.replace(tmp[name], os.path.join(out, name))
  finally:
    for path in tmp.values():
      if os.path.exists(path):
        os.remove(path)
  return meta
