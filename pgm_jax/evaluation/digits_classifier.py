"""The digits judge: a small MLP trained by the repo on the training digits.

It scores class-conditional samples (the share put in the class asked for) and gives the
feature space of the Frechet distance (its last hidden layer, 64 ReLU units). It trains
full-batch with Adam on the 1,437 training digits in a few seconds, deterministically (fixed
seed), and reports its own accuracy on the 360 held-out digits.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgm_jax.data import images

HIDDEN = (256, 64)


def _init(key, sizes):
  params = []
  for k, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append({"w": jax.random.normal(k, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
                   "b": jnp.zeros((fan_out,))})
  return params


def _features(params, x_NxD):
  h = x_NxD
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h


def _logits(params, x_NxD):
  return _features(params, x_NxD) @ params[-1]["w"] + params[-1]["b"]


def levels_to_inputs(levels) -> np.ndarray:
  """Grey levels 0..16 ([N, 8, 8] images or [N, 64] codes) -> float32 [N, 64] in [0, 1]."""
  x = np.asarray(levels).reshape(len(levels), -1)
  if x.min(initial=0) < 0 or x.max(initial=0) > images.DIGITS_LEVELS - 1:
    raise ValueError(f"digits classifier: levels outside 0..{images.DIGITS_LEVELS - 1}")
  return x.astype(np.float32) / (images.DIGITS_LEVELS - 1)


def tokens_to_inputs(tokens_BxL) -> np.ndarray:
  """Sampled token grids ([BOS] + 64 codes) -> classifier inputs."""
  return levels_to_inputs(np.asarray(tokens_BxL)[:, 1:])


@dataclasses.dataclass
class DigitsClassifier:
  params: list
  accuracy: float  # on the held-out digits

  def logits(self, x_NxD) -> np.ndarray:
    return np.asarray(jax.jit(_logits)(self.params, jnp.asarray(x_NxD)))

  def features(self, x_NxD) -> np.ndarray:
    return np.asarray(jax.jit(_features)(self.params, jnp.asarray(x_NxD)))

  def predict(self, x_NxD) -> np.ndarray:
    return self.logits(x_NxD).argmax(-1)


@functools.lru_cache(maxsize=2)
def train_classifier(seed: int = 0, steps: int = 500, lr: float = 3e-3,
                     weight_decay: float = 1e-4) -> DigitsClassifier:
  """Trains the MLP on the training split; its accuracy is measured on the held-out one."""
  train_px, train_y = images.digits_split("train")
  val_px, val_y = images.digits_split("validation")
  x, y = jnp.asarray(levels_to_inputs(train_px)), jnp.asarray(train_y)
  params = _init(jax.random.key(seed), (x.shape[1],) + HIDDEN + (images.DIGITS_CLASSES,))
  tx = optax.adamw(lr, weight_decay=weight_decay)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()

  def step(carry, _):
    p, s = carry
    grads = jax.grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))(
      params)
  clf = DigitsClassifier(params=params, accuracy=0.0)
  clf.accuracy = float((clf.predict(levels_to_inputs(val_px)) == val_y).mean())
  return clf
