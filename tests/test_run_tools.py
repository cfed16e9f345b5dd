"""Running at scale: throughput and MFU in the log records, TensorBoard event
files, profiler traces (`moejax.train.loop`, `moejax.train.metrics`), and the
one peak-FLOP/s table (`moejax.flops`) that `moejax.aot` shares."""
import glob
import json
import os
import sys

import numpy as np
import pytest

from moejax import aot
from moejax import flops as flops_lib
from moejax.tasks.lm import TrainConfig
from moejax.train import OptimConfig, loop, train
from moejax.train import metrics as metrics_lib
from moejax.train.metrics import read_jsonl

import test_train


def tiny_config(**kw) -> TrainConfig:
  """test_train's tiny run, 4 steps, no sample."""
  base = dict(optim=OptimConfig(learning_rate=3e-3, warmup_steps=2,
                                total_steps=4),
              steps=4, eval_every=2, eval_batches=1, sample_tokens=0)
  return test_train.tiny_config(**{**base, **kw})


def test_peak_flops_one_table_by_device_kind():
  assert flops_lib.peak_flops("TPU v5 lite") == 197e12
  assert flops_lib.peak_flops("TPU v5") == 459e12
  assert flops_lib.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops_lib.peak_flops("NVIDIA H100 PCIe") == 756e12  # longest prefix
  assert flops_lib.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops_lib.peak_flops("cpu") is None
  assert flops_lib.peak_flops("NVIDIA H1000") is None
  assert flops_lib.peak_flops(None) is None
  for chip, kind in (("v5e", "TPU v5 lite"), ("v5p", "TPU v5"),
                     ("v6e", "TPU v6 lite")):
    assert aot.CHIPS[chip].peak_flops == flops_lib.PEAK_FLOPS[kind]


@pytest.mark.parametrize("spec", ["3:1", "0:2", "2", "a:b", "1:2:3", ":"])
def test_bad_profile_steps_name_the_flag(spec):
  with pytest.raises(ValueError, match="profile_steps=.*allowed: A:B"):
    loop.parse_profile_steps(spec)


def test_throughput_mfu_tensorboard_and_profile(tmp_path, monkeypatch):
  from tensorboard.backend.event_processing.event_accumulator import (
      EventAccumulator)
  peak = 1e12  # a made-up peak for the CPU: MFU is logged where it is known
  monkeypatch.setattr(flops_lib, "peak_flops", lambda kind: peak)
  cfg = tiny_config()
  out = train(cfg, str(tmp_path), profile_steps="2:3")
  records = read_jsonl(out["metrics"])
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4]
  # The first step's record has no window (its compilation is left out).
  assert "tokens_per_s_per_device" not in steps[0]
  flops_per_token = flops_lib.train_flops(cfg.model, 8, 32) / (8 * 32)
  for r in steps[1:]:
    rate = r["tokens_per_s_per_device"]
    assert rate > 0
    np.testing.assert_allclose(r["mfu"], rate * flops_per_token / peak,
                               rtol=1e-9)
  # The same records as TensorBoard scalars, read back from the event file.
  acc = EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  assert {"train/loss", "train/learning_rate", "train/experts_per_token",
          "train/tokens_per_s_per_device", "train/mfu", "eval/eval_loss",
          "train/layer_fanout/1"} <= tags
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2, 3, 4]
  np.testing.assert_allclose([e.value for e in loss],
                             [r["loss"] for r in steps], rtol=1e-6)
  evals = acc.Scalars("eval/eval_loss")
  assert [e.step for e in evals] == [2, 4]
  np.testing.assert_allclose(evals[-1].value, out["eval_loss"], rtol=1e-6)
  # The profiler trace of steps 2..3.
  assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" /
                       "*.xplane.pb"))


def test_no_tensorboardx_warns_once_and_logs_json(tmp_path, monkeypatch,
                                                  capsys):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not importable
  monkeypatch.setattr(metrics_lib, "_WARNED_NO_TENSORBOARD", False)
  for name in ("a", "b"):
    writer = metrics_lib.MetricsWriter(str(tmp_path / name / "m.jsonl"),
                                       str(tmp_path / name / "tb"))
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert read_jsonl(str(tmp_path / name / "m.jsonl")) == [
        {"step": 1, "loss": 2.0}]
    assert not os.path.exists(tmp_path / name / "tb")
  assert capsys.readouterr().err.count("tensorboardX is not installed") == 1


def test_scalars_of_a_record():
  assert metrics_lib.scalars({
      "step": 3, "loss": np.float32(1.5), "layer_fanout": [1.0, 2.0],
      "final": True, "routing": {"router": "top_k"}, "note": "x"}) == {
          "train/loss": 1.5, "train/layer_fanout/0": 1.0,
          "train/layer_fanout/1": 2.0}
  assert metrics_lib.scalars({"step": 4, "eval_loss": 2.0}) == {
      "eval/eval_loss": 2.0}


