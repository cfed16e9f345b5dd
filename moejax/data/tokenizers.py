"""Tokenizers behind one interface: bytes, SentencePiece, Hugging Face `tokenizers`.

Axis legend:
  N  tokens of one text
  V  tokenizer vocabulary

`load_tokenizer(spec)` takes ``bytes`` (the default: UTF-8 bytes, V = 256, EOS =
the separator byte 0, exactly the tokens of `moejax.data.base.encode`), a
SentencePiece model file (``*.model``) or a Hugging Face `tokenizers` JSON file
(``*.json``). Every tokenizer has ``encode(text) -> int32[N]``, ``decode``,
``vocab_size`` (V), ``eos_id`` (the document separator of packed data) and
``sha256`` (of the model file; ``"bytes"`` for bytes), which prepared shards
record so that a run can check it reads them with the tokenizer that wrote them.

`train_tokenizer` trains a SentencePiece (BPE or unigram) or a `tokenizers`
byte-level BPE model locally on documents (no download). Both are lossless:
SentencePiece with identity normalisation and byte fallback, `tokenizers` with
byte-level pre-tokenisation; `decode(encode(text)) == text` for valid UTF-8.

The model's vocabulary follows the tokenizer: `model_vocab_size` pads V up to a
multiple of 128 (bytes: 256 stays 256). `sentencepiece` and `tokenizers` are
imported only when a file of theirs is loaded or trained.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from typing import Iterable, Sequence

import numpy as np

from moejax.data.base import SEPARATOR, VOCAB_SIZE, DataError, decode, encode

BYTES = "bytes"
VOCAB_MULTIPLE = 128
# Tokenizer kinds `train_tokenizer` makes, with the file each writes.
TRAINABLE = {"sentencepiece_bpe": "tokenizer.model",
             "sentencepiece_unigram": "tokenizer.model",
             "tokenizers_bpe": "tokenizer.json"}
EOS_PIECE = "<eos>"
# End-of-text tokens looked for in a `tokenizers` file, in this order.
HF_EOS_NAMES = (EOS_PIECE, "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]",
                "<|im_end|>")
SPECS = ("bytes", "a SentencePiece .model file", "a tokenizers .json file")


def model_vocab_size(tokenizer_vocab: int) -> int:
  """The model's vocabulary for a tokenizer of V ids: V padded up to a
  multiple of 128 (256 stays 256)."""
  return -(-int(tokenizer_vocab) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class Tokenizer:
  """The interface: text <-> int32 token ids.

  Attributes:
    kind: "bytes", "sentencepiece" or "tokenizers".
    path: the model file (None for bytes).
    vocab_size: V, ids are in [0, V).
    eos_id: the id placed before every document of packed data.
    sha256: hex sha256 of the model file, "bytes" for bytes.
  """
  kind: str
  path: str | None = None
  vocab_size: int
  eos_id: int
  sha256: str

  @property
  def spec(self) -> str:
    """What `load_tokenizer` takes to load this tokenizer again."""
    return self.path or BYTES

  @property
  def short_hash(self) -> str:
    """The first 12 hex digits of `sha256` ("bytes" for bytes), for messages."""
    return self.sha256 if self.sha256 == BYTES else self.sha256[:12]

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text`: int32[N] (no EOS added)."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    """Text of token ids int[N]; ids outside [0, V) (a padded model
    vocabulary's) decode to nothing."""
    raise NotImplementedError

  def _valid(self, ids) -> list[int]:
    arr = np.asarray(ids).astype(np.int64).ravel()
    return arr[(arr >= 0) & (arr < self.vocab_size)].tolist()

  def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
    """Token ids of raw documents (bytes; invalid UTF-8 becomes U+FFFD except
    for the bytes tokenizer, which keeps every byte): int32[N_i] each."""
    texts = [d.decode("utf-8", errors="replace") for d in documents]
    return [self.encode(t) for t in texts]

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(spec={self.spec!r}, vocab_size="
            f"{self.vocab_size}, eos_id={self.eos_id}, sha256="
            f"{self.short_hash})")


class BytesTokenizer(Tokenizer):
  """UTF-8 bytes as tokens (V = 256, EOS = byte 0): `base.encode`/`decode`."""
  kind = BYTES
  vocab_size = VOCAB_SIZE
  eos_id = SEPARATOR
  sha256 = BYTES

  def encode(self, text: str) -> np.ndarray:
    return encode(text)

  def decode(self, ids) -> str:
    return decode(ids)

  def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(bytes(d), np.uint8).astype(np.int32)
            for d in documents]


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file; EOS is the model's ``eos_id``."""
  kind = "sentencepiece"

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = path
    self.sha256 = file_sha256(path)
    with open(path, "rb") as fh:
      proto = fh.read()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"tokenizer {path!r} is not a SentencePiece model "
          f"({_first_line(e)}); pass bytes, a SentencePiece .model or a "
          "tokenizers .json file") from None
    self.vocab_size = int(self._sp.vocab_size())
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise DataError(f"tokenizer {path!r} has no end-of-sentence piece "
                      "(eos_id=-1); train it with eos_id >= 0")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(self._valid(ids))

  def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
    texts = [d.decode("utf-8", errors="replace") for d in documents]
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(
        texts, num_threads=os.cpu_count() or 1)]


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` JSON file; EOS is the first of
  `HF_EOS_NAMES` in its vocabulary. Special-token text inside a document is
  encoded as plain text (``encode_special_tokens``), so only the loader puts
  EOS ids into packed data."""
  kind = "tokenizers"

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HF  # pylint: disable=g-import-not-at-top
    self.path = path
    self.sha256 = file_sha256(path)
    try:
      self._tok = HF.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"tokenizer {path!r} is not a tokenizers JSON file "
          f"({_first_line(e)}); pass bytes, a SentencePiece .model or a "
          "tokenizers .json file") from None
    if hasattr(self._tok, "encode_special_tokens"):
      self._tok.encode_special_tokens = True
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    eos = next((self._tok.token_to_id(n) for n in HF_EOS_NAMES
                if self._tok.token_to_id(n) is not None), None)
    if eos is None:
      raise DataError(f"tokenizer {path!r} has no end-of-text token; add one "
                      f"of {', '.join(HF_EOS_NAMES[:4])} as a special token")
    self.eos_id = int(eos)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids,
                      np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(self._valid(ids), skip_special_tokens=False)

  def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
    texts = [d.decode("utf-8", errors="replace") for d in documents]
    return [np.asarray(e.ids, np.int32) for e in
            self._tok.encode_batch(texts, add_special_tokens=False)]


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def load_tokenizer(spec: str | None) -> Tokenizer:
  """The tokenizer of `spec`: ``bytes`` (or None), a ``.model`` or ``.json`` file.

  Raises:
    DataError: the file is missing, of an unknown type, or does not parse
      (one line naming the file and what to do).
  """
  if spec is None or spec == BYTES:
    return BytesTokenizer()
  if not isinstance(spec, str) or not spec.strip():
    raise DataError(f"tokenizer={spec!r} is not allowed; allowed: "
                    f"{', '.join(SPECS)}")
  path = os.path.expanduser(spec.strip())
  if not os.path.isfile(path):
    raise DataError(
        f"tokenizer file {path!r} does not exist; pass bytes, a SentencePiece "
        ".model or a tokenizers .json file (train one with `python -m "
        "moejax.data.prepare --train_tokenizer=sentencepiece_bpe ...`)")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise DataError(f"tokenizer file {path!r} has an unknown type; allowed: "
                  f"{', '.join(SPECS)}")


