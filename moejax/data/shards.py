"""Prepared token shards on disk: the layout, the manifest, reading them back.

Axis legend:
  N  tokens of a shard (or split)
  D  documents of a shard

A prepared directory (`moejax.data.prepare`) holds, per split (``train``,
``validation``), shards ``SPLIT-00000`` ... of whole documents, each three files:

  ``SPLIT-K.tokens.npy``  uint16[N] (uint32 when V > 65536): every document as
                          EOS followed by its tokens, one after the other.
  ``SPLIT-K.docs.npy``    int64[D]: the offset of each document's EOS.
  ``SPLIT-K.json``        what the shard holds (documents, tokens, raw bytes,
                          crc32 of the raw text, tokenizer sha256); written
                          last, so a shard is finished when its JSON matches.

plus the tokenizer (``tokenizer.model`` / ``tokenizer.json``; none for bytes)
and ``manifest.json``: the source and options, the tokenizer (kind, file,
sha256, vocab size, EOS id), the token dtype, per split the documents, tokens
and shard list, and the document lengths in tokens (mean, max).

Why ``.npy``: each shard is one flat token array that numpy memory-maps
(``np.load(mmap_mode="r")``), so the loader reads any window of the
concatenated stream in O(1) without decoding records or loading a split into
memory, and the files need nothing but numpy to inspect. Document boundaries
are stored, not inferred from EOS ids, so a byte 0 inside a text (the bytes
tokenizer's EOS) does not split it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import numpy as np

from moejax.data.base import DataError
from moejax.data.tokenizers import BYTES, Tokenizer, load_tokenizer

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


def prepare_hint(directory: str) -> str:
  return (f"prepare it with `python -m moejax.data.prepare --source=stdlib "
          f"--out={directory}` (or --source=text:GLOB / tfds:NAME)")


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_paths(directory: str, name: str) -> dict[str, str]:
  """{"tokens", "docs", "info"} paths of shard `name` (e.g. ``train-00000``)."""
  base = os.path.join(directory, name)
  return {"tokens": base + ".tokens.npy", "docs": base + ".docs.npy",
          "info": base + ".json"}


def write_json(path: str, value: Any) -> bool:
  """Writes `value` as JSON atomically unless the file already holds exactly
  that; returns whether it wrote."""
  text = json.dumps(value, indent=1, sort_keys=True) + "\n"
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as fh:
      if fh.read() == text:
        return False
  with open(path + ".tmp", "w", encoding="utf-8") as fh:
    fh.write(text)
  os.replace(path + ".tmp", path)
  return True


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as fh:
    return json.load(fh)


def write_shard(directory: str, name: str, tokens: np.ndarray,
                doc_starts: np.ndarray, info: dict[str, Any]) -> None:
  """Writes a shard's arrays, then its JSON (each atomically)."""
  paths = shard_paths(directory, name)
  for key, arr in (("tokens", tokens), ("docs", doc_starts)):
    with open(paths[key] + ".tmp", "wb") as fh:
      np.save(fh, arr)
    os.replace(paths[key] + ".tmp", paths[key])
  write_json(paths["info"], info)


def shard_is_finished(directory: str, name: str, expected: dict[str, Any]
                      ) -> dict[str, Any] | None:
  """The shard's JSON if the shard is complete (arrays of the sizes its JSON
  gives) and its JSON has every `expected` item (same documents, raw text and
  tokenizer), else None."""
  paths = shard_paths(directory, name)
  if not all(os.path.isfile(p) for p in paths.values()):
    return None
  try:
    info = read_json(paths["info"])
    if any(info.get(k) != v for k, v in expected.items()):
      return None
    tokens = np.load(paths["tokens"], mmap_mode="r")
    docs = np.load(paths["docs"], mmap_mode="r")
  except (OSError, ValueError, EOFError):
    return None
  if tokens.shape != (info.get("tokens"),) or docs.shape != (
      info.get("documents"),):
    return None
  return info


