"""Tokenizes a text source into shards on disk (and trains a tokenizer first).

  python -m moejax.data.prepare --source=stdlib --out=data/stdlib \\
      --train_tokenizer=sentencepiece_bpe --vocab_size=4096

Axis legend:
  N  tokens
  D  documents

Reads the train and validation documents of ``stdlib``, ``text:GLOB`` or a
prepared ``tfds:NAME`` (`moejax.data.registry.lm_documents`; same split as
`get_lm_data`), optionally trains a tokenizer on the train split
(``--train_tokenizer``; local, no download), then writes shards of about
``--shard_bytes`` of raw text each and ``manifest.json`` (layout:
`moejax.data.shards`) into ``--out``, with a progress bar per split. Train on it
with ``experiments/train_lm.py --dataset=tokens:OUT`` (the tokenizer defaults to
the one recorded in the manifest).

Running it again skips finished shards (same documents, same raw text, same
tokenizer) and an existing trained tokenizer, and rewrites nothing that is
already right. A directory prepared with another tokenizer is refused, naming
both hashes.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from moejax.data import shards as shard_lib
from moejax.data import tokenizers as tok_lib
from moejax.data.base import DataError, SplitDocuments, check_positive_int
from moejax.data.registry import lm_documents

DEFAULT_SHARD_BYTES = 128 * 2 ** 20
DEFAULT_TOKENIZER_SAMPLE_BYTES = 200 * 2 ** 20


@dataclasses.dataclass
class PrepareResult:
  """What `prepare` did: the manifest, shards written and skipped."""
  directory: str
  manifest: dict[str, Any]
  written: list[str]
  skipped: list[str]
  trained_tokenizer: bool


def shard_groups(documents: Sequence[bytes], shard_bytes: int
                 ) -> Iterator[tuple[int, int]]:
  """[start, stop) document ranges of the shards: whole documents, a shard
  closed once it holds >= `shard_bytes` raw bytes (empty documents skipped
  later, but counted here)."""
  start, size = 0, 0
  for i, doc in enumerate(documents):
    size += len(doc)
    if size >= shard_bytes:
      yield start, i + 1
      start, size = i + 1, 0
  if start < len(documents):
    yield start, len(documents)


def _raw_crc(documents: Sequence[bytes]) -> int:
  crc = 0
  for d in documents:
    crc = zlib.crc32(len(d).to_bytes(8, "little"), crc)
    crc = zlib.crc32(d, crc)
  return crc


def tokenize_shard(tokenizer: tok_lib.Tokenizer, documents: Sequence[bytes],
                   dtype: np.dtype, progress=None, chunk: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens uint[N], doc_starts int64[D]) of the non-empty documents: each
  as EOS followed by its tokens."""
  pieces, starts, offset = [], [], 0
  eos = np.asarray([tokenizer.eos_id], dtype)
  for lo in range(0, len(documents), chunk):
    batch = [d for d in documents[lo:lo + chunk] if d]
    for ids in tokenizer.encode_documents(batch):
      starts.append(offset)
      pieces += [eos, ids.astype(dtype)]
      offset += 1 + ids.size
    if progress is not None:
      progress.update(sum(len(d) for d in documents[lo:lo + chunk]))
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  return tokens, np.asarray(starts, np.int64)


def _existing_tokenizer(out: str, kind: str | None) -> str | None:
  """The trained tokenizer file in `out` for `kind`, if present."""
  if kind is None:
    return None
  path = os.path.join(out, tok_lib.TRAINABLE[kind])
  return path if os.path.isfile(path) else None


