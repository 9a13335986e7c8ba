r"""FID and Inception Score of generated images, against reference statistics.

    result = fid_and_is(images_uint8, ref_stats="imagenet256_val_stats.npz",
                        weights_path="inception_fid.npz")
    # {"fid": ..., "inception_score": ..., "inception_score_std": ..., "num_images": N}

* Features: the 2048-d pool features and the bias-free logits of the FID Inception-v3
  (`pgm_jax.models.inception`), after the reference's resize to 299x299.
* FID: frechet_distance(mu, sigma of the generated images, mu, sigma of the reference)
  = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64, with the trace
  from a symmetric eigendecomposition (see frechet_distance). Covariances are unbiased
  (N - 1).
* IS: exp(E_x KL(p(y|x) || p(y))) on each of `splits` equal-as-possible chunks (10 by
  default) of the samples in a seeded random order, averaged; the std over chunks is
  reported too.
* Reference statistics: a local .npz with `mu` [2048] and `sigma` [2048, 2048] (what
  `save_ref_stats` / `python -m pgm_jax.tools.eval_assets fid_stats` write), or computed here
  from a folder of images (`ref_stats_from_folder`). The paper's reference is the 50,000
  ImageNet validation images, resized (shorter side 256) and center-cropped to 256x256.

Nothing is downloaded: the Inception weights come from a local file (docs/images.md).
Feature extraction is data-parallel over the local devices; with several processes each
passes its own images and the features are gathered (every process must pass the same
number), or every process passes the same images and each extracts its share of every
batch (`split_across_processes`: the FID of `--mode=eval`, equal to one process's).
"""
from __future__ import annotations

import glob as glob_lib
import os
import time
from typing import Iterable

import jax
import numpy as np
import scipy.special

