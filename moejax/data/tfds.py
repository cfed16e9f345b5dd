"""The `tfds:NAME` source: tensorflow-datasets sets already prepared on disk.

Axis legend:
  N  examples read from a split
  H, W, C  image height, width, channels

Spec: ``NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]``, e.g. ``lm1b``,
``c4/en``, ``mnist:3.0.1``, ``lm1b:train[:10%]:test``. The validation split
defaults to ``validation``, else ``test``.

moejax never downloads: the set must already be prepared under
``DATA_DIR/NAME[/CONFIG]/VERSION/`` (``dataset_info.json`` and ``features.json``),
where DATA_DIR is the ``data_dir`` argument, else ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets``. The directory is checked before tensorflow_datasets is
even imported, so a missing set fails at once with a `DataError` saying what to
do. Prepared sets are opened with ``tfds.builder_from_directory`` (no generation
code, no network). ``array_record`` files are read through ``as_data_source``
(no TensorFlow); other formats through ``tfds.as_numpy(builder.as_dataset(...))``,
which needs TensorFlow. Imports of tensorflow_datasets stay inside functions.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Iterator, NamedTuple

import numpy as np

from moejax.data.base import DataError, SplitDocuments

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


class TfdsSpec(NamedTuple):
  """A parsed ``NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]``."""

  name: str
  config: str | None = None
  version: str | None = None
  train_split: str = "train"
  val_split: str | None = None  # None: "validation", else "test"

  @property
  def full_name(self) -> str:
    out = self.name + (f"/{self.config}" if self.config else "")
    return out + (f":{self.version}" if self.version else "")


def parse_spec(spec: str) -> TfdsSpec:
  """Parses a tfds spec (the text after ``tfds:``); colons in ``[...]`` kept."""
  parts, depth, cur = [], 0, ""
  for ch in spec:
    depth += (ch == "[") - (ch == "]")
    if ch == ":" and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  parts.append(cur)
  head, rest = parts[0], parts[1:]
  name, _, config = head.partition("/")
  if not name or not re.match(r"^[A-Za-z0-9_]+$", name) or "/" in config:
    raise DataError(f"tfds:{spec}: expected tfds:NAME[/CONFIG][:VERSION]"
                    "[:TRAIN_SPLIT[:VAL_SPLIT]], e.g. tfds:lm1b or tfds:c4/en")
  version = rest.pop(0) if rest and _VERSION_RE.match(rest[0]) else None
  if len(rest) > 2 or any(not r for r in rest):
    raise DataError(f"tfds:{spec}: give at most a train and a validation split, "
                    "e.g. tfds:lm1b:train:test")
  return TfdsSpec(name=name, config=config or None, version=version,
                  train_split=rest[0] if rest else "train",
                  val_split=rest[1] if len(rest) > 1 else None)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  if data_dir:
    return os.path.expanduser(os.fspath(data_dir))
  env = os.environ.get("TFDS_DATA_DIR")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def _prepared_versions(directory: str) -> list[str]:
  """Version subdirectories holding dataset_info.json and features.json, sorted."""
  if not os.path.isdir(directory):
    return []
  found = [v for v in os.listdir(directory)
           if _VERSION_RE.match(v)
           and os.path.isfile(os.path.join(directory, v, "dataset_info.json"))
           and os.path.isfile(os.path.join(directory, v, "features.json"))]
  return sorted(found, key=_version_key)


def _not_prepared(spec: TfdsSpec, data_dir: str, searched: str,
                  detail: str = "") -> DataError:
  return DataError(
      f"tfds:{spec.full_name}: the data set {spec.full_name!r} is not prepared "
      f"on disk: searched {searched!r} (data_dir {data_dir!r}){detail}. moejax "
      "never downloads. On a machine with network access run "
      f"`tfds build {spec.full_name} --data_dir=DIR` (add "
      "--file_format=array_record to read it without TensorFlow) and copy DIR "
      "here, then pass --data_dir=DIR (data_dir=...) or set TFDS_DATA_DIR.")


def _default_config(name: str) -> str | None:
  """The registered builder's default config name, if its code is importable."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    cls = tfds.builder_cls(name)
  except Exception:  # pylint: disable=broad-except
    return None
  default = getattr(cls, "DEFAULT_BUILDER_CONFIG_NAME", None)
  if default:
    return default
  configs = getattr(cls, "BUILDER_CONFIGS", None) or []
  return configs[0].name if configs else None


