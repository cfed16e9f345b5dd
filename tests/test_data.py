"""Tests of moejax.data: determinism, resumability, splits, sources, errors.

Axis legend:
  B  batch
  S  sequence length
"""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from moejax.data import (DataError, ImageData, LMData, decode, encode,
                         get_image_data, get_lm_data)
from moejax.data.base import split_named_documents
from moejax.data.stdlib import stdlib_documents, stdlib_files, stdlib_root

SMALL = 300_000  # max_bytes of the stdlib corpus in most tests


def _lm(seed=0, seq_len=32, batch_size=4):
  return get_lm_data("stdlib", seq_len=seq_len, batch_size=batch_size,
                     seed=seed, max_bytes=SMALL)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------
# LMData: determinism, resumability, packing.


def test_lm_batch_shapes_and_dtypes():
  data = _lm()
  b = data.batch(0)
  assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (4, 32)
  assert b["inputs"].dtype == b["targets"].dtype == np.int32
  assert b["mask"].dtype == np.float32
  np.testing.assert_array_equal(b["mask"], 1.0)
  assert data.vocab_size == 256
  assert 0 <= b["inputs"].min() and b["inputs"].max() < 256
  assert {k: v[0] for k, v in data.batch_shapes().items()} == {
      "inputs": (4, 32), "targets": (4, 32), "mask": (4, 32)}


def test_lm_deterministic_across_instances():
  a, b = _lm(seed=3), _lm(seed=3)
  for i in (0, 1, 7, 1000):
    _assert_batches_equal(a.batch(i), b.batch(i))
  assert a.fingerprint == b.fingerprint
  c = _lm(seed=4)
  assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])


def test_lm_resumable_independent_of_call_order():
  a, b = _lm(), _lm()
  forward = [a.batch(i) for i in range(12)]
  for i in reversed(range(12)):
    _assert_batches_equal(b.batch(i), forward[i])
  # A "resumed" instance that starts at batch 9 sees the same batches.
  c = _lm()
  _assert_batches_equal(c.batch(9), forward[9])


def test_targets_are_inputs_shifted_inside_windows():
  data = _lm(seq_len=16, batch_size=8)
  win = data.seq_len + 1
  tokens = data.train_tokens
  for i in (0, 5):
    b = data.batch(i)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for row, w in enumerate(data.example_indices(i)):
      window = tokens[w * win:(w + 1) * win]
      np.testing.assert_array_equal(b["inputs"][row], window[:-1])
      np.testing.assert_array_equal(b["targets"][row], window[1:])


def test_documents_joined_with_zero_and_packed_in_windows():
  data = LMData([b"abc", b"de"], [b"xyz" * 10], seq_len=2, batch_size=2)
  np.testing.assert_array_equal(data.train_tokens,
                                np.frombuffer(b"abc\0de", np.uint8))
  assert data.num_train_tokens == 6 and data.num_val_tokens == 30
  assert data.num_train_windows == 2  # "abc", "\0de" (non-overlapping)
  windows = {bytes(np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
                   .astype(np.uint8))
             for b in (data.batch(0),) for r in range(2)}
  assert windows == {b"abc", b"\0de"}


