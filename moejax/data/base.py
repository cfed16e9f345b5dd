"""Data core: byte-level LM batches, deterministic resumable sampling, errors.

Axis legend:
  B  batch (examples per batch)
  S  sequence length (tokens per example; a packed window holds S + 1 tokens)
  N  number of tokens in a split
  W  number of windows (examples) in a split

Every source (``stdlib``, ``text:GLOB``, ``tfds:NAME``) turns into a list of
documents (``bytes``) per split. `LMData` joins the documents of a split with the
separator byte 0, reads the result as byte tokens (``vocab_size = 256``) and cuts
it into non-overlapping windows of S + 1 tokens.

Sampling is a pure function of (data, seed, batch index): example number ``g``
(counted over the whole run, across epochs) is window
``permutation(epoch = g // W)[g % W]`` where the permutation is
``np.random.default_rng([seed, epoch]).permutation(W)``, and train batch ``i``
holds examples ``i * B .. i * B + B - 1``. The data position of a run is thus
just the index of the next batch; resuming is calling ``batch(next_index)``.
"""

from __future__ import annotations

import collections
import zlib
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from moejax.checks import check_int

VOCAB_SIZE = 256
SEPARATOR = 0  # byte placed between documents


class DataError(ValueError):
  """A data set is missing, unreadable or too small; the message says what to do."""


class SplitDocuments(NamedTuple):
  """Documents of the two splits with their names (relative paths, record ids)."""

  train: tuple[bytes, ...]
  validation: tuple[bytes, ...]
  train_names: tuple[str, ...] = ()
  validation_names: tuple[str, ...] = ()


# ----------------------------------------------------------------------------
# Small pure helpers.


def check_positive_int(name: str, value) -> int:
  """Returns `value` as int, or raises ValueError naming the argument."""
  return check_int(name, value, 1)


def check_seed(seed) -> int:
  """Returns `seed` as int, or raises ValueError (seeds are integers >= 0)."""
  return check_int("seed", seed, 0)