def manifest_sha256(directory: str) -> str:
  """Hex sha256 of the manifest file (the prepared data's fingerprint)."""
  with open(os.path.join(directory, MANIFEST), "rb") as fh:
    return hashlib.sha256(fh.read()).hexdigest()


def load_manifest(directory: str) -> dict[str, Any]:
  """The manifest of a prepared directory; DataError saying how to prepare
  it when there is none."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise DataError(f"tokens:{directory}: the prepared directory "
                    f"{directory!r} does not exist; {prepare_hint(directory)}")
  if not os.path.isfile(path):
    raise DataError(f"tokens:{directory}: no {MANIFEST} in {directory!r} (not "
                    f"prepared, or preparing did not finish); "
                    f"{prepare_hint(directory)}")
  try:
    manifest = read_json(path)
  except ValueError as e:
    raise DataError(f"tokens:{directory}: {path!r} is not valid JSON ({e}); "
                    f"{prepare_hint(directory)}") from None
  if manifest.get("format") != FORMAT:
    raise DataError(f"tokens:{directory}: {path!r} has format "
                    f"{manifest.get('format')!r}, this moejax reads {FORMAT}; "
                    f"{prepare_hint(directory)}")
  return manifest


def manifest_tokenizer_spec(directory: str, manifest: dict[str, Any]) -> str:
  """`load_tokenizer`'s spec of the tokenizer the shards were made with."""
  name = manifest["tokenizer"]["file"]
  return BYTES if name == BYTES else os.path.join(directory, name)


RUN_HINT = ("leave --tokenizer unset to use the shards' own, or prepare the "
            "data again with this tokenizer into another directory")
PREPARE_HINT = ("prepare into another --out, or delete the directory to "
                "prepare it again")


def check_tokenizer(directory: str, manifest: dict[str, Any],
                    tokenizer: Tokenizer, hint: str = RUN_HINT) -> None:
  """DataError naming both hashes unless `tokenizer` made the shards."""
  made = manifest["tokenizer"]["sha256"]
  if tokenizer.sha256 != made:
    short = made if made == BYTES else made[:12]
    raise DataError(
        f"tokens:{directory}: the shards were made with tokenizer sha256 "
        f"{short} ({manifest['tokenizer']['file']}), not with this run's "
        f"{tokenizer.spec!r} (sha256 {tokenizer.short_hash}); {hint}")


def resolve_tokenizer(directory: str, manifest: dict[str, Any],
                      spec: str | None = None) -> Tokenizer:
  """The run's tokenizer: `spec`, or the manifest's when None; checked
  against the shards (`check_tokenizer`)."""
  if spec is None:
    spec = manifest_tokenizer_spec(directory, manifest)
  tokenizer = load_tokenizer(spec)
  check_tokenizer(directory, manifest, tokenizer)
  return tokenizer


class Shard(NamedTuple):
  """A shard's tokens uint[N] and document offsets int64[D] (memory-mapped)."""

  tokens: np.ndarray
  doc_starts: np.ndarray


def open_split(directory: str, manifest: dict[str, Any], split: str
               ) -> list[Shard]:
  """The memory-mapped shards of a split, in order; DataError naming a
  missing or short file."""
  shards = []
  for entry in manifest["splits"][split]["shards"]:
    paths = shard_paths(directory, entry["name"])
    try:
      tokens = np.load(paths["tokens"], mmap_mode="r")
      docs = np.load(paths["docs"], mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f"tokens:{directory}: cannot read shard "
                      f"{entry['name']!r} ({e}); prepare the directory again "
                      "(finished shards are kept)") from None
    if tokens.shape != (entry["tokens"],) or docs.shape != (
        entry["documents"],):
      raise DataError(f"tokens:{directory}: shard {entry['name']!r} does not "
                      "match the manifest; prepare the directory again")
    shards.append(Shard(tokens, docs))
  return shards
