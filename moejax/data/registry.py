"""Data sets by name: `get_lm_data` and `get_image_data`.

Axis legend:
  B  batch
  S  sequence length

LM sources:
  ``stdlib``       Python's standard-library source of the running interpreter.
  ``text:GLOB``    local text files matched by GLOB.
  ``tfds:SPEC``    a tensorflow-datasets text set prepared on disk, SPEC =
                   ``NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]``.
  ``tokens:DIR``   token shards prepared by ``python -m moejax.data.prepare``
                   (`moejax.data.packed`: read with grain, packed documents).

With the bytes tokenizer (the default) the first three give `LMData` (byte
tokens, documents joined by byte 0); with another tokenizer they are tokenized
in memory into `TokenData` (packed documents with segment ids), as
``tokens:DIR`` gives from disk.

Image sources:
  ``digits``       scikit-learn's shipped 8x8 digits (no download).
  ``tfds:SPEC``    e.g. ``tfds:mnist``, ``tfds:cifar10`` prepared on disk.
"""

from __future__ import annotations

import os

from moejax.data.base import (DataError, LMData, SplitDocuments,
                              check_positive_int, check_seed, check_val_percent)
from moejax.data.images import ImageData, digits_arrays
from moejax.data.tokenizers import BYTES, load_tokenizer

LM_FORMS = ("stdlib", "text:GLOB",
            "tfds:NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]",
            "tokens:DIR")
IMAGE_FORMS = ("digits", "tfds:NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]"
               " (e.g. tfds:mnist, tfds:cifar10)")


def get_lm_data(name: str, *, seq_len: int, batch_size: int, seed: int = 0,
                data_dir: str | None = None, max_bytes: int | None = None,
                val_percent: float = 5, text_key: str = "text",
                max_documents: int | None = None, tokenizer: str | None = None,
                packing: bool = True):
  """LM data by name; batches are inputs/targets int32[B, S], mask (and with
  packed data segment_ids, positions).

  Args:
    name: ``stdlib``, ``text:GLOB``,
      ``tfds:NAME[/CONFIG][:VERSION][:TRAIN[:VAL]]`` or ``tokens:DIR``.
    seq_len: S.
    batch_size: B.
    seed: seed of the train order (the split never depends on it).
    data_dir: tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    max_bytes: stdlib/text: take files in sorted order until this many bytes in
      all; tfds: stop reading each split after this many bytes.
    val_percent: stdlib/text: percent of files (by path hash) for validation.
    text_key: tfds: the text feature.
    max_documents: tfds: at most this many documents per split.
    tokenizer: ``bytes``, a ``.model`` or ``.json`` file; None: bytes, or
      for ``tokens:DIR`` the shards' own (another one is refused).
    packing: `TokenData`: segment ids and positions per document.

  Returns:
    `LMData` (bytes of stdlib/text/tfds) or `moejax.data.packed.TokenData`.

  Raises:
    ValueError: seq_len/batch_size < 1 or other bad arguments.
    DataError: unknown name, missing or too small data, a tokenizer that
      does not load or did not make the shards.
  """
  seq_len = check_positive_int("seq_len", seq_len)
  batch_size = check_positive_int("batch_size", batch_size)
  seed = check_seed(seed)
  packed = dict(seq_len=seq_len, batch_size=batch_size, seed=seed,
                packing=packing)
  if isinstance(name, str) and name.strip().startswith("tokens:"):
    directory = name.strip()[len("tokens:"):]
    if not directory:
      raise DataError("tokens:DIR needs a directory prepared by "
                      "`python -m moejax.data.prepare --out=DIR`")
    from moejax.data.packed import load_prepared  # pylint: disable=g-import-not-at-top
    return load_prepared(os.path.expanduser(directory), tokenizer=tokenizer,
                         **packed)
  docs = lm_documents(name, data_dir=data_dir, max_bytes=max_bytes,
                      val_percent=val_percent, text_key=text_key,
                      max_documents=max_documents)
  name = name.strip()
  if tokenizer is not None and tokenizer != BYTES:
    from moejax.data.packed import from_documents  # pylint: disable=g-import-not-at-top
    return from_documents(docs, load_tokenizer(tokenizer), name=name, **packed)
  return LMData(docs.train, docs.validation, seq_len=seq_len,
                batch_size=batch_size, seed=seed, name=name)


