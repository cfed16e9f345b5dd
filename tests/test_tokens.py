"""Tests of real-text data: tokenizers, prepared shards, the packed loader.

Axis legend:
  B  batch
  S  sequence length
  N  tokens
"""

import numpy as np
import pytest

from moejax.data import DataError, encode
from moejax.data import tokenizers as tok_lib
from moejax.data.stdlib import stdlib_documents

CORPUS = 40_000  # bytes of the standard library the tiny tokenizers learn from
TEXTS = ["def f(x):\n    return x + 1\n", "  two  spaces\n\n\ttab é 中文 \x00 end",
         "<eos> and </s> are plain text here", ""]


def _corpus():
  return stdlib_documents(5, CORPUS).train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """{kind: path} of tiny tokenizers of each trainable kind."""
  out = {}
  for kind in tok_lib.TRAINABLE:
    d = tmp_path_factory.mktemp(kind)
    out[kind] = tok_lib.train_tokenizer(kind, _corpus(), 400, str(d))
  return out


def test_bytes_tokenizer_is_todays_encoding():
  tok = tok_lib.load_tokenizer("bytes")
  assert tok_lib.load_tokenizer(None).kind == "bytes"
  assert (tok.vocab_size, tok.eos_id, tok.sha256) == (256, 0, "bytes")
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, encode(text))
    assert tok.decode(ids) == text
  docs = [b"\xff\x00ab", b""]
  got = tok.encode_documents(docs)
  np.testing.assert_array_equal(got[0], [255, 0, 97, 98])
  assert got[1].size == 0
  assert tok_lib.model_vocab_size(tok.vocab_size) == 256


@pytest.mark.parametrize("kind", list(tok_lib.TRAINABLE))
def test_trained_tokenizers_round_trip(trained, kind):
  tok = tok_lib.load_tokenizer(trained[kind])
  assert tok.kind == ("tokenizers" if kind == "tokenizers_bpe"
                      else "sentencepiece")
  assert tok.vocab_size == 400
  assert 0 <= tok.eos_id < tok.vocab_size
  assert tok.sha256 == tok_lib.file_sha256(trained[kind])
  assert len(tok.sha256) == 64
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
    assert tok.eos_id not in ids.tolist()  # only the loader places EOS
    assert tok.decode(ids) == text
  code = b"".join(_corpus()[:4])
  ids = tok.encode_documents([code])[0]
  assert tok.decode(ids) == code.decode()
  assert ids.size < 0.9 * len(code)  # it learnt merges
  np.testing.assert_array_equal(ids, tok.encode(code.decode()))
  assert tok_lib.model_vocab_size(tok.vocab_size) == 512


def test_model_vocab_size_pads_to_128():
  assert [tok_lib.model_vocab_size(v) for v in (1, 128, 129, 256, 32000)] == [
      128, 128, 256, 256, 32000]


def test_tokenizer_errors_are_one_line(tmp_path, trained):
  missing = tmp_path / "nope.model"
  with pytest.raises(DataError, match="nope.model.*does not exist.*prepare"):
    tok_lib.load_tokenizer(str(missing))
  for name, body in (("bad.model", b"not a model"), ("bad.json", b"{oops")):
    (tmp_path / name).write_bytes(body)
    with pytest.raises(DataError) as e:
      tok_lib.load_tokenizer(str(tmp_path / name))
    assert name in str(e.value) and "\n" not in str(e.value)
  (tmp_path / "x.txt").write_text("hi")
  with pytest.raises(DataError, match="unknown type"):
    tok_lib.load_tokenizer(str(tmp_path / "x.txt"))
  tok = tok_lib.load_tokenizer(trained["sentencepiece_bpe"])
  with pytest.raises(ValueError, match="vocab_size=256 is smaller.*400"):
    tok_lib.check_model_vocab(tok, 256)
  tok_lib.check_model_vocab(tok, 512)
  with pytest.raises(ValueError, match="train_tokenizer='wordpiece'"):
    tok_lib.train_tokenizer("wordpiece", [b"a"], 300, str(tmp_path))