from pgm_jax.models import inception

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------
# The two metrics
# ----------------------------------------------------------------------------------------------
def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_shapes(mu1, sigma1, mu2, sigma2):
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2: the
  value of pytorch-fid's scipy.linalg.sqrtm route without its complex round-off (tiny
  negative eigenvalues from round-off are clipped to 0).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  _check_shapes(mu1, sigma1, mu2, sigma2)
  root1 = _psd_sqrt(sigma1)
  eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_of_features(features, mu2, sigma2) -> float:
  """frechet_distance(mean, unbiased covariance of `features` [N, D], mu2, sigma2).

  With N <= D (fewer images than feature dimensions) the trace term is computed in the
  N-dimensional space instead: with X the centred features, S1 = X^T X / (N - 1) and the
  nonzero eigenvalues of S1 S2 are those of X S2 X^T / (N - 1), so the result is the same
  and costs N D^2 instead of D^3.
  """
  x = np.asarray(features, np.float64)
  mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
  n, d = x.shape
  if n > d:
    stats = stats_from_features(x)
    return frechet_distance(stats["mu"], stats["sigma"], mu2, sigma2)
  mu1 = x.mean(axis=0)
  _check_shapes(mu1, np.zeros([d, d]), mu2, sigma2)
  xc = (x - mu1) / np.sqrt(n - 1)
  eig = np.linalg.eigvalsh(xc @ sigma2 @ xc.T)
  tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(xc * xc) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score_splits(logits, splits: int = 10, shuffle_seed: int | None = 0) -> np.ndarray:
  """exp(mean KL(p(y|x) || p(y))) of each of `splits` chunks of the logits.

  The rows are first permuted with `shuffle_seed` (the reference shuffles too): samples
  generated class by class would otherwise give each chunk a few classes only and a
  much lower score. shuffle_seed=None keeps the given order.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
    raise ValueError(f"inception_score: need [N >= splits={splits}, classes] logits, "
                     f"got shape {logits.shape}")
  if shuffle_seed is not None:
    logits = logits[np.random.default_rng(shuffle_seed).permutation(logits.shape[0])]
  logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for part in np.array_split(logp, splits):
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0, keepdims=True))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_py), axis=1))))
  return np.asarray(scores)


def inception_score(logits, splits: int = 10, shuffle_seed: int | None = 0) -> float:
  """Inception Score (mean over `splits` chunks) of Inception logits [N, classes]."""
  return float(inception_score_splits(logits, splits, shuffle_seed).mean())


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def stats_from_features(features) -> dict:
  feats = np.asarray(features, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f"features: need [N >= 2, dim], got shape {feats.shape}")
  return {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False), "num_images": feats.shape[0]}


def save_ref_stats(path: str, stats: dict, source: str = ""):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], num_images=stats.get("num_images", -1),
           source=np.asarray(source))
  os.replace(tmp, path)


def load_ref_stats(path: str) -> dict:
  """{mu [D], sigma [D, D], num_images} from an .npz with `mu` and `sigma`."""
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise ValueError(f"reference statistics: {path} does not exist (write it with "
                     "`python -m pgm_jax.tools.eval_assets fid_stats`)")
  with np.load(path) as z:
    if "mu" not in z.files or "sigma" not in z.files:
      raise ValueError(f"reference statistics: {path} has no 'mu' / 'sigma' arrays (keys: {z.files})")
    mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    n = int(z["num_images"]) if "num_images" in z.files else -1
  if mu.shape != (inception.POOL_DIM,) or sigma.shape != (inception.POOL_DIM,) * 2:
    raise ValueError(f"reference statistics: {path} has mu {mu.shape}, sigma {sigma.shape}; "
                     f"expected ({inception.POOL_DIM},), ({inception.POOL_DIM}, {inception.POOL_DIM})")
  return {"mu": mu, "sigma": sigma, "num_images": n}


# ----------------------------------------------------------------------------------------------
# Features of many images
# ----------------------------------------------------------------------------------------------
def _batches(images, batch_size: int) -> Iterable[np.ndarray]:
  if isinstance(images, (np.ndarray, jax.Array)):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images: expected [N, H, W, 3], got shape {tuple(images.shape)}")
    for i in range(0, images.shape[0], batch_size):
      yield images[i:i + batch_size]
  else:
    for batch in images:  # an iterable of [b, H, W, 3] arrays
      batch = np.asarray(batch)
      if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"images: each batch must be [b, H, W, 3], got shape {batch.shape}")
      for i in range(0, batch.shape[0], batch_size):
        yield batch[i:i + batch_size]


def _local_features(batch: np.ndarray, extractor, devices, data) -> tuple:
  """Features of one batch on this process's devices (padded to a multiple of them)."""
  n = batch.shape[0]
  if n % len(devices):
    pad = len(devices) - n % len(devices)
    batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
  pool, logit = extractor(jax.device_put(batch, data))
  return np.asarray(pool, np.float64)[:n], np.asarray(logit, np.float64)[:n]