def lm_documents(name: str, *, data_dir: str | None = None,
                 max_bytes: int | None = None, val_percent: float = 5,
                 text_key: str = "text",
                 max_documents: int | None = None) -> SplitDocuments:
  """The train and validation documents (bytes) of an LM source by name.

  Args: as `get_lm_data`'s (``name``: ``stdlib``, ``text:GLOB`` or
  ``tfds:SPEC``).

  Raises:
    DataError: unknown name, missing data.
  """
  check_val_percent(val_percent)
  max_bytes = _optional_positive_int("max_bytes", max_bytes)
  max_documents = _optional_positive_int("max_documents", max_documents)
  name = _data_set_name(name, LM_FORMS)
  if name == "stdlib":
    from moejax.data.stdlib import stdlib_documents  # pylint: disable=g-import-not-at-top
    return stdlib_documents(val_percent, max_bytes)
  if name.startswith("text:") and name[len("text:"):]:
    from moejax.data.text import text_documents  # pylint: disable=g-import-not-at-top
    return text_documents(name[len("text:"):], val_percent=val_percent,
                          max_bytes=max_bytes)
  if name.startswith("tfds:") and name[len("tfds:"):]:
    from moejax.data.tfds import tfds_text_documents  # pylint: disable=g-import-not-at-top
    return tfds_text_documents(name[len("tfds:"):], data_dir=data_dir,
                               text_key=text_key, max_documents=max_documents,
                               max_bytes=max_bytes)
  if name.startswith("tokens:"):
    raise DataError(f"{name}: prepared tokens have no text documents to read; "
                    "allowed sources: stdlib, text:GLOB, tfds:NAME")
  raise DataError(f"unknown LM data set {name!r}; allowed forms: "
                  f"{', '.join(LM_FORMS)}")


def get_image_data(name: str, *, batch_size: int, seed: int = 0,
                   data_dir: str | None = None, upsample: int = 1,
                   max_examples: int | None = None) -> ImageData:
  """Image data by name; batches are images float32[B, H, W, C] in [-1, 1], labels.

  Args:
    name: ``digits`` or ``tfds:NAME[/CONFIG][:VERSION][:TRAIN[:VAL]]``.
    batch_size: B.
    seed: seed of the train order (the split never depends on it).
    data_dir: tfds data directory.
    upsample: nearest-neighbour factor on H and W (e.g. 4: digits 8x8 -> 32x32).
    max_examples: tfds: at most this many examples per split.
  """
  batch_size = check_positive_int("batch_size", batch_size)
  upsample = check_positive_int("upsample", upsample)
  seed = check_seed(seed)
  max_examples = _optional_positive_int("max_examples", max_examples)
  name = _data_set_name(name, IMAGE_FORMS)
  if name == "digits":
    tr_x, tr_y, va_x, va_y = digits_arrays()
    num_classes = 10
  elif name.startswith("tfds:") and name[len("tfds:"):]:
    from moejax.data.tfds import tfds_image_arrays  # pylint: disable=g-import-not-at-top
    arrays = tfds_image_arrays(name[len("tfds:"):], data_dir=data_dir,
                               max_examples=max_examples)
    tr_x, tr_y, va_x, va_y = arrays[:4]
    num_classes = arrays.num_classes
  else:
    raise DataError(f"unknown image data set {name!r}; allowed forms: "
                    f"{', '.join(IMAGE_FORMS)}")
  return ImageData(tr_x, tr_y, va_x, va_y, batch_size=batch_size,
                   num_classes=num_classes, seed=seed, upsample=upsample,
                   name=name)


def _optional_positive_int(name: str, value) -> int | None:
  """None, or `value` checked as an integer >= 1."""
  return None if value is None else check_positive_int(name, value)


def _data_set_name(name, forms: tuple[str, ...]) -> str:
  """The stripped data set name; DataError unless it is a string."""
  if not isinstance(name, str):
    raise DataError(f"data set name must be a string, got {name!r}; "
                    f"allowed forms: {', '.join(forms)}")
  return name.strip()
