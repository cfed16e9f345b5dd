"""The README's "Training on a TPU slice" chain at a tiny size, on 8 forced CPU
devices with an fsdp x expert mesh: prepare data with a SentencePiece tokenizer
trained on a tiny corpus, the compile-only check, train, kill-and-resume (the
resumed run continues on exactly the next batch), sample from the workdir."""
import os
import random
import shutil

import jax
import numpy as np

from moejax import sample as sample_lib
from moejax.cli import lm_flags
from moejax.data import prepare as prepare_lib
from moejax.train import train
from moejax.train.metrics import read_jsonl

WORDS = ("the quick brown fox jumps over a lazy dog while def return class "
         "import self value list of tokens").split()


def _corpus(directory) -> str:
  rng = random.Random(0)
  os.makedirs(directory)
  for i in range(10):
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(30)]
    with open(os.path.join(directory, f"doc{i}.txt"), "w") as f:
      f.write("\n".join(lines))
  return os.path.join(directory, "*.txt")


def test_prepare_check_train_resume_sample_on_fsdp_x_expert(tmp_path, capsys):
  assert jax.device_count() == 8
  data = str(tmp_path / "data")
  prepare_lib.prepare(f"text:{_corpus(tmp_path / 'corpus')}", data,
                      train_tokenizer="sentencepiece_bpe", vocab_size=300,
                      val_percent=20, progress=False)
  values = {"config": "tiny", "dataset": f"tokens:{data}",
            "mesh": "fsdp:4,expert:2", "override": (
                "model.num_layers=2", "model.d_model=64", "model.d_ff=128",
                "model.moe.expert_width=64"),
            "batch_size": 8, "seq_len": 32, "steps": 4, "warmup_steps": 1,
            "log_every": 1, "eval_every": 100, "eval_batches": 1,
            "checkpoint_every": 2, "sample_tokens": 0, "progress": False}
  cfg = lm_flags.build_train_config(values)
  assert cfg.model.num_layers == 2 and cfg.mesh == "fsdp:4,expert:2"
  assert cfg.task().config.model.vocab_size == 384  # 300 padded to 128s

  # The compile-only check of this exact run on the local devices.
  assert lm_flags.compile_only(values) == 0
  report = capsys.readouterr().out
  assert "mesh data:1,fsdp:4,expert:2,model:1: fits" in report
  # The compiled step's batch has the keys of the run's packed batches.
  from moejax import aot, sharding
  batch = aot.abstract_batch(cfg, sharding.make_mesh(cfg.mesh))
  assert set(batch) == set(cfg.task().data().batch(0))
  assert {"segment_ids", "positions"} <= set(batch)

  full = train(cfg, str(tmp_path / "full"))
  # Killed after the step-2 checkpoint: a copy of the run without the later
  # one resumes from step 2 and continues on exactly the next batches.
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(str(tmp_path / "full"), resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))
  resumed = train(cfg, resumed_dir)
  assert resumed["resumed_from"] == 2
  assert full["loss_unit"] == "token"  # the CLI says nats/token, not /byte
  losses = lambda out: [(r["step"], r["loss"]) for r in
                        read_jsonl(out["metrics"]) if "loss" in r]
  assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4]
  assert losses(resumed) == losses(full)  # same batches, same losses
  assert int(resumed["state"].data_index) == int(full["state"].data_index)
  for a, b in zip(jax.tree.leaves(full["state"].params),
                  jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Sampling from the workdir uses the run's SentencePiece tokenizer.
  run = sample_lib.load_run(resumed_dir)
  assert run.step == 4 and run.tokenizer.vocab_size == 300
  text = sample_lib.sample_text(run, "the quick", 8, temperature=0.0)
  prompt = np.asarray(run.tokenizer.encode("the quick"), np.int32)
  context = np.concatenate([[run.tokenizer.eos_id], prompt]).astype(np.int32)
  want = sample_lib.sample(run.model, full["state"].params,  # EOS first, as
                           full["state"].router_state,  # packed documents
                           context[None], 8, vocab=300)
  assert want.max() < 300  # ids of the padded vocabulary are never picked
  assert text == run.tokenizer.decode(np.concatenate([prompt, want[0]]))
  assert text.startswith("the quick")