def check_model_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises ValueError when the model's `vocab_size` cannot hold the
  tokenizer's ids."""
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f"vocab_size={vocab_size} is smaller than the vocabulary of tokenizer "
        f"{tokenizer.spec!r} ({tokenizer.vocab_size}); allowed: >= "
        f"{tokenizer.vocab_size} (or leave vocab_size unset to follow the "
        "tokenizer)")


# ----------------------------------------------------------------------------
# Training.


def _sentence_chunks(documents: Iterable[bytes], max_bytes: int,
                     chunk_bytes: int = 4000) -> Iterable[str]:
  """Documents as SentencePiece "sentences": runs of whole lines (newlines
  kept) of at most `chunk_bytes` bytes (longer lines cut), at most `max_bytes`
  in all."""
  total = 0
  for doc in documents:
    text = doc.decode("utf-8", errors="replace")
    chunk = ""
    for line in text.splitlines(keepends=True):
      while len(line) > chunk_bytes:
        yield line[:chunk_bytes]
        line = line[chunk_bytes:]
      if len(chunk) + len(line) > chunk_bytes:
        yield chunk
        chunk = ""
      chunk += line
    if chunk:
      yield chunk
    total += len(doc)
    if total >= max_bytes:
      return


def train_tokenizer(kind: str, documents: Iterable[bytes], vocab_size: int,
                    out_dir: str, max_bytes: int = 100_000_000) -> str:
  """Trains a tokenizer on `documents` and writes it into `out_dir`.

  Args:
    kind: "sentencepiece_bpe", "sentencepiece_unigram" or "tokenizers_bpe".
    documents: training documents (bytes), read until `max_bytes` in all.
    vocab_size: V, including EOS (and SentencePiece's 256 byte pieces, so
      SentencePiece needs V > 256 + the distinct characters).
    out_dir: where ``tokenizer.model`` / ``tokenizer.json`` is written.

  Returns:
    the written file's path (written atomically).
  """
  if kind not in TRAINABLE:
    raise ValueError(f"train_tokenizer={kind!r} is unknown; allowed: "
                     f"{', '.join(TRAINABLE)}")
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or (
      vocab_size < 2):
    raise ValueError(f"vocab_size={vocab_size!r} is out of range; allowed: "
                     "integer >= 2")
  path = os.path.join(out_dir, TRAINABLE[kind])
  tmp = path + ".tmp"
  if kind.startswith("sentencepiece"):
    _train_sentencepiece(kind.split("_")[1], documents, vocab_size, tmp,
                         max_bytes)
  else:
    _train_tokenizers_bpe(documents, vocab_size, tmp, max_bytes)
  os.replace(tmp, path)
  return path


