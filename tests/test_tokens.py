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
  # ids of the padded model vocabulary decode to nothing
  ids = tok.encode("x = 1")
  assert tok.decode(np.concatenate([ids, [400, 511]])) == "x = 1"


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


# ----------------------------------------------------------------------------
# The prepare step: shards, manifest, skip on re-run, tokenizer checks.

PREP_BYTES = 120_000  # bytes of the standard library the prepare tests read


def _prepare(out, **kw):
  from moejax.data.prepare import prepare
  kw.setdefault("max_bytes", PREP_BYTES)
  kw.setdefault("shard_bytes", 30_000)
  kw.setdefault("progress", False)
  return prepare("stdlib", str(out), **kw)


def _files(directory):
  return {p.name: (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A directory prepared with a SentencePiece BPE trained on its train split."""
  out = tmp_path_factory.mktemp("prepared")
  result = _prepare(out, train_tokenizer="sentencepiece_bpe", vocab_size=400)
  return out, result


def test_prepare_writes_shards_and_manifest(prepared):
  from moejax.data import shards as shard_lib
  out, result = prepared
  m = result.manifest
  assert result.trained_tokenizer and not result.skipped
  assert (out / "tokenizer.model").is_file()
  assert m["tokenizer"]["file"] == "tokenizer.model"
  assert m["tokenizer"]["sha256"] == tok_lib.file_sha256(
      str(out / "tokenizer.model"))
  assert m["dtype"] == "uint16"
  assert shard_lib.read_json(str(out / "manifest.json")) == m
  tok = tok_lib.load_tokenizer(str(out / "tokenizer.model"))
  docs = stdlib_documents(5, PREP_BYTES)
  for split, texts in (("train", docs.train), ("validation", docs.validation)):
    info = m["splits"][split]
    assert len(info["shards"]) >= (3 if split == "train" else 1)
    assert info["documents"] == sum(1 for t in texts if t)
    assert info["raw_bytes"] == sum(len(t) for t in texts)
    # The shards hold every document, EOS first, in order.
    got_tokens, got_docs = [], []
    for entry in info["shards"]:
      t = np.load(out / f"{entry['name']}.tokens.npy")
      d = np.load(out / f"{entry['name']}.docs.npy")
      assert t.dtype == np.uint16 and t.size == entry["tokens"]
      assert d.size == entry["documents"] and d[0] == 0
      np.testing.assert_array_equal(t[d], tok.eos_id)
      ends = np.append(d[1:], t.size)
      got_docs += [t[a + 1:b].astype(np.int32) for a, b in zip(d, ends)]
      got_tokens.append(t.size)
    assert sum(got_tokens) == info["tokens"]
    want = [tok.encode(t.decode()) for t in texts if t]
    assert len(got_docs) == len(want)
    for a, b in zip(got_docs, want):
      np.testing.assert_array_equal(a, b)
  assert m["document_tokens"]["train"]["max"] == max(
      len(tok.encode(t.decode())) for t in docs.train)


def test_prepare_rerun_writes_nothing(prepared):
  out, first = prepared
  before = _files(out)
  again = _prepare(out, train_tokenizer="sentencepiece_bpe", vocab_size=400)
  assert again.written == [] and not again.trained_tokenizer
  assert sorted(again.skipped) == sorted(
      e["name"] for s in first.manifest["splits"].values() for e in s["shards"])
  assert again.manifest == first.manifest
  assert _files(out) == before


def test_prepare_redoes_only_broken_shards(tmp_path):
  first = _prepare(tmp_path)  # bytes
  assert first.manifest["tokenizer"]["file"] == "bytes"
  assert not (tmp_path / "tokenizer.model").exists()
  (tmp_path / "train-00001.json").unlink()
  (tmp_path / "train-00002.tokens.npy").write_bytes(b"")
  again = _prepare(tmp_path)
  assert sorted(again.written) == ["train-00001", "train-00002"]
  assert again.manifest == first.manifest


def test_prepare_refuses_another_tokenizer(prepared, tmp_path):
  out, result = prepared
  with pytest.raises(DataError) as e:
    _prepare(out)  # bytes into a SentencePiece directory
  msg = str(e.value)
  assert result.manifest["tokenizer"]["sha256"][:12] in msg
  assert "bytes" in msg and "\n" not in msg


def test_prepare_copies_a_given_tokenizer(trained, tmp_path):
  res = _prepare(tmp_path, tokenizer=trained["tokenizers_bpe"])
  assert res.manifest["tokenizer"]["file"] == "tokenizer.json"
  assert (tok_lib.file_sha256(str(tmp_path / "tokenizer.json"))
          == tok_lib.file_sha256(trained["tokenizers_bpe"]))
  with pytest.raises(ValueError, match="vocab_size"):
    _prepare(tmp_path / "x", train_tokenizer="tokenizers_bpe")


def _cli(*args, script="prepare_data.py"):
  import os
  import subprocess
  import sys
  from subprocess_env import one_device_env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
      [sys.executable, os.path.join(root, "experiments", script), *args],
      capture_output=True, text=True, timeout=300, cwd=root,
      env=one_device_env(PYTHONPATH=root))


@pytest.mark.slow
def test_prepare_cli(tmp_path, capsys):
  args = ["--source=stdlib", f"--out={tmp_path}", f"--max_bytes={PREP_BYTES}",
          "--train_tokenizer=tokenizers_bpe", "--vocab_size=400",
          "--shard_bytes=60000"]
  first = _cli(*args)
  assert first.returncode == 0, first.stderr
  assert "tokenizing train" in first.stderr  # the progress bar
  assert "tokenizer trained" in first.stdout
  assert f"--dataset=tokens:{tmp_path}" in first.stdout
  bad = _cli("--train_tokenizer=wordpiece", f"--out={tmp_path}")
  assert bad.returncode == 2
  assert len(bad.stderr.strip().splitlines()) == 1
  assert "--train_tokenizer" in bad.stderr
  # In process: the re-run and the other errors.
  from moejax.data import prepare
  again = dict(source="stdlib", out=str(tmp_path), max_bytes=PREP_BYTES,
               train_tokenizer="tokenizers_bpe", vocab_size=400,
               shard_bytes=60000, progress=False)
  capsys.readouterr()
  assert prepare.run(again) == 0
  assert "shards written 0" in capsys.readouterr().out
  for values, needle in (
      (dict(tokenizer="/no/such.model"), "/no/such.model' does not exist"),
      (dict(source="tokens:x"), "tokens:x"),
      (dict(out=None), "--out is required")):
    assert prepare.run({"out": str(tmp_path / "b"), "progress": False,
                        **values}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# ----------------------------------------------------------------------------
# The packed loader: grain order, packing, segments, resume, process rows.


def _loader(directory, **kw):
  from moejax.data import get_lm_data
  kw.setdefault("seq_len", 32)
  kw.setdefault("batch_size", 4)
  return get_lm_data(f"tokens:{directory}", **kw)


def _reference_windows(directory, split, seq_len):
  """The split's stream and document-start flags rebuilt from the shards'
  files with plain numpy, cut into windows of S + 1."""
  from moejax.data import shards as shard_lib
  m = shard_lib.load_manifest(str(directory))
  toks, begins = [], []
  for e in m["splits"][split]["shards"]:
    t = np.load(directory / f"{e['name']}.tokens.npy").astype(np.int32)
    b = np.zeros(t.size, bool)
    b[np.load(directory / f"{e['name']}.docs.npy")] = True
    toks.append(t)
    begins.append(b)
  toks, begins = np.concatenate(toks), np.concatenate(begins)
  w = toks.size // (seq_len + 1)
  shape = (w, seq_len + 1)
  return (toks[:w * (seq_len + 1)].reshape(shape),
          begins[:w * (seq_len + 1)].reshape(shape))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_loader_batches_are_packed_windows(prepared):
  out, result = prepared
  data = _loader(out, seed=1)
  assert data.vocab_size == 400
  assert data.fingerprint == _loader(out).fingerprint
  shapes = data.batch_shapes()
  assert set(shapes) == {"inputs", "targets", "mask", "segment_ids",
                         "positions"}
  windows, begins = _reference_windows(out, "train", 32)
  assert data.num_train_windows == len(windows)
  eos = result.manifest["tokenizer"]["eos_id"]
  for i in (0, 3):
    b = data.batch(i)
    for k, (shape, dtype) in shapes.items():
      assert b[k].shape == shape and b[k].dtype == dtype, k
    np.testing.assert_array_equal(b["mask"], 1.0)
    for row, w in enumerate(data.example_indices(i)):
      np.testing.assert_array_equal(b["inputs"][row], windows[w][:-1])
      np.testing.assert_array_equal(b["targets"][row], windows[w][1:])
      # Segments: 1, 2, ... starting at each document's EOS.
      seg, pos, start = b["segment_ids"][row], b["positions"][row], 0
      want_seg = 1 + np.cumsum(begins[w][:-1]) - begins[w][0]
      np.testing.assert_array_equal(seg, want_seg)
      for t in range(32):
        if t and begins[w][t]:
          start = t
        assert pos[t] == t - start
      assert (b["inputs"][row][begins[w][:-1]] == eos).all()


def test_loader_order_is_a_permutation_per_epoch(prepared):
  out, _ = prepared
  data = _loader(out, seq_len=64, batch_size=3, seed=5)
  w = data.num_train_windows
  seen = np.concatenate([data.example_indices(i)
                         for i in range(2 * w // 3 + 1)])
  first, second = seen[:w], seen[w:2 * w]
  assert sorted(first) == list(range(w))
  assert sorted(second) == list(range(w))
  assert not np.array_equal(first, second)
  other = _loader(out, seq_len=64, batch_size=3, seed=6)
  assert not np.array_equal(other.example_indices(0), data.example_indices(0))


def test_loader_resumes_at_any_index(prepared):
  """Kill and resume: a fresh loader's batches i.. equal those of a loader
  that already produced batches 0..i-1 (a pure function of the index)."""
  out, _ = prepared
  running = _loader(out, seed=2)
  before = [running.batch(i) for i in range(7)]
  after_running = [running.batch(i) for i in range(7, 12)]
  resumed = _loader(out, seed=2)
  for i, b in zip(range(7, 12), after_running):
    _assert_batches_equal(resumed.batch(i), b)
  _assert_batches_equal(resumed.batch(3), before[3])


def test_loader_process_rows_are_slices_of_the_global_batch(prepared):
  out, _ = prepared
  data = _loader(out, batch_size=8, seed=3)
  full = data.batch(5)
  for lo, hi in ((0, 4), (4, 8), (2, 6), (7, 8)):
    part = data.batch(5, rows=(lo, hi))
    _assert_batches_equal(part, {k: v[lo:hi] for k, v in full.items()})
  with pytest.raises(ValueError, match="rows"):
    data.batch(0, rows=(4, 9))


def test_loader_eval_batches_are_the_validation_windows_in_order(prepared):
  out, _ = prepared
  data = _loader(out, seq_len=16, batch_size=4)
  windows, _ = _reference_windows(out, "validation", 16)
  got = list(data.eval_batches(3))
  assert len(got) == min(3, data.num_val_batches)
  for j, b in enumerate(got):
    np.testing.assert_array_equal(b["inputs"], windows[4 * j:4 * j + 4, :-1])
  assert "segment_ids" in got[0]


def test_loader_without_packing_has_no_segments(prepared):
  out, _ = prepared
  a, b = _loader(out, packing=False), _loader(out)
  assert set(a.batch(0)) == {"inputs", "targets", "mask"}
  np.testing.assert_array_equal(a.batch(2)["inputs"], b.batch(2)["inputs"])


def test_in_memory_tokenization_equals_the_prepared_shards(prepared):
  from moejax.data import get_lm_data
  out, _ = prepared
  mem = get_lm_data("stdlib", seq_len=32, batch_size=4, seed=4,
                    max_bytes=PREP_BYTES,
                    tokenizer=str(out / "tokenizer.model"))
  disk = _loader(out, seed=4)
  assert type(mem).__name__ == "TokenData"
  for i in (0, 9):
    _assert_batches_equal(mem.batch(i), disk.batch(i))
  # bytes stays today's LMData
  assert type(get_lm_data("stdlib", seq_len=32, batch_size=4,
                          max_bytes=PREP_BYTES,
                          tokenizer="bytes")).__name__ == "LMData"


def test_loader_errors_are_one_line(prepared, trained, tmp_path):
  out, result = prepared
  with pytest.raises(DataError) as e:
    _loader(tmp_path / "nowhere")
  assert "does not exist" in str(e.value) and "moejax.data.prepare" in str(
      e.value)
  with pytest.raises(DataError, match="no manifest.json.*moejax.data.prepare"):
    _loader(tmp_path)
  with pytest.raises(DataError) as e:
    _loader(out, tokenizer=trained["sentencepiece_bpe"])  # another model
  msg = str(e.value)
  assert result.manifest["tokenizer"]["sha256"][:12] in msg
  assert tok_lib.file_sha256(trained["sentencepiece_bpe"])[:12] in msg
  assert "\n" not in msg
  _loader(out, tokenizer=str(out / "tokenizer.model"))  # the same file: fine
  with pytest.raises(DataError, match="validation split is too small"):
    _loader(out, seq_len=16, batch_size=100_000)


# ----------------------------------------------------------------------------
# The LM task: vocabulary, training on prepared shards, resume checks.


def _run_config(directory, **kw):
  from moejax.models import LMConfig
  from moejax.tasks.lm import TrainConfig
  from moejax.train import OptimConfig
  model = LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=32,
                   vocab_size=kw.pop("vocab_size", 256))
  base = dict(model=model, optim=OptimConfig(learning_rate=3e-3,
                                             warmup_steps=1, total_steps=4),
              dataset=f"tokens:{directory}", batch_size=4, seq_len=32,
              steps=4, log_every=1, eval_every=4, eval_batches=1,
              checkpoint_every=2, sample_tokens=6, progress=False,
              num_devices=1)
  base.update(kw)
  return TrainConfig(**base)


def test_model_vocabulary_follows_the_tokenizer(prepared, trained):
  out, _ = prepared
  assert _run_config(out).task().config.model.vocab_size == 512  # 400 -> 512
  assert _run_config(out, vocab_size=1000).task().config.model.vocab_size == (
      1000)  # set explicitly: kept
  with pytest.raises(ValueError, match="vocab_size=300 is smaller.*400"):
    _run_config(out, vocab_size=300).task()
  # bytes: 256 stays 256 (the main job's model is unchanged)
  cfg = _run_config(out, dataset="stdlib")
  assert cfg.task().config.model.vocab_size == 256 and not cfg.packed
  assert _run_config(out, dataset="stdlib",
                     tokenizer=trained["tokenizers_bpe"]).packed
  with pytest.raises(DataError, match="no_such.json' does not exist"):
    _run_config(out, dataset="stdlib", tokenizer="/x/no_such.json").task()


def test_compiled_batch_of_packed_runs_has_segments(prepared):
  import jax
  from moejax import aot, sharding
  out, _ = prepared
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  cfg = _run_config(out)
  want = {k: (v[0], v[1]) for k, v in
          cfg.task().data().batch_shapes().items()}
  got = {k: (v.shape, v.dtype) for k, v in
         aot.abstract_batch(cfg, mesh).items()}
  assert got == want and "segment_ids" in got
  assert "segment_ids" not in aot.abstract_batch(
      _run_config(out, packing=False), mesh)


def test_train_on_prepared_shards_and_resume_checks(prepared, tmp_path):
  import json
  from moejax.train import train
  out, result = prepared
  workdir = str(tmp_path / "run")
  first = train(_run_config(out, steps=2), workdir)
  record = json.loads((tmp_path / "run" / "data.json").read_text())
  assert record["tokenizer_sha256"] == result.manifest["tokenizer"]["sha256"]
  assert record["vocab_size"] == 512 and record["packing"]
  assert (tmp_path / "run" / "tokenizer.model").is_file()
  assert np.isfinite(first["eval_loss"])
  assert "sentencepiece" in first["sample_note"]
  assert first["sample"].startswith("def ")
  second = train(_run_config(out), workdir)
  assert second["resumed_from"] == 2 and int(second["state"].data_index) == 4
  # A changed manifest (other prepared data) refuses to resume.
  rec = json.loads((tmp_path / "run" / "data.json").read_text())
  rec["fingerprint"] = "0" * 16
  (tmp_path / "run" / "data.json").write_text(json.dumps(rec))
  with pytest.raises(DataError, match="manifest 0000000000000000"):
    train(_run_config(out, steps=6), workdir)


def test_train_lm_cli_bad_data_input_exits_2(prepared, tmp_path):
  out, result = prepared
  for args, needle in (
      (["--tokenizer=/no/such.model"], "/no/such.model' does not exist"),
      ([f"--dataset=tokens:{tmp_path}/none"], "python -m moejax.data.prepare"),
      ([f"--dataset=tokens:{out}", "--tokenizer=bytes"],
       result.manifest["tokenizer"]["sha256"][:12])):
    run = _cli(*args, f"--workdir={tmp_path}/w", "--steps=1",
               script="train_lm.py")
    assert run.returncode == 2, run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], run.stderr
