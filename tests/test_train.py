"""Training end to end: loss falls, resume is exact, 8 devices match 1."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from moejax.routing import TopK
from moejax.models import LMConfig
from moejax.nn import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train import OptimConfig, train
from moejax.train.metrics import read_jsonl, routing_series


def tiny_config(**kw) -> TrainConfig:
  model = LMConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=32,
                   moe=MoEConfig(num_experts=4, expert_width=32,
                                 router=TopK(k=2)))
  base = dict(model=model, optim=OptimConfig(learning_rate=3e-3, warmup_steps=2,
                                             total_steps=8),
              batch_size=8, seq_len=32, steps=8, log_every=1, eval_every=4,
              eval_batches=2, checkpoint_every=4, sample_tokens=8,
              progress=False, num_devices=1)
  base.update(kw)
  return TrainConfig(**base)


def params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_resume_is_exact(tmp_path):
  full = train(tiny_config(), str(tmp_path / "full"))
  part = tiny_config(steps=4)
  first = train(part, str(tmp_path / "resumed"))
  assert first["resumed_from"] is None
  second = train(tiny_config(), str(tmp_path / "resumed"))
  assert second["resumed_from"] == 4
  assert params_equal(full["state"].params, second["state"].params)
  assert params_equal(full["state"].opt_state, second["state"].opt_state)
  assert int(second["state"].data_index) == 8
  assert second["eval_loss"] == full["eval_loss"]
  # The resumed log has each step once and the same losses.
  a = [r for r in read_jsonl(full["metrics"]) if "loss" in r]
  b = [r for r in read_jsonl(second["metrics"]) if "loss" in r]
  assert [r["step"] for r in b] == list(range(1, 9))
  np.testing.assert_array_equal([r["loss"] for r in a], [r["loss"] for r in b])


def test_train_outputs_and_learning(tmp_path):
  cfg = tiny_config(steps=30, optim=OptimConfig(learning_rate=1e-2,
                                                warmup_steps=5, total_steps=30),
                    eval_every=10, checkpoint_every=10, keep_checkpoints=2)
  out = train(cfg, str(tmp_path))
  records = read_jsonl(out["metrics"])
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses[-1] < losses[0] - 1.0
  final = records[-1]
  assert final["final"] and "eval_loss" in final
  assert all("experts_per_token" in r for r in records if "loss" in r)
  assert os.path.exists(out["plot"])
  steps = sorted(int(d) for d in os.listdir(out["checkpoints"]) if d.isdigit())
  assert steps == [20, 30]  # keep-last-2
  assert isinstance(out["sample"], str) and len(out["sample"]) > 4
  # Sampled (not greedy) by default, and the output says from what model.
  assert cfg.temperature > 0
  assert "temperature 0.8" in out["sample_note"]
  assert "M-parameter" in out["sample_note"] and "after 30 steps" in out[
      "sample_note"]
  # run.png's routing panels show what varies for a fixed-k router.
  series = routing_series(records)
  assert {"mean fanout", "kept per token", "drop fraction",
          "MaxVio"} <= set(series)


def test_routing_series_shows_what_varies():
  # Fixed top-2: the mean fanout is flat; drops, kept experts and MaxVio vary.
  records = [{"step": i, "loss": 1.0, "experts_per_token": 2.0,
              "kept_per_token": 2.0 - 0.1 * i, "drop_fraction": 0.05 * i,
              "max_vio": 1.0 / (i + 1), "layer_fanout": [2.0, 2.0]}
             for i in range(4)] + [{"step": 4, "eval_loss": 1.0}]
  series = routing_series(records)
  assert set(series) == {"mean fanout", "kept per token", "drop fraction",
                         "MaxVio"}  # flat per-layer fanout is left out
  steps, drops = series["drop fraction"]
  assert steps == [0, 1, 2, 3]
  np.testing.assert_allclose(drops, [0.0, 0.05, 0.1, 0.15])
  for r in records[:4]:
    r["layer_fanout"] = [1.0 + r["step"], 3.0 - r["step"]]  # variable fanout
  series = routing_series(records)
  assert series["layer 1 fanout"][1] == [3.0, 2.0, 1.0, 0.0]


def test_eight_devices_match_one(tmp_path):
  assert len(jax.devices()) == 8
  one = train(tiny_config(steps=3, sample_tokens=0), str(tmp_path / "one"))
  eight = train(tiny_config(steps=3, sample_tokens=0, num_devices=None),
                str(tmp_path / "eight"))
  la = [r["loss"] for r in read_jsonl(one["metrics"]) if "loss" in r]
  lb = [r["loss"] for r in read_jsonl(eight["metrics"]) if "loss" in r]
  np.testing.assert_allclose(la, lb, rtol=2e-5)
  sharding = eight["state"].params["layers_0"]["mlp"]["experts"]["w_in"].sharding
  assert len(sharding.device_set) == 8


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(steps=-1), "steps=-1"),
    (dict(seq_len=64), "seq_len=64"),
])
def test_train_config_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    tiny_config(**kw)


def test_run_configs_embed_one_loop_config_with_their_own_defaults():
  from moejax.tasks.dit import DiTTrainConfig, dit_loop
  from moejax.train import LoopConfig
  # The loop's fields are declared once; each task keeps its own defaults.
  assert TrainConfig().loop == LoopConfig()
  assert DiTTrainConfig().loop == dit_loop() != LoopConfig()
  assert (DiTTrainConfig().batch_size, DiTTrainConfig().optim.weight_decay,
          TrainConfig().batch_size, TrainConfig().optim.weight_decay) == (
              64, 0.0, 16, 0.1)
  assert not {f.name for f in dataclasses.fields(TrainConfig)} & {
      f.name for f in dataclasses.fields(LoopConfig)}
  # Flat keywords and attributes are aliases of the loop's fields.
  cfg = TrainConfig(steps=5, batch_size=4)
  assert cfg.loop == LoopConfig(steps=5, batch_size=4) and cfg.steps == 5
  assert dataclasses.replace(cfg, seed=3).loop == LoopConfig(
      steps=5, batch_size=4, seed=3)
  assert TrainConfig(loop=LoopConfig(steps=3), seed=2).loop == LoopConfig(
      steps=3, seed=2)
  assert DiTTrainConfig(steps=7).loop == dataclasses.replace(dit_loop(),
                                                             steps=7)
  with pytest.raises(AttributeError):
    cfg.steps = 6
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by "
                     "grad_accum=4"):
    TrainConfig(batch_size=6, grad_accum=4)


def test_bad_mesh_and_batch(tmp_path):
  with pytest.raises(ValueError, match="mesh"):
    train(tiny_config(mesh="data:3", num_devices=None), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="batch_size=6"):
    train(tiny_config(batch_size=6, num_devices=None), str(tmp_path / "b"))
