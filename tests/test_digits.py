"""The offline image default: the vendored digits, PNG grids, the Frechet distance, the
digits classifier, and an end-to-end train -> sample -> eval -> bench run on a tiny preset."""
import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, load_config
from pgm_jax import train
from pgm_jax.tools import bench
from pgm_jax.data import images
from pgm_jax.evaluation import digits_classifier, evaluate, fid
from pgm_jax import sample as generate


def test_vendored_digits():
  path = os.path.join(REPO_ROOT, images.DIGITS_PATH)
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == (
        "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22")
  for name in ("LICENSE", "PROVENANCE.md"):
    assert os.path.isfile(os.path.join(REPO_ROOT, "third_party/digits", name))
  pixels, labels = images.load_digits()
  assert pixels.shape == (1797, 8, 8) and pixels.max() == 16 and pixels.min() == 0
  assert sorted(set(labels.tolist())) == list(range(10))
  train_px, _ = images.digits_split("train")
  held_px, held_y = images.digits_split("validation")
  assert len(train_px) == 1437 and len(held_px) == 360
  np.testing.assert_array_equal(held_y, labels[::5])


def _decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 [H, W] (grey) or [H, W, 3] (RGB), decoded by Pillow."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  image = Image.open(io.BytesIO(data))
  assert image.format == "PNG" and image.mode in ("L", "RGB"), (image.format, image.mode)
  return np.asarray(image)


def _hand_written_png(image: np.ndarray) -> bytes:
  """The encoder images.encode_png had before it used Pillow (filter 0 rows, zlib level 9),
  kept as the oracle: the Pillow-written file must decode to the same pixels."""
  height, width = image.shape[:2]
  raw = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data +
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, 0 if image.ndim == 2 else 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
          + chunk(b"IEND", b""))


def test_png_grid_round_trip():
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
  grid = images.tile_grid(tiles, 2, 3, scale=2, pad=1)
  assert grid.shape == (2 * 17 + 1, 3 * 17 + 1)
  np.testing.assert_array_equal(_decode_png(images.encode_png(grid)), grid)
  np.testing.assert_array_equal(grid[1 + 17:1 + 17 + 16:2, 1 + 34:1 + 34 + 16:2], tiles[5])
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(images.encode_png(rgb)), rgb)
  tokens = np.concatenate([[[18]], np.arange(64).reshape(1, 64) % 17], axis=1)
  assert images.digits_to_pixels(tokens)[0, 2, 0] == round(16 * 255 / 16)


@pytest.mark.parametrize("shape", [(1, 1), (35, 52), (1, 1, 3), (5, 7, 3), (131, 196)])
def test_png_decodes_to_the_hand_written_encoders_pixels(shape):
  """Pillow's file and the former hand-written one decode to identical pixels (the bytes
  differ: Pillow picks a filter per row); a strided (non-contiguous) view is accepted."""
  rng = np.random.default_rng(sum(shape))
  image = rng.integers(0, 256, shape, dtype=np.uint8)
  if shape == (131, 196):  # a digits sample grid: large flat areas, white gaps
    image = images.tile_grid(rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), 2, 3, scale=8)
  ours = _decode_png(images.encode_png(image))
  assert ours.dtype == np.uint8 and ours.shape == image.shape
  np.testing.assert_array_equal(ours, _decode_png(_hand_written_png(image)))
  np.testing.assert_array_equal(ours, image)
  strided = np.repeat(image, 2, axis=1)[:, ::2]
  np.testing.assert_array_equal(_decode_png(images.encode_png(strided)), image)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 1), np.uint8), np.zeros(4, np.uint8)])
def test_png_refuses_other_layouts(bad):
  with pytest.raises(ValueError, match="encode_png: expected uint8"):
    images.encode_png(bad)


def test_frechet_distance_matches_an_eigenvalue_reference():
  """The distance `fd_classifier` uses (evaluation.fid), on random features."""
  rng = np.random.default_rng(1)
  a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
  b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # tr((S1 S2)^1/2) = sum of sqrt(eigenvalues) of the symmetric S1^1/2 S2 S1^1/2.
  w, v = np.linalg.eigh(s1)
  root1 = v @ np.diag(np.sqrt(w)) @ v.T
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
  expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  assert fid.frechet_distance_of_features(a, mu2, s2) == pytest.approx(expected, rel=1e-8)
  assert fid.frechet_distance_of_features(a, mu1, s1) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_digits_classifier_is_accurate_on_held_out_digits():
  clf = digits_classifier.train_classifier()
  assert clf.accuracy > 0.95
  held, labels = images.digits_split("validation")
  assert clf.features(digits_classifier.levels_to_inputs(held)).shape == (360, 64)
  with pytest.raises(ValueError, match="levels outside"):
    digits_classifier.levels_to_inputs(np.full((1, 64), 17))


@pytest.mark.slow
def test_tiny_digits_train_sample_eval_bench(tmp_path):
  """Train a handful of steps (PNG grid at the end), then --mode=sample, eval and bench
  through the same functions main.py calls."""
  workdir = str(tmp_path / "pgm")
  config = load_config("digits", "tiny")
  history = train.train_and_evaluate(config, workdir)
  assert history["step"] == 6 and np.isfinite(history["train/loss"])
  assert history["val/batches"] == 1 and "val/nll" in history
  assert os.path.isfile(os.path.join(workdir, "samples_step6.png"))
  grid = np.load(os.path.join(workdir, "samples_step6.npz"))
  assert grid["codes"].shape == (20, 8, 8) and grid["codes"].max() < 17
  np.testing.assert_array_equal(grid["labels"], np.repeat(np.arange(10), 2))

  # The same sampler shapes as the grid at the end of training: nothing new to compile.
  info = generate.sample(config, workdir)
  png = _decode_png(open(info["png"], "rb").read())
  assert png.shape == (10 * 65 + 1, 2 * 65 + 1)  # 10 classes x 2 samples of 64 px, 1 px gaps
  np.testing.assert_array_equal(np.load(info["npz"])["labels"], np.repeat(np.arange(10), 2))

  result = evaluate(config, workdir)
  stored = json.load(open(os.path.join(workdir, "eval.json")))
  for key in ("sample_class_accuracy", "fd_classifier", "classifier_accuracy", "steps",
              "sampler", "cfg_w", "images_per_s"):
    assert key in stored and stored[key] == result[key]
  assert stored["sampler"] == "halton" and stored["num_samples"] == 20
  assert 0.0 <= stored["sample_class_accuracy"] <= 1.0 and stored["fd_classifier"] > 0

  config.bench.repeats, config.bench.warmup, config.bench.steps = 1, 1, 2
  config.bench.latency_batch_size = config.bench.batch_size  # no extra programs to compile
  report = bench.run_bench(config, str(tmp_path / "bench"))
  stored = json.load(open(tmp_path / "bench" / "bench.json"))
  for key in ("throughput_ratio", "flop_ratio", "analytic_flop_ratio", "latency_ratio"):
    assert stored[key] == report[key] and stored[key] > 0
  assert report["flop_ratio"] == pytest.approx(
      report["maskgit"]["flops_per_image"] / report["pgm"]["flops_per_image"])
  assert report["throughput_ratio"] == pytest.approx(
      report["pgm"]["images_per_s"] / report["maskgit"]["images_per_s"])
  assert report["setting"]["baseline"] == "maskgit"