def test_config_file_round_trips_lm_and_dit_configs(tmp_path):
  from moejax.cli import lm_flags
  from moejax.tasks.dit import DiTTrainConfig
  from moejax.train import config_file
  for cfg in (tiny_config(), lm_flags.build_train_config(
      {"config": "tiny", "router": "dtop_p", "mesh": "data:2,expert:4"}),
              DiTTrainConfig()):
    config_file.save(cfg, str(tmp_path))
    assert config_file.load(str(tmp_path)) == cfg
  assert config_file.changes(tiny_config(), tiny_config(steps=8, seed=1)) == [
      "loop.steps: 4 -> 8", "loop.seed: 0 -> 1"]
  (tmp_path / "config.json").write_text('{"__type__": "os.system"}')
  with pytest.raises(ValueError, match="is not a moejax config"):
    config_file.load(str(tmp_path))


def _old_format(value):
  """A config.json value as written before the loop's settings had their own
  `LoopConfig`: the loop's fields flat in the run config."""
  if isinstance(value, dict):
    value = {k: _old_format(v) for k, v in value.items()}
    loop = value.pop("loop", None)
    if isinstance(loop, dict):
      value.update({k: v for k, v in loop.items() if k != "__type__"})
  return value


def test_a_config_json_of_the_old_format_loads_and_resumes(tmp_path, capsys):
  from moejax.train import config_file
  workdir = str(tmp_path)
  assert train(tiny_config(steps=2), workdir)["resumed_from"] is None
  with open(config_file.path(workdir)) as f:
    stored = json.load(f)
  assert stored["loop"]["steps"] == 2 and "steps" not in stored
  old = _old_format(stored)
  assert old["steps"] == 2 and "loop" not in old
  assert old["optim"]["__type__"] == "moejax.train.state.OptimConfig"
  with open(config_file.path(workdir), "w") as f:
    json.dump(old, f)
  assert config_file.load(workdir) == tiny_config(steps=2)
  capsys.readouterr()
  resumed = train(tiny_config(), workdir)
  assert resumed["resumed_from"] == 2 and int(resumed["state"].step) == 4
  notes = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith("note:")]
  assert notes == ["note: resuming from step 2 with a changed configuration: "
                   "loop.steps: 2 -> 4"]
  with open(config_file.path(workdir)) as f:
    assert json.load(f)["loop"]["steps"] == 4  # rewritten in the new form


def test_a_config_json_with_flat_mod_fields_loads():
  """A model config written when the MoD settings were flat LMConfig fields
  (mod_capacity, 0 = no MoD, mod_score, ...) loads as its nested `mod`."""
  import dataclasses
  from moejax.nn.mod import MoDConfig
  from moejax.train import config_file
  base = tiny_config()
  mod = MoDConfig(capacity=0.25, score="sigmoid", causal="router")
  cfg = dataclasses.replace(base, model=dataclasses.replace(base.model,
                                                            mod=mod))
  old = _old_format(config_file.to_dict(cfg))
  del old["model"]["mod"]
  old["model"].update(mod_capacity=0.25, mod_score="sigmoid",
                      mod_aux_weight=0.01, mod_predictor_weight=1.0,
                      mod_causal="router")
  assert config_file.from_dict(old) == cfg
  old["model"]["mod_capacity"] = 0.0  # no MoD: the other fields are unused
  assert config_file.from_dict(old) == base
  old["model"]["mod_scores"] = "raw"
  with pytest.raises(ValueError, match="LMConfig has no field 'mod_scores'"):
    config_file.from_dict(old)


def test_sample_from_a_workdir_equals_the_in_memory_state(tmp_path, capsys):
  import jax
  from moejax import sample as sample_lib
  from moejax.train import config_file
  cfg = tiny_config(checkpoint_every=2)
  out = train(cfg, str(tmp_path))
  assert config_file.load(str(tmp_path)) == cfg
  saved = sample_lib.load_run(str(tmp_path))
  assert saved.step == 4 and saved.config == cfg
  assert out["loss_unit"] == "byte"
  text = sample_lib.sample_text(saved, "def f", 12, temperature=0.8, seed=3)
  state = out["state"]
  want = sample_lib.sample(
      saved.model, state.params, state.router_state,
      np.frombuffer(b"def f", np.uint8).astype(np.int32)[None], 12,
      temperature=0.8, rng=jax.random.PRNGKey(3))
  assert text == (b"def f" + bytes(want[0].astype(np.uint8).tolist())).decode(
      "utf-8", errors="replace")
  # Only ids below `vocab` (a tokenizer smaller than the padded vocabulary).
  low = sample_lib.sample(saved.model, state.params, state.router_state,
                          np.array([[100, 101]], np.int32), 6,
                          temperature=2.0, vocab=7)
  assert low.shape == (1, 6) and low.max() < 7
  # An older checkpoint by step; a missing one is named.
  assert sample_lib.load_run(str(tmp_path), step=2).step == 2
  with pytest.raises(ValueError, match="step=3 has no checkpoint"):
    sample_lib.load_run(str(tmp_path), step=3)
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    sample_lib.load_run(str(tmp_path / "nothing"))
  # A resume with another config says what changed; it keeps the stored
  # learning-rate schedule.
  capsys.readouterr()
  train(tiny_config(checkpoint_every=2, steps=5,
                    optim=OptimConfig(learning_rate=3e-3, warmup_steps=2,
                                      total_steps=5)), str(tmp_path))
  out = capsys.readouterr().out
  assert "with a changed configuration: loop.steps: 4 -> 5\n" in out
  assert "(optim.total_steps: stored 4, given 5)" in out
