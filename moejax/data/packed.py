"""Packed token data read with grain: documents packed into windows, with segments.

Axis legend:
  B  batch (global; a process may take rows [lo, hi) of it)
  S  sequence length
  N  tokens of a split
  W  windows (examples) of a split
  D  documents

A split is one stream of tokens: every document as EOS followed by its tokens,
the documents one after the other (prepared shards on disk, memory-mapped, or
documents tokenized in memory). Packing is concat-then-split, as in T5 and
MaxText pre-training: window w is stream[w * (S + 1) : (w + 1) * (S + 1)],
inputs its first S tokens, targets its last S. A document may start anywhere
in a window and run on into the next.

With ``packing=True`` (the default) every batch also has ``segment_ids``
int32[B, S] (1, 2, ... for the documents in a row, in order; the EOS before a
document belongs to it, so it predicts the document's first token, and a
document's last token predicts the next EOS) and ``positions`` int32[B, S]
(the position inside the document: reset to 0 at each EOS and at the start of
the row). The model attends only within a segment (`moejax.nn.attention`),
so a document's tokens see nothing of the others in their row, and with the
positions reset, a document gives the same outputs as run alone. There is no
padding: ``mask`` is all ones.

Order: the train windows are read through ``grain.MapDataset``:
``MapDataset.source(windows).shuffle(seed).repeat()`` (a fresh permutation per
epoch) and train batch i holds the windows at global positions
i * B .. i * B + B - 1. A batch is thus a pure function of (stream, seed, i):
a run resumes at ``TrainState.data_index`` with exactly the next batch, with no
iterator state to save. Validation batches read the validation windows in
order.
"""
from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import numpy as np

from moejax.data import shards as shard_lib
from moejax.data.base import (BatchedData, DataError, SplitDocuments,
                              check_positive_int, check_seed)
from moejax.data.tokenizers import Tokenizer