def find_prepared_dir(spec: TfdsSpec, data_dir: str | None = None) -> str:
  """``DATA_DIR/NAME[/CONFIG]/VERSION`` of a prepared set; DataError if none.

  Without a version, the newest prepared one. Without a config, the versions
  directly under NAME, else the only config prepared, else the builder's
  default config.
  """
  data_dir = resolve_data_dir(data_dir)
  root = os.path.join(data_dir, spec.name)
  if not os.path.isdir(root):
    raise _not_prepared(spec, data_dir, root)
  if spec.config:
    base = os.path.join(root, spec.config)
  elif _prepared_versions(root):
    base = root
  else:
    configs = sorted(c for c in os.listdir(root)
                     if _prepared_versions(os.path.join(root, c)))
    if len(configs) == 1:
      base = os.path.join(root, configs[0])
    elif configs:
      default = _default_config(spec.name)
      if default not in configs:
        raise DataError(
            f"tfds:{spec.name}: several configs are prepared under {root!r}: "
            f"{configs}; name one, e.g. tfds:{spec.name}/{configs[0]}")
      base = os.path.join(root, default)
    else:
      raise _not_prepared(spec, data_dir, root,
                          ": no prepared version or config found")
  versions = _prepared_versions(base)
  if spec.version:
    if spec.version not in versions:
      raise _not_prepared(
          spec, data_dir, os.path.join(base, spec.version),
          f" (prepared versions: {versions or 'none'})")
    return os.path.join(base, spec.version)
  if not versions:
    raise _not_prepared(
        spec, data_dir, base,
        ": no VERSION/dataset_info.json found (an interrupted build leaves "
        "only incomplete.* directories)")
  return os.path.join(base, versions[-1])