def extract_features(images, extractor: inception.InceptionExtractor,
                     batch_size: int = 200, *, split_across_processes: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(pool [N, 2048], logits_unbiased [N, 1008]) as float64 numpy, all processes' images.

  `images`: uint8 or float [-1, 1] array [N, H, W, 3], or an iterable of such batches.
  Batches are padded to a multiple of the local device count and split over the devices.
  With several processes, either each process passes its own images and the features are
  gathered at the end (process 0's first), or, `split_across_processes`, every process
  passes the same images and takes its contiguous share of every batch; each batch's
  features are gathered in order, so the result equals one process's, row for row.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  processes, rank = jax.process_count(), jax.process_index()
  split = split_across_processes and processes > 1
  per_batch = processes * len(devices) if split else len(devices)
  step = -(-int(batch_size) // per_batch) * per_batch
  pools, logits = [], []
  for batch in _batches(images, step):
    batch = np.asarray(batch)
    n = batch.shape[0]
    if not split:
      pool, logit = _local_features(batch, extractor, devices, data)
    else:  # my share, padded to the largest share; the gather restores the batch's order
      share = -(-n // processes)
      mine = batch[rank * share:(rank + 1) * share]
      if mine.shape[0] < share:
        filler = batch[-1:] if mine.shape[0] == 0 else mine[-1:]
        mine = np.concatenate([mine, np.repeat(filler, share - mine.shape[0], axis=0)])
      pool, logit = _local_features(mine, extractor, devices, data)
      pool = np.asarray(multihost_utils.process_allgather(pool, tiled=True))[:n]
      logit = np.asarray(multihost_utils.process_allgather(logit, tiled=True))[:n]
    pools.append(pool)
    logits.append(logit)
  if not pools:
    raise ValueError("images: no images")
  pool, logit = np.concatenate(pools), np.concatenate(logits)
  if processes > 1 and not split:
    counts = multihost_utils.process_allgather(np.asarray([pool.shape[0]]))
    if len(set(np.asarray(counts).ravel().tolist())) != 1:
      raise ValueError(f"images: every process must pass the same number of images, got "
                       f"{np.asarray(counts).ravel().tolist()}")
    pool = np.asarray(multihost_utils.process_allgather(pool, tiled=True))
    logit = np.asarray(multihost_utils.process_allgather(logit, tiled=True))
  return pool, logit


def list_images(folder: str) -> list[str]:
  folder = os.path.expanduser(folder)
  if not os.path.isdir(folder):
    raise ValueError(f"image folder: {folder} is not a directory")
  files = sorted(f for f in glob_lib.glob(os.path.join(folder, "**", "*"), recursive=True)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"image folder: no {'/'.join(IMAGE_EXTENSIONS)} files under {folder}")
  return files


def _folder_batches(files: list[str], image_size: int | None, batch_size: int):
  from pgm_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  for i in range(0, len(files), batch_size):
    yield np.stack([imagenet.load_image(f, image_size) for f in files[i:i + batch_size]])


def ref_stats_from_folder(folder: str, weights_path: str, *, image_size: int | None = 256,
                          batch_size: int = 200, limit: int | None = None,
                          overflow: str = "clip",
                          extractor: inception.InceptionExtractor | None = None) -> dict:
  """Reference statistics of the images under `folder` (recursive). Each image is resized
  (shorter side `image_size`, PIL bilinear) and center-cropped, as the ImageNet codes are
  made (`pgm_jax.data.imagenet`); image_size=None keeps the files' sizes (then they must
  all be the same)."""
  files = list_images(folder)[:limit] if limit else list_images(folder)
  extractor = extractor or inception.InceptionExtractor.from_file(weights_path, overflow=overflow)
  pool, _ = extract_features(_folder_batches(files, image_size, batch_size), extractor, batch_size)
  return stats_from_features(pool)


def _resolve_ref_stats(ref_stats, weights_path: str, batch_size: int, extractor) -> dict:
  if isinstance(ref_stats, dict):
    return ref_stats
  if isinstance(ref_stats, (tuple, list)) and len(ref_stats) == 2:
    return {"mu": ref_stats[0], "sigma": ref_stats[1], "num_images": -1}
  path = os.path.expanduser(str(ref_stats))
  if os.path.isdir(path):
    return ref_stats_from_folder(path, weights_path, batch_size=batch_size, extractor=extractor)
  return load_ref_stats(path)


def fid_and_is(images_uint8, ref_stats, weights_path: str, *, batch_size: int = 200,
               splits: int = 10, overflow: str = "clip",
               extractor: inception.InceptionExtractor | None = None,
               split_across_processes: bool = False) -> dict:
  """FID against `ref_stats` and IS of generated images.

  images_uint8: uint8 [N, H, W, 3] (or float in [-1, 1]), or an iterable of such batches.
  ref_stats:    path of an .npz (mu, sigma), a folder of reference images, a dict with
                mu / sigma, or a (mu, sigma) pair.
  weights_path: the FID Inception weights (.npz from `convert_inception`, or the .pth).
  Returns {"fid", "inception_score", "inception_score_std", "num_images",
  "ref_num_images", "feature_seconds"}.
  """
  extractor = extractor or inception.InceptionExtractor.from_file(weights_path, overflow=overflow)
  ref = _resolve_ref_stats(ref_stats, weights_path, batch_size, extractor)
  started = time.perf_counter()
  pool, logits = extract_features(images_uint8, extractor, batch_size,
                                  split_across_processes=split_across_processes)
  seconds = time.perf_counter() - started
  scores = inception_score_splits(logits, splits)
  return {"fid": frechet_distance_of_features(pool, ref["mu"], ref["sigma"]),
          "inception_score": float(scores.mean()), "inception_score_std": float(scores.std()),
          "num_images": int(pool.shape[0]), "ref_num_images": int(ref.get("num_images", -1)),
          "feature_seconds": seconds}