class TokenStream:
  """A split's token stream over shards: random reads of any token range.

  Args:
    shards: `shards.Shard`s in order (tokens uint[N_k], doc_starts int64[D_k]).
  """

  def __init__(self, shards: Sequence[shard_lib.Shard]):
    self.shards = [s for s in shards if s.tokens.size]
    sizes = [s.tokens.size for s in self.shards]
    self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

  @classmethod
  def from_documents(cls, token_lists: Sequence[np.ndarray], eos_id: int,
                     dtype=np.int32) -> "TokenStream":
    """One in-memory shard of tokenized documents (empty ones skipped)."""
    token_lists = [t for t in token_lists if t.size]
    lens = np.asarray([t.size + 1 for t in token_lists], np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    pieces = [p for t in token_lists
              for p in (np.asarray([eos_id], dtype), t.astype(dtype))]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    tokens.setflags(write=False)
    return cls([shard_lib.Shard(tokens, starts[:len(token_lists)])])

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  @property
  def num_documents(self) -> int:
    return sum(int(s.doc_starts.size) for s in self.shards)

  def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens int32[length] from `start` on, and bool[length]: True where a
    document begins (its EOS)."""
    if start < 0 or start + length > self.num_tokens:
      raise IndexError(f"tokens [{start}, {start + length}) are outside the "
                       f"stream of {self.num_tokens}")
    tokens = np.empty(length, np.int32)
    begins = np.zeros(length, bool)
    k = int(np.searchsorted(self.offsets, start, side="right")) - 1
    filled = 0
    while filled < length:
      shard = self.shards[k]
      lo = start + filled - int(self.offsets[k])
      n = min(length - filled, shard.tokens.size - lo)
      tokens[filled:filled + n] = shard.tokens[lo:lo + n]
      a, b = np.searchsorted(shard.doc_starts, [lo, lo + n])
      begins[np.asarray(shard.doc_starts[a:b]) - lo + filled] = True
      filled += n
      k += 1
    return tokens, begins

  def crc32(self) -> str:
    crc = 0
    for s in self.shards:
      crc = zlib.crc32(np.ascontiguousarray(s.tokens).tobytes(), crc)
      crc = zlib.crc32(np.ascontiguousarray(s.doc_starts).tobytes(), crc)
    return f"{crc:08x}"


class WindowSource:
  """grain's random-access source of a stream's windows of S + 1 tokens:
  ``source[w]`` = (tokens int32[S + 1], document begins bool[S + 1])."""

  def __init__(self, stream: TokenStream, window: int):
    self.stream, self.window = stream, window

  def __len__(self) -> int:
    return self.stream.num_tokens // self.window

  def __getitem__(self, w: int) -> tuple[np.ndarray, np.ndarray]:
    return self.stream.read(int(w) * self.window, self.window)


def example(window: tuple[np.ndarray, np.ndarray], packing: bool
            ) -> dict[str, np.ndarray]:
  """One example of a window (tokens int32[S + 1], begins bool[S + 1]):
  inputs/targets int32[S], mask float32[S]; with `packing` segment_ids and
  positions int32[S] (see the module docstring)."""
  tokens, begins = window
  out = {"inputs": tokens[:-1], "targets": tokens[1:],
         "mask": np.ones(tokens.size - 1, np.float32)}
  if packing:
    begins = begins[:-1]
    seg = np.cumsum(begins, dtype=np.int32)
    out["segment_ids"] = seg - seg[0] + 1
    idx = np.arange(begins.size, dtype=np.int32)
    out["positions"] = idx - np.maximum.accumulate(np.where(begins, idx, 0))
  return out


def _grain_seed(seed: int) -> int:
  """A 32-bit shuffle seed mixed from the run's seed (grain reseeds each
  epoch from it, so nearby run seeds must not map to nearby shuffle seeds)."""
  return int(np.random.SeedSequence([seed, 0x6d6f656a]).generate_state(1)[0])


class TokenData(BatchedData):
  """Packed token batches behind `LMData`'s interface (``batch(i)``,
  ``eval_batches``, ``batch_shapes``, ``vocab_size``, ``fingerprint``).

  Args:
    train, validation: the splits' `TokenStream`s.
    tokenizer: the tokenizer the streams were made with.
    seq_len: S.
    batch_size: B (global).
    seed: seed of the window order.
    packing: emit segment_ids and positions (attention stays inside
      documents); False: plain windows as `LMData`'s.
    name: for messages.
    fingerprint: identifies the data (a prepared directory's manifest hash);
      None: a crc32 of the streams.

  Raises:
    DataError: the train split has no window of S + 1 tokens, or the
      validation split has fewer than B windows.
  """

  def __init__(self, train: TokenStream, validation: TokenStream, *,
               tokenizer: Tokenizer, seq_len: int, batch_size: int,
               seed: int = 0, packing: bool = True, name: str = "tokens",
               fingerprint: str | None = None):
    import grain  # pylint: disable=g-import-not-at-top
    self._seq_len = check_positive_int("seq_len", seq_len)
    self._batch_size = check_positive_int("batch_size", batch_size)
    self._seed = check_seed(seed)
    self.name, self.tokenizer, self.packing = name, tokenizer, bool(packing)
    self.train_stream, self.val_stream = train, validation
    win = self._seq_len + 1
    train_src = WindowSource(train, win)
    val_src = WindowSource(validation, win)
    if len(train_src) == 0:
      raise DataError(
          f"{name}: the train split has {train.num_tokens} tokens, fewer than "
          f"one window of seq_len + 1 = {win}; use more data or a smaller "
          "seq_len")
    if len(val_src) < self._batch_size:
      raise DataError(
          f"{name}: the validation split is too small for seq_len="
          f"{self._seq_len} and batch_size={self._batch_size}: "
          f"{validation.num_tokens} tokens make {len(val_src)} windows of "
          f"{win} tokens, one batch needs {self._batch_size}; use more data "
          "or a smaller seq_len/batch_size")
    make = lambda w: example(w, self.packing)  # noqa: E731
    # shuffle, then repeat: a fresh permutation of the windows per epoch.
    self._order = grain.MapDataset.range(len(train_src)).shuffle(
        seed=_grain_seed(self._seed)).repeat()
    self._train = grain.MapDataset.source(train_src).shuffle(
        seed=_grain_seed(self._seed)).repeat().map(make)
    self._val = grain.MapDataset.source(val_src).map(make)
    self._num_windows = (len(train_src), len(val_src))
    self._fingerprint = fingerprint

  # -- properties -------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """The tokenizer's vocabulary (the model's may be padded beyond it)."""
    return self.tokenizer.vocab_size

  @property
  def seq_len(self) -> int:
    return self._seq_len

  @property
  def num_train_windows(self) -> int:
    return self._num_windows[0]

  @property
  def num_val_windows(self) -> int:
    return self._num_windows[1]

  _num_val = num_val_windows  # BatchedData's count of validation examples

  @property
  def num_train_tokens(self) -> int:
    return self.train_stream.num_tokens

  @property
  def num_val_tokens(self) -> int:
    return self.val_stream.num_tokens

  @property
  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = (self.train_stream.crc32() + self.val_stream.crc32()
                           + self.tokenizer.short_hash)
    return self._fingerprint

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    shape = (self._batch_size, self._seq_len)
    out = {"inputs": (shape, np.dtype(np.int32)),
           "targets": (shape, np.dtype(np.int32)),
           "mask": (shape, np.dtype(np.float32))}
    if self.packing:
      out["segment_ids"] = (shape, np.dtype(np.int32))
      out["positions"] = (shape, np.dtype(np.int32))
    return out

  # -- batches ----------------------------------------------------------------

  def example_indices(self, index: int) -> np.ndarray:
    """Train window indices of batch `index`: int64[B]."""
    start = self._start(index)
    return np.asarray([self._order[g] for g in
                       range(start, start + self._batch_size)], np.int64)

  def _start(self, index) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise ValueError(f"batch index must be an integer >= 0, got {index!r}")
    if index < 0:
      raise ValueError(f"batch index must be >= 0, got {index}")
    return int(index) * self._batch_size

  reads_rows = True  # `batch(index, rows=(lo, hi))` reads those rows alone

  def batch(self, index: int, rows: tuple[int, int] | None = None
            ) -> dict[str, np.ndarray]:
    """Train batch number `index` (>= 0), a pure function of (data, seed,
    index); `rows` = (lo, hi): only those rows of it (a process's share).

    Returns:
      inputs, targets int32[B, S]; mask float32[B, S] (ones); with packing
      segment_ids, positions int32[B, S].
    """
    start = self._start(index)
    lo, hi = (0, self._batch_size) if rows is None else rows
    if not 0 <= lo < hi <= self._batch_size:
      raise ValueError(f"rows={rows!r} is out of range; allowed: 0 <= lo < "
                       f"hi <= batch_size={self._batch_size}")
    return _stack([self._train[g] for g in range(start + lo, start + hi)])

  def _val_batch(self, rows: slice) -> dict[str, np.ndarray]:
    return _stack([self._val[w] for w in range(rows.start, rows.stop)])

  def encode(self, text: str) -> np.ndarray:
    return self.tokenizer.encode(text)

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  def __repr__(self) -> str:
    return (f"TokenData(name={self.name!r}, seq_len={self._seq_len}, "
            f"batch_size={self._batch_size}, seed={self._seed}, "
            f"packing={self.packing}, tokenizer={self.tokenizer!r}, "
            f"train_tokens={self.num_train_tokens}, "
            f"val_tokens={self.num_val_tokens})")


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------
# Constructors.


def from_documents(docs: SplitDocuments, tokenizer: Tokenizer, **kwargs
                   ) -> TokenData:
  """Packed data of documents tokenized in memory (`TokenData`'s kwargs)."""
  streams = [TokenStream.from_documents(tokenizer.encode_documents(split),
                                        tokenizer.eos_id)
             for split in (docs.train, docs.validation)]
  return TokenData(*streams, tokenizer=tokenizer, **kwargs)


def load_prepared(directory: str, *, tokenizer: str | None = None, **kwargs
                  ) -> TokenData:
  """Packed data of a prepared directory (`moejax.data.prepare`).

  Args:
    directory: holds ``manifest.json`` and the shards.
    tokenizer: the run's tokenizer spec; None = the manifest's. Must be the
      one the shards were made with.
    **kwargs: `TokenData`'s (seq_len, batch_size, seed, packing).

  Raises:
    DataError: no such prepared directory (saying how to prepare it), a
      missing shard, a tokenizer other than the shards'.
  """
  manifest = shard_lib.load_manifest(directory)
  tok = shard_lib.resolve_tokenizer(directory, manifest, tokenizer)
  streams = [TokenStream(shard_lib.open_split(directory, manifest, split))
             for split in shard_lib.SPLITS]
  return TokenData(*streams, tokenizer=tok, name=f"tokens:{directory}",
                   fingerprint=shard_lib.manifest_sha256(directory)[:16],
                   **kwargs)


def iter_documents(stream: TokenStream) -> Iterator[np.ndarray]:
  """The documents of a stream (without their EOS): int32[N_d] each."""
  for shard in stream.shards:
    ends = np.append(np.asarray(shard.doc_starts[1:]), shard.tokens.size)
    for a, b in zip(shard.doc_starts, ends):
      yield np.asarray(shard.tokens[a + 1:b], np.int32)