def prepare(source: str, out: str, *, tokenizer: str = tok_lib.BYTES,
            train_tokenizer: str | None = None, vocab_size: int | None = None,
            shard_bytes: int = DEFAULT_SHARD_BYTES, val_percent: float = 5,
            max_bytes: int | None = None, data_dir: str | None = None,
            text_key: str = "text", max_documents: int | None = None,
            tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
            progress: bool = True) -> PrepareResult:
  """Prepares `source` into directory `out` (see the module docstring).

  Args:
    source: ``stdlib``, ``text:GLOB`` or ``tfds:SPEC``.
    out: the prepared directory (created).
    tokenizer: ``bytes`` or a tokenizer file (copied into `out`); ignored
      when `train_tokenizer` is set.
    train_tokenizer: train one of `tokenizers.TRAINABLE` on the train split
      (kept if `out` already has it).
    vocab_size: the trained tokenizer's vocabulary.
    shard_bytes: raw text bytes per shard (a shard holds whole documents).
    val_percent, max_bytes, data_dir, text_key, max_documents: as
      `get_lm_data`'s.
    tokenizer_sample_bytes: train the tokenizer on the first this many bytes
      of the train split.
    progress: show progress bars (on stderr).

  Raises:
    ValueError / DataError: bad arguments, missing data, a tokenizer file
      that does not load, `out` prepared with another tokenizer.
  """
  shard_bytes = check_positive_int("shard_bytes", shard_bytes)
  if train_tokenizer is not None:
    if train_tokenizer not in tok_lib.TRAINABLE:
      raise ValueError(f"train_tokenizer={train_tokenizer!r} is unknown; "
                       f"allowed: {', '.join(tok_lib.TRAINABLE)}")
    if vocab_size is None:
      raise ValueError("train_tokenizer needs vocab_size (e.g. 4096)")
    check_positive_int("vocab_size", vocab_size)
  elif vocab_size is not None:
    raise ValueError("vocab_size is only used with train_tokenizer; a given "
                     "tokenizer file has its own")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"out={out!r} is not a directory")
  # A prepared directory with another tokenizer: refuse before any work.
  old_manifest = None
  if os.path.isfile(os.path.join(out, shard_lib.MANIFEST)):
    old_manifest = shard_lib.load_manifest(out)
  docs = lm_documents(source, data_dir=data_dir, max_bytes=max_bytes,
                      val_percent=val_percent, text_key=text_key,
                      max_documents=max_documents)
  if not docs.train:
    raise DataError(f"{source}: the train split has no documents")
  os.makedirs(out, exist_ok=True)

  trained = False
  if train_tokenizer is not None:
    path = _existing_tokenizer(out, train_tokenizer)
    if path is None:
      _say(f"training a {train_tokenizer} tokenizer (vocab_size {vocab_size}) "
           f"on up to {tokenizer_sample_bytes / 2**20:.0f} MiB of the train "
           "split")
      path = tok_lib.train_tokenizer(train_tokenizer, docs.train, vocab_size,
                                     out, max_bytes=tokenizer_sample_bytes)
      trained = True
    else:
      _say(f"using the tokenizer already in {path} (delete it to train "
           "again)")
    tokenizer = path
  tok = tok_lib.load_tokenizer(tokenizer)
  if old_manifest is not None:
    shard_lib.check_tokenizer(out, old_manifest, tok, shard_lib.PREPARE_HINT)
  tok_file = tok_lib.copy_tokenizer(tok, out)

  dtype = shard_lib.token_dtype(tok.vocab_size)
  written, skipped, splits, lengths = [], [], {}, {}
  for split, documents in (("train", docs.train),
                           ("validation", docs.validation)):
    entries, doc_max, doc_sum, n_docs = [], 0, 0, 0
    bar = _progress_bar(split, sum(len(d) for d in documents), progress)
    for k, (lo, hi) in enumerate(shard_groups(documents, shard_bytes)):
      name = f"{split}-{k:05d}"
      group = documents[lo:hi]
      raw = sum(len(d) for d in group)
      expected = {"name": name, "first_document": lo, "raw_documents": hi - lo,
                  "raw_bytes": raw, "raw_crc32": _raw_crc(group),
                  "tokenizer_sha256": tok.sha256, "dtype": dtype.name}
      info = shard_lib.shard_is_finished(out, name, expected)
      if info is not None:
        skipped.append(name)
        if bar is not None:
          bar.update(raw)
      else:
        tokens, starts = tokenize_shard(tok, group, dtype, bar)
        lens = np.diff(np.append(starts, tokens.size)) - 1
        info = {**expected, "documents": int(starts.size),
                "tokens": int(tokens.size),
                "max_document_tokens": int(lens.max()) if lens.size else 0}
        shard_lib.write_shard(out, name, tokens, starts, info)
        written.append(name)
      if info["documents"]:
        entries.append({"name": name, "documents": info["documents"],
                        "tokens": info["tokens"]})
        doc_max = max(doc_max, info["max_document_tokens"])
        doc_sum += info["tokens"] - info["documents"]
        n_docs += info["documents"]
    if bar is not None:
      bar.close()
    splits[split] = {"documents": n_docs,
                     "tokens": sum(e["tokens"] for e in entries),
                     "raw_bytes": sum(len(d) for d in documents),
                     "shards": entries}
    lengths[split] = {"mean": round(doc_sum / max(n_docs, 1), 2),
                      "max": doc_max}

  manifest = {
      "format": shard_lib.FORMAT,
      "source": source,
      "options": {"val_percent": val_percent, "max_bytes": max_bytes,
                  "text_key": text_key, "max_documents": max_documents,
                  "shard_bytes": shard_bytes},
      "tokenizer": {"kind": tok.kind, "file": tok_file, "sha256": tok.sha256,
                    "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
      "dtype": dtype.name,
      "layout": "each document is EOS followed by its tokens",
      "splits": splits,
      "document_tokens": lengths,
  }
  if shard_lib.write_json(os.path.join(out, shard_lib.MANIFEST), manifest):
    written.append(shard_lib.MANIFEST)
  return PrepareResult(out, manifest, written, skipped, trained)


def _say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _progress_bar(split: str, total: int, progress: bool):
  if not progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=f"tokenizing {split}", unit="B",
              unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


def summary_lines(result: PrepareResult) -> list[str]:
  """What to print after `prepare`."""
  m = result.manifest
  tok = m["tokenizer"]
  lines = [f"prepared {result.directory}: tokenizer {tok['kind']} "
           f"({tok['file']}, vocab_size {tok['vocab_size']}, sha256 "
           f"{tok['sha256'][:12]})"]
  for split, info in m["splits"].items():
    ratio = info["raw_bytes"] / max(info["tokens"], 1)
    lines.append(f"  {split}: {info['documents']} documents, "
                 f"{info['tokens']} tokens ({ratio:.2f} bytes/token), "
                 f"{len(info['shards'])} shards")
  new = [w for w in result.written if w != shard_lib.MANIFEST]
  lines.append(f"  shards written {len(new)}, already done "
               f"{len(result.skipped)}"
               + ("; tokenizer trained" if result.trained_tokenizer else ""))
  lines.append(f"train with: python experiments/train_lm.py "
               f"--dataset=tokens:{result.directory}")
  return lines


# ----------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("source", "stdlib", "Text to prepare: stdlib, "
                      "text:GLOB or tfds:NAME (a set prepared on disk).")
  flags.DEFINE_string("out", None, "The prepared directory (created; "
                      "re-running skips finished shards).")
  flags.DEFINE_string("tokenizer", "bytes", "bytes, or a SentencePiece "
                      ".model / tokenizers .json file (copied into --out).")
  flags.DEFINE_enum("train_tokenizer", None, list(tok_lib.TRAINABLE),
                    "Train this tokenizer on the train split first (local; "
                    "kept when --out already has one).")
  flags.DEFINE_integer("vocab_size", None, "Vocabulary of the trained "
                       "tokenizer (SentencePiece: > 256 + distinct "
                       "characters).")
  flags.DEFINE_integer("shard_bytes", DEFAULT_SHARD_BYTES,
                       "Raw text bytes per shard.")
  flags.DEFINE_integer("tokenizer_sample_bytes",
                       DEFAULT_TOKENIZER_SAMPLE_BYTES,
                       "Train the tokenizer on this many bytes of the train "
                       "split.")
  flags.DEFINE_float("val_percent", 5, "stdlib/text: percent of files (by "
                     "path hash) for validation.")
  flags.DEFINE_integer("max_bytes", None, "Read at most this many bytes "
                       "(stdlib/text: in all; tfds: per split).")
  flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
  flags.DEFINE_string("text_key", "text", "tfds: the text feature.")
  flags.DEFINE_integer("max_documents", None, "tfds: at most this many "
                       "documents per split.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


HELP_GROUPS = {
    "source": ("source", "data_dir", "text_key", "max_documents", "max_bytes",
               "val_percent"),
    "tokenizer": ("tokenizer", "train_tokenizer", "vocab_size",
                  "tokenizer_sample_bytes"),
    "output": ("out", "shard_bytes", "progress"),
}


def run(flag_values) -> int:
  """Runs the prepare step from flags (or a dict of flag values; a missing one
  takes `prepare`'s default); returns the exit code (2 on bad input)."""
  v = (dict(flag_values) if isinstance(flag_values, dict)
       else flag_values.flag_values_dict())
  if not v.get("out"):
    sys.stderr.write("error: --out is required (the directory to write)\n")
    return 2
  keys = ("tokenizer", "train_tokenizer", "vocab_size", "shard_bytes",
          "val_percent", "max_bytes", "data_dir", "text_key", "max_documents",
          "tokenizer_sample_bytes", "progress")
  try:
    result = prepare(v.get("source", "stdlib"), v["out"],
                     **{k: v[k] for k in keys if k in v})
  except (ValueError, DataError, OSError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  print("\n".join(summary_lines(result)))
  return 0



if __name__ == "__main__":
  # Run as the importable module, so that its flags belong to
  # moejax.data.prepare (`--help` lists the project's flags by module). The
  # command line (`moejax.cli.app`) sits above this layer: only this script
  # block imports it.
  from moejax.cli import app  # pylint: disable=g-import-not-at-top
  from moejax.data import prepare as _prepare  # pylint: disable=g-import-not-at-top
  _prepare.define_flags()
  app.run(_prepare.run, _prepare.__doc__, _prepare.HELP_GROUPS)