def check_val_percent(val_percent) -> float:
  """Returns `val_percent`, or raises ValueError unless 0 < val_percent < 100."""
  if not 0 < val_percent < 100:
    raise ValueError(f"val_percent must be in (0, 100), got {val_percent!r}")
  return val_percent


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as tokens: int32[N]."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """Text of byte tokens int[N] (any int dtype, values 0..255); bad UTF-8 -> U+FFFD."""
  arr = np.asarray(tokens)
  if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
    raise ValueError(f"byte tokens must be in [0, {VOCAB_SIZE}), got "
                     f"min {arr.min()} max {arr.max()}")
  return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def is_validation_name(name: str, val_percent: float) -> bool:
  """Stable hash split: True when ``crc32(name) % 100 < val_percent``."""
  return zlib.crc32(name.encode("utf-8")) % 100 < val_percent


def cap_named_documents(named: Sequence[tuple[str, bytes]],
                        max_bytes: int | None) -> list[tuple[str, bytes]]:
  """Takes documents in the given order until `max_bytes` in all (the last one cut)."""
  if max_bytes is None:
    return list(named)
  max_bytes = check_positive_int("max_bytes", max_bytes)
  out, total = [], 0
  for doc_name, doc in named:
    if total >= max_bytes:
      break
    doc = doc[:max_bytes - total]
    out.append((doc_name, doc))
    total += len(doc)
  return out


def split_named_documents(named: Sequence[tuple[str, bytes]],
                          val_percent: float = 5) -> SplitDocuments:
  """Splits documents by the stable hash of their names (see `is_validation_name`).

  If the hash split leaves one side empty (e.g. a single text file), falls back to
  a byte split of the concatenated documents: the last ``val_percent`` percent of
  the bytes become the validation split (names then get a ``#train``/``#validation``
  suffix). Returns documents in the given order within each split.
  """
  check_val_percent(val_percent)
  train = [(n, d) for n, d in named if not is_validation_name(n, val_percent)]
  val = [(n, d) for n, d in named if is_validation_name(n, val_percent)]
  if named and (not train or not val):
    joined = bytes([SEPARATOR]).join(d for _, d in named)
    cut = len(joined) - int(round(len(joined) * val_percent / 100))
    label = named[0][0] if len(named) == 1 else f"{len(named)} documents"
    train = [(f"{label}#train", joined[:cut])]
    val = [(f"{label}#validation", joined[cut:])]
  return SplitDocuments(
      train=tuple(d for _, d in train),
      validation=tuple(d for _, d in val),
      train_names=tuple(n for n, _ in train),
      validation_names=tuple(n for n, _ in val),
  )


def pack_documents(documents: Sequence[bytes]) -> np.ndarray:
  """Joins documents with the separator byte: uint8[N]."""
  joined = bytes([SEPARATOR]).join(bytes(d) for d in documents)
  return np.frombuffer(joined, dtype=np.uint8)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Order of the examples in one epoch: int64[W], a permutation of range(W)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


class EpochSampler:
  """Maps a train batch index to example indices; pure in (seed, W, B, index).

  Keeps the permutations of the last few epochs so that consecutive batches do
  not recompute them.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int,
               cache_size: int = 4):
    self.num_examples = check_positive_int("num_examples", num_examples)
    self.batch_size = check_positive_int("batch_size", batch_size)
    self.seed = check_seed(seed)
    self._cache: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self._cache_size = cache_size

  def permutation(self, epoch: int) -> np.ndarray:
    """Permutation of epoch `epoch`: int64[W] (read-only, cached)."""
    perm = self._cache.get(epoch)
    if perm is None:
      perm = epoch_permutation(self.seed, epoch, self.num_examples)
      perm.setflags(write=False)
      self._cache[epoch] = perm
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(epoch)
    return perm

  def indices(self, index: int) -> np.ndarray:
    """Example (window) indices of train batch `index`: int64[B]."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise ValueError(f"batch index must be an integer >= 0, got {index!r}")
    if index < 0:
      raise ValueError(f"batch index must be >= 0, got {index}")
    start = int(index) * self.batch_size
    g = np.arange(start, start + self.batch_size, dtype=np.int64)
    epochs, pos = np.divmod(g, self.num_examples)
    out = np.empty_like(g)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self.permutation(int(epoch))[pos[sel]]
    return out


class BatchedData:
  """What every data set shares: batch size, seed, train order, eval order.

  A subclass sets ``_batch_size``, ``_seed`` and ``_sampler`` and defines
  ``_num_val`` (validation examples) and ``_val_batch(rows)`` (the validation
  batch of the example slice `rows`).
  """

  _batch_size: int
  _seed: int
  _sampler: EpochSampler

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def seed(self) -> int:
    return self._seed

  @property
  def num_val_batches(self) -> int:
    """Full validation batches (the last partial one is dropped)."""
    return self._num_val // self._batch_size

  def example_indices(self, index: int) -> np.ndarray:
    """Train example indices of batch `index`: int64[B]."""
    return self._sampler.indices(index)

  def eval_batches(self, num_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Validation batches in a fixed order (no shuffle, last partial dropped).

    Args:
      num_batches: at most this many batches; None = all `num_val_batches`.

    Yields:
      dicts like the subclass's ``batch``.
    """
    n = self.num_val_batches
    if num_batches is not None:
      if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
      n = min(n, int(num_batches))
    b = self._batch_size
    for i in range(n):
      yield self._val_batch(slice(i * b, (i + 1) * b))


# ----------------------------------------------------------------------------
# Language-model data.


