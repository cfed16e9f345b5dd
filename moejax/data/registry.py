"""Data sets by name: `get_lm_data` and `get_image_data`.

Axis legend:
  B  batch
  S  sequence length

LM sources:
  ``stdlib``       Python's standard-library source of the running interpreter.
  ``text:GLOB``    local text files matched by GLOB.
  ``tfds:SPEC``    a tensorflow-datasets text set prepared on disk, SPEC =
                   ``NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]``.
Image sources:
  ``digits``       scikit-learn's shipped 8x8 digits (no download).
  ``tfds:SPEC``    e.g. ``tfds:mnist``, ``tfds:cifar10`` prepared on disk.
"""

from __future__ import annotations

from moejax.data.base import (DataError, LMData, check_positive_int, check_seed,
                              check_val_percent)
from moejax.data.images import ImageData, digits_arrays

LM_FORMS = ("stdlib", "text:GLOB",
            "tfds:NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]")
IMAGE_FORMS = ("digits", "tfds:NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]"
               " (e.g. tfds:mnist, tfds:cifar10)")


def get_lm_data(name: str, *, seq_len: int, batch_size: int, seed: int = 0,
                data_dir: str | None = None, max_bytes: int | None = None,
                val_percent: float = 5, text_key: str = "text",
                max_documents: int | None = None) -> LMData:
  """Byte-level LM data by name; batches are inputs/targets int32[B, S], mask.

  Args:
    name: ``stdlib``, ``text:GLOB`` or ``tfds:NAME[/CONFIG][:VERSION][:TRAIN[:VAL]]``.
    seq_len: S.
    batch_size: B.
    seed: seed of the train order (the split never depends on it).
    data_dir: tfds data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    max_bytes: stdlib/text: take files in sorted order until this many bytes in
      all; tfds: stop reading each split after this many bytes.
    val_percent: stdlib/text: percent of files (by path hash) for validation.
    text_key: tfds: the text feature.
    max_documents: tfds: at most this many documents per split.

  Raises:
    ValueError: seq_len/batch_size < 1 or other bad arguments.
    DataError: unknown name, missing or too small data.
  """
  seq_len = check_positive_int("seq_len", seq_len)
  batch_size = check_positive_int("batch_size", batch_size)
  seed = check_seed(seed)
  check_val_percent(val_percent)
  max_bytes = _optional_positive_int("max_bytes", max_bytes)
  max_documents = _optional_positive_int("max_documents", max_documents)
  name = _data_set_name(name, LM_FORMS)
  if name == "stdlib":
    from moejax.data.stdlib import stdlib_documents  # pylint: disable=g-import-not-at-top
    docs = stdlib_documents(val_percent, max_bytes)
  elif name.startswith("text:") and name[len("text:"):]:
    from moejax.data.text import text_documents  # pylint: disable=g-import-not-at-top
    docs = text_documents(name[len("text:"):], val_percent=val_percent,
                          max_bytes=max_bytes)
  elif name.startswith("tfds:") and name[len("tfds:"):]:
    from moejax.data.tfds import tfds_text_documents  # pylint: disable=g-import-not-at-top
    docs = tfds_text_documents(name[len("tfds:"):], data_dir=data_dir,
                               text_key=text_key, max_documents=max_documents,
                               max_bytes=max_bytes)
  else:
    raise DataError(f"unknown LM data set {name!r}; allowed forms: "
                    f"{', '.join(LM_FORMS)}")
  return LMData(docs.train, docs.validation, seq_len=seq_len,
                batch_size=batch_size, seed=seed, name=name)


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