def _train_sentencepiece(model_type: str, documents, vocab_size: int,
                         path: str, max_bytes: int) -> None:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_sentence_chunks(documents, max_bytes))),
        model_writer=model, vocab_size=vocab_size, model_type=model_type,
        # Lossless: no normalisation, every byte encodable, spaces kept.
        normalization_rule_name="identity", byte_fallback=True,
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=["\n"], max_sentence_length=1 << 14,
        unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2,
        num_threads=max(1, min(16, os.cpu_count() or 1)))
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed: {_first_line(e)}"
                     ) from None
  with open(path, "wb") as fh:
    fh.write(model.getvalue())


def _train_tokenizers_bpe(documents, vocab_size: int, path: str,
                          max_bytes: int) -> None:
  from tokenizers import (Tokenizer as HF, decoders, models,  # pylint: disable=g-import-not-at-top
                          pre_tokenizers, trainers)

  def texts():
    total = 0
    for doc in documents:
      yield doc.decode("utf-8", errors="replace")
      total += len(doc)
      if total >= max_bytes:
        return

  tok = HF(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_PIECE], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts(), trainer=trainer)
  tok.save(path)


def copy_tokenizer(tokenizer: Tokenizer, out_dir: str) -> str:
  """Copies a tokenizer's model file into `out_dir` as ``tokenizer.model`` /
  ``tokenizer.json`` (unless it is that file); returns the file name, or
  "bytes" for bytes."""
  if tokenizer.path is None:
    return BYTES
  name = "tokenizer" + os.path.splitext(tokenizer.path)[1]
  dest = os.path.join(out_dir, name)
  if not (os.path.isfile(dest) and file_sha256(dest) == tokenizer.sha256):
    shutil.copyfile(tokenizer.path, dest + ".tmp")
    os.replace(dest + ".tmp", dest)
  return name