class LMData(BatchedData):
  """Byte-level LM data: fixed-shape, deterministic, resumable numpy batches.

  Args:
    train_documents: documents of the train split (bytes each).
    val_documents: documents of the validation split (bytes each).
    seq_len: S, tokens per example.
    batch_size: B, examples per batch.
    seed: seed of the per-epoch window order.
    name: the source's name, for messages.

  Raises:
    ValueError: seq_len, batch_size or seed out of range.
    DataError: the train split has no window of S + 1 tokens, or the
      validation split has fewer than B windows.
  """

  def __init__(self, train_documents: Sequence[bytes],
               val_documents: Sequence[bytes], *, seq_len: int, batch_size: int,
               seed: int = 0, name: str = "data"):
    self._init(pack_documents(train_documents), pack_documents(val_documents),
               seq_len=seq_len, batch_size=batch_size, seed=seed, name=name)

  @classmethod
  def from_tokens(cls, train_tokens, val_tokens, *, seq_len: int,
                  batch_size: int, seed: int = 0, name: str = "data") -> "LMData":
    """Builds from already packed byte tokens: int[N_train], int[N_val] in 0..255."""
    obj = cls.__new__(cls)
    obj._init(_as_byte_tokens(train_tokens, "train_tokens"),
              _as_byte_tokens(val_tokens, "val_tokens"),
              seq_len=seq_len, batch_size=batch_size, seed=seed, name=name)
    return obj

  def _init(self, train: np.ndarray, val: np.ndarray, *, seq_len, batch_size,
            seed, name):
    self._seq_len = check_positive_int("seq_len", seq_len)
    self._batch_size = check_positive_int("batch_size", batch_size)
    self._seed = check_seed(seed)
    self.name = name
    self._train = train
    self._val = val
    win = self._seq_len + 1
    self._train_windows = _windows(train, win)
    self._val_windows = _windows(val, win)
    if len(self._train_windows) == 0:
      raise DataError(
          f"{name}: the train split has {len(train)} tokens, fewer than one "
          f"window of seq_len + 1 = {win}; use more data or a smaller seq_len")
    if len(self._val_windows) < self._batch_size:
      raise DataError(
          f"{name}: the validation split is too small for seq_len={self._seq_len}"
          f" and batch_size={self._batch_size}: {len(val)} tokens make "
          f"{len(self._val_windows)} windows of {win} tokens, one batch needs "
          f"{self._batch_size}; use more data (e.g. a larger max_bytes or "
          f"val_percent) or a smaller seq_len/batch_size")
    self._sampler = EpochSampler(len(self._train_windows), self._batch_size,
                                 self._seed)
    self._fingerprint = None

  # -- properties -------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  @property
  def seq_len(self) -> int:
    return self._seq_len

  @property
  def num_train_tokens(self) -> int:
    """Tokens in the packed train split (separators included)."""
    return int(self._train.size)

  @property
  def num_val_tokens(self) -> int:
    """Tokens in the packed validation split (separators included)."""
    return int(self._val.size)

  @property
  def num_train_windows(self) -> int:
    """W: train examples per epoch."""
    return len(self._train_windows)

  @property
  def num_val_windows(self) -> int:
    return len(self._val_windows)

  _num_val = num_val_windows  # BatchedData's count of validation examples

  @property
  def train_tokens(self) -> np.ndarray:
    """The packed train split: uint8[N] (read-only)."""
    return self._train

  @property
  def val_tokens(self) -> np.ndarray:
    """The packed validation split: uint8[N] (read-only)."""
    return self._val

  @property
  def fingerprint(self) -> str:
    """crc32 of both splits' tokens (hex): check that a resumed run sees the same data."""
    if self._fingerprint is None:
      crc = zlib.crc32(self._train.tobytes())
      crc = zlib.crc32(self._val.tobytes(), crc)
      self._fingerprint = f"{crc:08x}"
    return self._fingerprint

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each batch entry, e.g. for ``jax.ShapeDtypeStruct``."""
    shape = (self._batch_size, self._seq_len)
    return {"inputs": (shape, np.dtype(np.int32)),
            "targets": (shape, np.dtype(np.int32)),
            "mask": (shape, np.dtype(np.float32))}

  # -- batches ----------------------------------------------------------------

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Train batch number `index` (>= 0); a pure function of (data, seed, index).

    Returns:
      inputs: int32[B, S] tokens.
      targets: int32[B, S] next tokens (inputs shifted left by one).
      mask: float32[B, S] ones.
    """
    return _lm_batch(self._train_windows[self.example_indices(index)])

  def _val_batch(self, rows: slice) -> dict[str, np.ndarray]:
    """inputs int32[B, S], targets int32[B, S], mask float32[B, S]."""
    return _lm_batch(self._val_windows[rows])

  # Convenience aliases of the module helpers.
  encode = staticmethod(encode)
  decode = staticmethod(decode)

  def __repr__(self) -> str:
    return (f"LMData(name={self.name!r}, seq_len={self._seq_len}, "
            f"batch_size={self._batch_size}, seed={self._seed}, "
            f"train_tokens={self.num_train_tokens}, "
            f"val_tokens={self.num_val_tokens})")


def _as_byte_tokens(tokens, what: str) -> np.ndarray:
  """Checks and converts tokens int[N] to uint8[N]."""
  arr = np.asarray(tokens)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} must be a 1-D integer array, got {arr.dtype}"
                     f"{list(arr.shape)}")
  if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
    raise ValueError(f"{what} must hold byte tokens in [0, {VOCAB_SIZE})")
  arr = arr.astype(np.uint8)
  arr.setflags(write=False)
  return arr


def _windows(tokens: np.ndarray, window: int) -> np.ndarray:
  """Non-overlapping windows of a split: uint8[W, S + 1] (a view)."""
  w = tokens.size // window
  return tokens[:w * window].reshape(w, window)


def _lm_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
  """inputs/targets/mask of windows uint8[B, S + 1]."""
  w = windows.astype(np.int32)
  return {"inputs": w[:, :-1], "targets": w[:, 1:],
          "mask": np.ones(w[:, 1:].shape, np.float32)}
