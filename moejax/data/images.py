"""Image data for the diffusion model (DiT): `digits`, `tfds:mnist`, `tfds:cifar10`.

Axis legend:
  B  batch
  N  examples in a split
  H, W, C  image height, width, channels
  K  number of classes

Images are float32 in [-1, 1], channels last, labels int32 in [0, K). Train
batches follow the same deterministic, resumable order as `LMData`: batch ``i``
holds examples ``i * B .. i * B + B - 1`` of the run, epoch ``e`` ordered by
``np.random.default_rng([seed, e]).permutation(N)``. ``upsample`` repeats pixels
(nearest neighbour) when a batch is made.
"""

from __future__ import annotations

import functools

import numpy as np

from moejax.data.base import (BatchedData, DataError, EpochSampler,
                              check_positive_int, check_seed)

DIGITS_VAL_FRACTION = 0.1
DIGITS_SPLIT_SEED = 0  # fixed: the split does not move with the run's seed


class ImageData(BatchedData):
  """Fixed-shape, deterministic, resumable image batches.

  Args:
    train_images: float32[N, H, W, C] in [-1, 1], or uint8[N, H, W, C] in
      0..255 (kept as uint8, scaled to [-1, 1] per batch: 4x less memory).
    train_labels: int[N] in [0, num_classes).
    val_images: [N_val, H, W, C], same dtype rules.
    val_labels: int[N_val].
    batch_size: B.
    num_classes: K.
    seed: seed of the per-epoch order.
    upsample: integer nearest-neighbour factor applied to H and W.
    name: for messages.
  """

  def __init__(self, train_images, train_labels, val_images, val_labels, *,
               batch_size: int, num_classes: int, seed: int = 0,
               upsample: int = 1, name: str = "images"):
    self._batch_size = check_positive_int("batch_size", batch_size)
    self._upsample = check_positive_int("upsample", upsample)
    self._seed = check_seed(seed)
    self._num_classes = check_positive_int("num_classes", num_classes)
    self.name = name
    self._train_x = _check_images(train_images, "train_images")
    self._val_x = _check_images(val_images, "val_images")
    self._train_y = _check_labels(train_labels, len(self._train_x),
                                  self._num_classes, "train_labels")
    self._val_y = _check_labels(val_labels, len(self._val_x),
                                self._num_classes, "val_labels")
    if self._train_x.shape[1:] != self._val_x.shape[1:]:
      raise ValueError(f"train images {self._train_x.shape[1:]} and validation "
                       f"images {self._val_x.shape[1:]} differ in shape")
    if len(self._train_x) == 0:
      raise DataError(f"{name}: the train split is empty")
    if len(self._val_x) < self._batch_size:
      raise DataError(
          f"{name}: the validation split is too small for batch_size="
          f"{self._batch_size}: it has {len(self._val_x)} images; use a smaller "
          "batch_size")
    self._sampler = EpochSampler(len(self._train_x), self._batch_size,
                                 self._seed)

  @property
  def upsample(self) -> int:
    return self._upsample

  @property
  def num_classes(self) -> int:
    return self._num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of batch images, upsampling included."""
    _, h, w, c = self._train_x.shape
    return (h * self._upsample, w * self._upsample, c)

  @property
  def num_train(self) -> int:
    return len(self._train_x)

  @property
  def num_val(self) -> int:
    return len(self._val_x)

  _num_val = num_val  # BatchedData's count of validation examples

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each batch entry."""
    return {"images": ((self._batch_size,) + self.image_shape,
                       np.dtype(np.float32)),
            "labels": ((self._batch_size,), np.dtype(np.int32))}

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Train batch `index`: images float32[B, H, W, C], labels int32[B]."""
    idx = self.example_indices(index)
    return self._make(self._train_x[idx], self._train_y[idx])

  def _val_batch(self, rows: slice) -> dict[str, np.ndarray]:
    return self._make(self._val_x[rows], self._val_y[rows])

  def _make(self, images: np.ndarray, labels: np.ndarray
            ) -> dict[str, np.ndarray]:
    if images.dtype == np.uint8:
      images = uint8_to_unit(images)
    return {"images": upsample_nearest(images, self._upsample),
            "labels": labels.astype(np.int32)}

  def __repr__(self) -> str:
    return (f"ImageData(name={self.name!r}, batch_size={self._batch_size}, "
            f"image_shape={self.image_shape}, num_classes={self._num_classes}, "
            f"train={self.num_train}, val={self.num_val})")


def upsample_nearest(images: np.ndarray, factor: int) -> np.ndarray:
  """float32[B, H, W, C] -> float32[B, H * factor, W * factor, C]."""
  if factor == 1:
    return np.array(images, np.float32)
  return np.repeat(np.repeat(images, factor, axis=1), factor,
                   axis=2).astype(np.float32)


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 in [-1, 1] (same shape)."""
  return (np.asarray(images, np.float32) / 127.5 - 1.0).astype(np.float32)


def _check_images(images, what: str) -> np.ndarray:
  """uint8 images stay uint8; anything else becomes float32."""
  arr = np.asarray(images)
  if arr.dtype != np.uint8:
    arr = arr.astype(np.float32, copy=False)
  if arr.ndim != 4:
    raise ValueError(f"{what} must be [N, H, W, C], got shape "
                     f"{list(arr.shape)}")
  return arr


def _check_labels(labels, n: int, num_classes: int, what: str) -> np.ndarray:
  arr = np.asarray(labels)
  if arr.shape != (n,) or (n and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{what} must be int[{n}], got {arr.dtype}{list(arr.shape)}")
  if n and (arr.min() < 0 or arr.max() >= num_classes):
    raise ValueError(f"{what} must be in [0, {num_classes})")
  return arr.astype(np.int32)


@functools.lru_cache(maxsize=2)
def digits_arrays(val_fraction: float = DIGITS_VAL_FRACTION,
                  split_seed: int = DIGITS_SPLIT_SEED
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's shipped 8x8 digits, split by a fixed seeded permutation.

  The validation split is the last `val_fraction` of
  ``default_rng(split_seed).permutation(1797)``.

  Returns:
    train images float32[N, 8, 8, 1] in [-1, 1], train labels int32[N],
    validation images, validation labels (read-only arrays).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = (np.asarray(digits.images, np.float32) / 8.0 - 1.0)[..., None]
  labels = np.asarray(digits.target, np.int32)
  perm = np.random.default_rng(split_seed).permutation(len(images))
  n_val = int(round(len(images) * val_fraction))
  tr, va = perm[:len(images) - n_val], perm[len(images) - n_val:]
  out = (images[tr], labels[tr], images[va], labels[va])
  for a in out:
    a.setflags(write=False)
  return out