def open_builder(spec: TfdsSpec, data_dir: str | None = None):
  """The read-only builder of a prepared set (checks the disk first)."""
  builder_dir = find_prepared_dir(spec, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder_from_directory(builder_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"tfds:{spec.full_name}: cannot open the prepared data set "
                    f"at {builder_dir!r}: {e}") from e


def _is_array_record(builder) -> bool:
  formats = [builder.info.file_format] + list(
      getattr(builder.info, "alternative_file_formats", []) or [])
  return any(getattr(f, "value", f) == "array_record" for f in formats if f)


def _split_names(builder) -> list[str]:
  return [str(s) for s in builder.info.splits.keys()]


def choose_splits(spec: TfdsSpec, builder) -> tuple[str, str]:
  """(train split, validation split) of `spec` checked against the builder."""
  available = _split_names(builder)
  base = lambda s: s.split("[")[0]  # noqa: E731  ("train[:10%]" -> "train")
  val = spec.val_split
  if val is None:
    val = next((s for s in ("validation", "test") if s in available), None)
    if val is None:
      raise DataError(
          f"tfds:{spec.full_name}: no 'validation' or 'test' split (splits: "
          f"{available}); name one, e.g. tfds:{spec.name}:train:{available[0]}")
  for s in (spec.train_split, val):
    if base(s) not in available:
      raise DataError(f"tfds:{spec.full_name}: no split {s!r}; splits: "
                      f"{available}")
  return spec.train_split, val


def iter_examples(builder, split: str, *, spec_name: str,
                  max_examples: int | None = None,
                  chunk: int = 1024) -> Iterator[dict[str, Any]]:
  """Examples of `split` in order as numpy dicts, at most `max_examples`."""
  if _is_array_record(builder):
    source = builder.as_data_source(split=split)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    for start in range(0, n, chunk):
      idx = list(range(start, min(n, start + chunk)))
      items = (source.__getitems__(idx) if hasattr(source, "__getitems__")
               else [source[i] for i in idx])
      yield from items
    return
  if importlib.util.find_spec("tensorflow") is None:
    raise DataError(
        f"tfds:{spec_name}: the prepared files are "
        f"{getattr(builder.info.file_format, 'value', 'tfrecord')}, which "
        "tensorflow_datasets reads only through TensorFlow: `pip install "
        "tensorflow` (or tensorflow-cpu), or rebuild the set with "
        "`tfds build ... --file_format=array_record`")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if max_examples is not None:
    ds = ds.take(max_examples)
  yield from tfds.as_numpy(ds)


def _feature(example: dict, key: str, spec_name: str):
  if key not in example:
    raise DataError(f"tfds:{spec_name}: no feature {key!r}; features: "
                    f"{sorted(example)}")
  return example[key]


def _read_text(builder, split: str, *, spec_name: str, text_key: str,
               max_documents: int | None, max_bytes: int | None) -> list[bytes]:
  docs, total = [], 0
  for ex in iter_examples(builder, split, spec_name=spec_name,
                          max_examples=max_documents):
    if max_bytes is not None and total >= max_bytes:
      break
    value = _feature(ex, text_key, spec_name)
    doc = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    docs.append(doc)
    total += len(doc)
  return docs


def tfds_text_documents(spec: str, *, data_dir: str | None = None,
                        text_key: str = "text",
                        max_documents: int | None = None,
                        max_bytes: int | None = None) -> SplitDocuments:
  """Text documents (bytes) of a prepared tfds set's train and validation splits.

  Args:
    spec: ``NAME[/CONFIG][:VERSION][:TRAIN_SPLIT[:VAL_SPLIT]]``.
    data_dir: where the set is prepared (default: $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    text_key: the text feature.
    max_documents: read at most this many documents per split, in order.
    max_bytes: stop reading a split once this many bytes were read.
  """
  parsed = parse_spec(spec)
  builder = open_builder(parsed, data_dir)
  train_split, val_split = choose_splits(parsed, builder)
  kw = dict(spec_name=parsed.full_name, text_key=text_key,
            max_documents=max_documents, max_bytes=max_bytes)
  train = _read_text(builder, train_split, **kw)
  val = _read_text(builder, val_split, **kw)
  return SplitDocuments(
      train=tuple(train), validation=tuple(val),
      train_names=tuple(f"{train_split}/{i}" for i in range(len(train))),
      validation_names=tuple(f"{val_split}/{i}" for i in range(len(val))))


class ImageArrays(NamedTuple):
  """Images uint8[N, H, W, C] and labels int32[N] of both splits."""

  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  num_classes: int


def _read_images(builder, split: str, *, spec_name: str, image_key: str,
                 label_key: str, max_examples: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for ex in iter_examples(builder, split, spec_name=spec_name,
                          max_examples=max_examples):
    img = np.asarray(_feature(ex, image_key, spec_name))
    images.append(img if img.ndim == 3 else img[..., None])
    labels.append(int(_feature(ex, label_key, spec_name)))
  if not images:
    raise DataError(f"tfds:{spec_name}: split {split!r} is empty")
  return np.stack(images), np.asarray(labels, np.int32)


def tfds_image_arrays(spec: str, *, data_dir: str | None = None,
                      image_key: str = "image", label_key: str = "label",
                      max_examples: int | None = None) -> ImageArrays:
  """Images and labels of a prepared tfds image set (e.g. mnist, cifar10).

  Returns:
    `ImageArrays`: uint8[N, H, W, C] images and int32[N] labels per split.
  """
  parsed = parse_spec(spec)
  builder = open_builder(parsed, data_dir)
  train_split, val_split = choose_splits(parsed, builder)
  kw = dict(spec_name=parsed.full_name, image_key=image_key,
            label_key=label_key, max_examples=max_examples)
  tr_x, tr_y = _read_images(builder, train_split, **kw)
  va_x, va_y = _read_images(builder, val_split, **kw)
  label_feature = builder.info.features[label_key] if label_key in (
      builder.info.features.keys()) else None
  num_classes = getattr(label_feature, "num_classes", None)
  if num_classes is None:
    num_classes = int(max(tr_y.max(), va_y.max())) + 1
  return ImageArrays(tr_x, tr_y, va_x, va_y, int(num_classes))
