"""The `text:GLOB` source: local text files.

Axis legend:
  N  bytes (= byte tokens) of a split

The files matched by the glob (``**`` recurses; ``~`` expands), sorted, read as
bytes. Each file is named by its path relative to the glob's fixed prefix (the
directory before the first wildcard), and goes to the validation split when
``zlib.crc32(relpath.encode()) % 100 < val_percent``. When that leaves one split
empty (e.g. a single file) the last ``val_percent`` percent of the bytes are the
validation split instead (see `base.split_named_documents`).
"""

from __future__ import annotations

import glob
import os

from moejax.data.base import (DataError, SplitDocuments, cap_named_documents,
                              split_named_documents)


def glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard component."""
  parts = pattern.replace(os.sep, "/").split("/")
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  if not fixed:
    return "."
  root = "/".join(fixed)
  return root or "/"


def text_files(pattern: str) -> list[str]:
  """Sorted regular files matched by `pattern`; DataError naming it if none."""
  expanded = os.path.expanduser(pattern)
  files = sorted(p for p in glob.glob(expanded, recursive=True)
                 if os.path.isfile(p))
  if not files:
    where = "" if os.path.isabs(expanded) else f" (relative to {os.getcwd()!r})"
    raise DataError(f"text:{pattern}: the glob {pattern!r} matches no files"
                    f"{where}")
  return files


def text_documents(pattern: str, *, val_percent: float = 5,
                   max_bytes: int | None = None) -> SplitDocuments:
  """Files matched by `pattern`, split by the hash of their relative paths.

  Args:
    pattern: a glob, e.g. ``data/**/*.txt``.
    val_percent: percent of files (by hash) for validation.
    max_bytes: take files in sorted order until this many bytes in all.
  """
  expanded = os.path.expanduser(pattern)
  root = glob_root(expanded)
  named = []
  total = 0
  for path in text_files(pattern):
    if max_bytes is not None and total >= max_bytes:
      break
    with open(path, "rb") as fh:
      doc = fh.read()
    named.append((os.path.relpath(path, root).replace(os.sep, "/"), doc))
    total += len(doc)
  return split_named_documents(cap_named_documents(named, max_bytes), val_percent)
