"""The `stdlib` corpus: the running interpreter's own standard-library source.

Axis legend:
  N  bytes (= byte tokens) of a split

Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (skipping
``site-packages``, ``dist-packages`` and ``__pycache__``), sorted by its relative
path (``/``-separated), read as bytes. A file goes to the validation split when
``zlib.crc32(relpath.encode()) % 100 < val_percent``, so the split is stable across
runs and machines for the same Python version (other versions ship other files).
"""

from __future__ import annotations

import functools
import os
import sysconfig

from moejax.data.base import (DataError, SplitDocuments, cap_named_documents,
                              split_named_documents)

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> str:
  """Directory of the running interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[str, ...]:
  """Sorted relative paths (``/``-separated) of the ``.py`` files under `root`."""
  root = root or stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    for f in filenames:
      if f.endswith(".py"):
        rel = f if rel_dir == "." else os.path.join(rel_dir, f)
        found.append(rel.replace(os.sep, "/"))
  return tuple(sorted(found))


@functools.lru_cache(maxsize=8)
def stdlib_documents(val_percent: float = 5,
                     max_bytes: int | None = None) -> SplitDocuments:
  """Standard-library sources split into train/validation by path hash.

  Args:
    val_percent: percent of files (by hash of the relative path) for validation.
    max_bytes: if set, take files in sorted order until this many bytes in all
      (the last file cut), before the split; for fast tests.

  Returns:
    `SplitDocuments` with the files' bytes and relative paths. Cached.
  """
  root = stdlib_root()
  files = stdlib_files(root)
  if not files:
    raise DataError(f"stdlib: no .py files found under {root!r}; this Python "
                    "ships without its standard-library sources, use "
                    "text:GLOB or tfds:NAME instead")
  named = []
  total = 0
  for rel in files:
    if max_bytes is not None and total >= max_bytes:
      break
    with open(os.path.join(root, rel), "rb") as fh:
      doc = fh.read()
    named.append((rel, doc))
    total += len(doc)
  return split_named_documents(cap_named_documents(named, max_bytes), val_percent)