def test_epochs_are_permutations_of_each_other():
  tokens = np.arange(400) % 256
  data = LMData.from_tokens(tokens, tokens, seq_len=7, batch_size=5, seed=1)
  n = data.num_train_windows
  assert n == 50
  per_epoch = n // 5
  epochs = [np.concatenate([data.example_indices(e * per_epoch + j)
                            for j in range(per_epoch)]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(
      epochs[1], np.random.default_rng([1, 1]).permutation(n))


def test_batch_spans_epochs_when_windows_do_not_divide():
  docs = [b"0123456789" * 3]
  data = LMData(docs, docs, seq_len=4, batch_size=4, seed=0)  # 6 windows
  n = data.num_train_windows
  assert n == 6
  g = np.concatenate([data.example_indices(i) for i in range(3)])  # 12 = 2 ep
  np.testing.assert_array_equal(g[:6], np.random.default_rng([0, 0]).permutation(6))
  np.testing.assert_array_equal(g[6:], np.random.default_rng([0, 1]).permutation(6))


def test_eval_batches_fixed_order_and_drop_partial():
  data = _lm(seq_len=32, batch_size=4)
  batches = list(data.eval_batches())
  assert len(batches) == data.num_val_batches == data.num_val_windows // 4
  assert len(list(data.eval_batches(2))) == 2
  again = list(data.eval_batches(3))
  for a, b in zip(batches[:3], again):
    _assert_batches_equal(a, b)
  first = data.val_tokens[:33]
  np.testing.assert_array_equal(batches[0]["inputs"][0], first[:-1])


def test_validation_too_small_is_data_error():
  with pytest.raises(DataError, match="validation split is too small"):
    LMData([b"a" * 1000], [b"b" * 10], seq_len=16, batch_size=2)
  with pytest.raises(DataError, match="validation"):
    get_lm_data("stdlib", seq_len=4096, batch_size=64, max_bytes=SMALL)


def test_bad_arguments_raise_value_error_naming_them():
  with pytest.raises(ValueError, match="seq_len.*0"):
    get_lm_data("stdlib", seq_len=0, batch_size=4)
  with pytest.raises(ValueError, match="batch_size.*-1"):
    get_lm_data("stdlib", seq_len=8, batch_size=-1)
  with pytest.raises(ValueError, match="batch index"):
    _lm().batch(-1)


def test_encode_decode_roundtrip():
  text = "def f(x):\n    return x  # ünïcode"
  tokens = encode(text)
  assert tokens.dtype == np.int32
  assert decode(tokens) == text
  assert LMData.decode(tokens) == text
  assert decode(np.array([0xff, 65])) == "\ufffdA"


# ----------------------------------------------------------------------------
# Sources.


def test_stdlib_corpus_nontrivial_and_split_by_file_hash():
  docs = stdlib_documents()
  assert stdlib_documents() is docs  # cached
  files = stdlib_files()
  assert all(not any(p in f.split("/") for p in
                     ("site-packages", "dist-packages", "__pycache__"))
             for f in files)
  assert list(files) == sorted(files)
  train, val = set(docs.train_names), set(docs.validation_names)
  assert not train & val
  assert train | val == set(files)
  assert all(zlib.crc32(f.encode()) % 100 < 5 for f in val)
  assert all(zlib.crc32(f.encode()) % 100 >= 5 for f in train)
  assert sum(map(len, docs.train)) > 1_000_000
  assert sum(map(len, docs.validation)) > 10_000
  with open(os.path.join(stdlib_root(), docs.validation_names[0]), "rb") as fh:
    assert fh.read() == docs.validation[0]
  # The split of a capped corpus is the same rule on a prefix of the files.
  capped = stdlib_documents(5, SMALL)
  assert sum(map(len, capped.train + capped.validation)) == SMALL
  assert set(capped.validation_names[:-1]) <= val


def test_hash_split_falls_back_to_byte_split_for_one_file():
  split = split_named_documents([("only.txt", b"x" * 1000)], 5)
  assert split.train == (b"x" * 950,) and split.validation == (b"x" * 50,)


def test_text_glob(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_bytes(f"file {i}\n".encode() * 50)
  (tmp_path / "skip.md").write_bytes(b"not matched")
  data = get_lm_data(f"text:{tmp_path}/*.txt", seq_len=16, batch_size=2)
  expected_val = [f"doc{i:02d}.txt" for i in range(40)
                  if zlib.crc32(f"doc{i:02d}.txt".encode()) % 100 < 5]
  assert expected_val  # the names above do put some files in validation
  text = decode(data.val_tokens)
  for name in expected_val:
    assert f"file {int(name[3:5])}\n" in text
  assert "not matched" not in decode(data.train_tokens) + text
  b = data.batch(3)
  assert b["inputs"].shape == (2, 16)
  _assert_batches_equal(
      b, get_lm_data(f"text:{tmp_path}/*.txt", seq_len=16, batch_size=2).batch(3))


def test_text_single_file(tmp_path):
  (tmp_path / "one.txt").write_bytes(b"hello world " * 500)
  data = get_lm_data(f"text:{tmp_path}/one.txt", seq_len=8, batch_size=4)
  assert data.num_train_tokens + data.num_val_tokens == 6000


def test_text_glob_matching_nothing(tmp_path):
  pattern = f"{tmp_path}/nothing/*.txt"
  with pytest.raises(DataError, match="nothing/\\*\\.txt"):
    get_lm_data(f"text:{pattern}", seq_len=8, batch_size=2)


def test_unknown_name_lists_allowed_forms():
  with pytest.raises(DataError, match="stdlib.*text:GLOB.*tfds:NAME"):
    get_lm_data("wikipedia", seq_len=8, batch_size=2)
  with pytest.raises(DataError, match="digits"):
    get_image_data("imagenet", batch_size=2)


def test_tfds_not_prepared_is_quick_clear_error(tmp_path):
  with pytest.raises(DataError) as err:
    get_lm_data("tfds:some_name", seq_len=8, batch_size=2, data_dir=str(tmp_path))
  msg = str(err.value)
  assert "some_name" in msg and str(tmp_path) in msg and "tfds build" in msg
  with pytest.raises(DataError, match="mnist"):
    get_image_data("tfds:mnist", batch_size=2, data_dir=str(tmp_path))


def test_tfds_env_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
  with pytest.raises(DataError, match="env_dir"):
    get_lm_data("tfds:lm1b", seq_len=8, batch_size=2)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A data dir with two tiny array_record sets prepared by tfds (no network)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pil = pytest.importorskip("PIL.Image")
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict(
              {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(30, "train"),
              "validation": self._generate_examples(10, "val")}

    def _generate_examples(self, n, tag):
      for i in range(n):
        yield i, {"text": f"{tag} document {i}. " * 8}

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(4, 4, 1)),
              "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12),
              "test": self._generate_examples(6)}

    def _generate_examples(self, n):
      for i in range(n):
        img = pil.fromarray(np.full((4, 4), i * 20, np.uint8), mode="L")
        yield i, {"image": img, "label": i % 3}

  for cls in (TinyText, TinyImages):
    cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_prepared_text(tfds_dir):
  data = get_lm_data("tfds:tiny_text", seq_len=8, batch_size=2,
                     data_dir=tfds_dir)
  train, val = decode(data.train_tokens), decode(data.val_tokens)
  assert "train document 29." in train and "val" not in train
  assert "val document 9." in val
  few = get_lm_data("tfds:tiny_text", seq_len=8, batch_size=2,
                    data_dir=tfds_dir, max_documents=3)
  assert "train document 3." not in decode(few.train_tokens)
  with pytest.raises(DataError, match="no split 'nope'"):
    get_lm_data("tfds:tiny_text:train:nope", seq_len=8, batch_size=2,
                data_dir=tfds_dir)
  with pytest.raises(DataError, match="1.0.0"):
    get_lm_data("tfds:tiny_text:9.9.9", seq_len=8, batch_size=2,
                data_dir=tfds_dir)


def test_tfds_prepared_images(tfds_dir):
  data = get_image_data("tfds:tiny_images", batch_size=3, data_dir=tfds_dir,
                        upsample=2)
  assert data.num_classes == 3 and data.num_train == 12 and data.num_val == 6
  b = data.batch(0)
  assert b["images"].shape == (3, 8, 8, 1) and b["images"].dtype == np.float32
  assert b["images"].min() >= -1 and b["images"].max() <= 1
  for v in data.eval_batches():  # example i: pixels i * 20, label i % 3
    pixel = np.round((v["images"] + 1) * 127.5).astype(int)
    assert (pixel == pixel[:, :1, :1]).all()
    np.testing.assert_array_equal(pixel[:, 0, 0, 0] // 20 % 3, v["labels"])


# ----------------------------------------------------------------------------
# Images.


def test_digits_shapes_ranges_labels():
  data = get_image_data("digits", batch_size=16)
  assert data.image_shape == (8, 8, 1) and data.num_classes == 10
  assert data.num_train + data.num_val == 1797 and data.num_val == 180
  b = data.batch(0)
  assert b["images"].shape == (16, 8, 8, 1) and b["images"].dtype == np.float32
  assert b["labels"].shape == (16,) and b["labels"].dtype == np.int32
  assert b["images"].min() >= -1 and b["images"].max() <= 1
  assert b["images"].min() == -1  # background pixels
  labels = np.concatenate([data.batch(i)["labels"] for i in range(20)])
  assert set(labels.tolist()) == set(range(10))
  vals = list(data.eval_batches())
  assert len(vals) == 180 // 16


def test_digits_deterministic_resumable_and_upsampled():
  a = get_image_data("digits", batch_size=8, seed=2)
  b = get_image_data("digits", batch_size=8, seed=2)
  _assert_batches_equal(a.batch(500), b.batch(500))
  _assert_batches_equal(a.batch(3), b.batch(3))
  c = get_image_data("digits", batch_size=8, seed=3)
  assert not np.array_equal(a.batch(0)["labels"], c.batch(0)["labels"]) or (
      not np.array_equal(a.batch(0)["images"], c.batch(0)["images"]))
  up = get_image_data("digits", batch_size=8, seed=2, upsample=4)
  big = up.batch(3)["images"]
  assert big.shape == (8, 32, 32, 1)
  np.testing.assert_array_equal(big[:, ::4, ::4], a.batch(3)["images"])
  with pytest.raises(ValueError, match="upsample"):
    get_image_data("digits", batch_size=8, upsample=0)


def test_image_data_validation_too_small():
  x = np.zeros((10, 2, 2, 1), np.float32)
  y = np.zeros((10,), np.int32)
  with pytest.raises(DataError, match="validation split is too small"):
    ImageData(x, y, x[:2], y[:2], batch_size=4, num_classes=1)


@pytest.mark.slow
def test_import_is_light():
  code = ("import sys, moejax.data; "
          "print([m for m in ('tensorflow_datasets', 'tensorflow', 'sklearn')"
          " if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == "[]"
