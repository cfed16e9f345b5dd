"""Sample quality of class-conditional image models without any download.

Axis legend:
  N  images
  H, W, C  image height, width, channels
  F  feature width of the classifier (its hidden layer)
  K  classes

A small classifier (scikit-learn MLP, one hidden ReLU layer of F units) is
trained on the real training images of the data set. Generated images of a
requested class are scored by (1) the classifier's accuracy at recognising that
class and (2) the Fréchet distance between Gaussians fitted to the classifier's
hidden features of generated and of real images (an FID in a feature space that
needs no Inception weights). `real_frechet` is the same distance between two
real sets of the same size, the floor that finite samples allow.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import scipy.linalg


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance of Gaussians fitted to feature sets float[N_a, F], [N_b, F].

  `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`, >= 0; 0 for equal sets.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets must be [N, F] with the same F, got "
                     f"{list(a.shape)} and {list(b.shape)}")
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"feature sets need >= 2 rows, got {len(a)} and {len(b)}")
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = np.atleast_2d(np.cov(a, rowvar=False))
  cov_b = np.atleast_2d(np.cov(b, rowvar=False))
  eps = 1e-6 * np.eye(a.shape[1])  # dead ReLU units make covariances singular
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    covmean = np.real(scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps)))
  value = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
           - 2.0 * np.trace(covmean))
  return float(max(value, 0.0))


@dataclasses.dataclass
class ImageClassifier:
  """A one-hidden-layer MLP on flattened images in [-1, 1].

  Attributes:
    hidden: F, hidden ReLU units (the feature space of the Fréchet distance).
    max_iter: training epochs (Adam, minibatches of 128).
    seed: random state of the fit.
  """
  hidden: int = 64
  max_iter: int = 60
  seed: int = 0
  model: Any = None

  def fit(self, images: np.ndarray, labels: np.ndarray) -> "ImageClassifier":
    """images float[N, H, W, C] in [-1, 1], labels int[N]."""
    from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
    from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
    self.model = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=1e-2,
                               batch_size=128, max_iter=self.max_iter,
                               random_state=self.seed)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      self.model.fit(_flat(images), np.asarray(labels))
    return self

  def _check(self):
    if self.model is None:
      raise ValueError("ImageClassifier is not fitted; call fit() first")

  def predict(self, images: np.ndarray) -> np.ndarray:
    """int[N] predicted classes."""
    self._check()
    return self.model.predict(_flat(images))

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def features(self, images: np.ndarray) -> np.ndarray:
    """float64[N, F]: the hidden ReLU activations."""
    self._check()
    h = _flat(images) @ self.model.coefs_[0] + self.model.intercepts_[0]
    return np.maximum(h, 0.0)


_CLASSIFIERS: dict[tuple[Any, ...], ImageClassifier] = {}


def fit_classifier(images: np.ndarray, labels: np.ndarray,
                   **options) -> ImageClassifier:
  """`ImageClassifier(**options).fit(images, labels)`, cached in the process
  by the content of the arrays (runs in one process share the fit)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  images = np.ascontiguousarray(images, np.float32)
  labels = np.ascontiguousarray(labels)
  key = (hashlib.sha1(images.tobytes()).hexdigest(), images.shape,
         hashlib.sha1(labels.tobytes()).hexdigest(),
         tuple(sorted(options.items())))
  if key not in _CLASSIFIERS:
    _CLASSIFIERS[key] = ImageClassifier(**options).fit(images, labels)
  return _CLASSIFIERS[key]


def _flat(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images, np.float64)
  return np.clip(images, -1.0, 1.0).reshape(len(images), -1)


def sample_quality(classifier: ImageClassifier, samples: np.ndarray,
                   labels: np.ndarray, reference: np.ndarray,
                   heldout: np.ndarray | None = None,
                   num_classes: int | None = None) -> dict[str, Any]:
  """Scores generated images of requested classes.

  Args:
    classifier: fitted on real training images.
    samples: float[N, H, W, C] generated images; labels int[N] their classes.
    reference: float[M, H, W, C] real reference images (e.g. the training
      split the classifier saw).
    heldout: optional real images not in `reference` (e.g. the validation
      split): their distance to `reference` is the floor of `frechet`.
    num_classes: K (default: max label + 1).
  Returns:
    `class_accuracy` (mean over samples), `class_accuracy_per_class` [K] (nan
    where a class was not requested), `frechet` (generated vs reference),
    `real_frechet` (heldout vs reference, when given), `num_samples`.
  """
  samples = np.asarray(samples)
  labels = np.asarray(labels)
  num_classes = int(num_classes or labels.max() + 1)
  pred = classifier.predict(samples)
  per_class = np.full(num_classes, np.nan)
  for c in range(num_classes):
    sel = labels == c
    if sel.any():
      per_class[c] = float(np.mean(pred[sel] == c))
  ref = classifier.features(reference)
  out = {
      "class_accuracy": float(np.mean(pred == labels)),
      "class_accuracy_per_class": per_class.tolist(),
      "frechet": frechet_distance(classifier.features(samples), ref),
      "num_samples": int(len(samples)),
  }
  if heldout is not None:
    out["real_frechet"] = frechet_distance(classifier.features(heldout), ref)
  return out
