"""Robust training: non-finite steps are skipped and counted, a run stops
after too many in a row, an unreadable checkpoint falls back to the newest
readable one (bit-exactly), and a bad workdir is one line."""
import dataclasses
import glob
import os
import re
import shutil

import jax
import numpy as np
import pytest

from moejax.routing import LossFreeTopK, TopK
from moejax.tasks.lm import LMTask
from moejax.train import loop
from moejax.train.checkpoint import CheckpointError, Checkpointer
from moejax.train.metrics import read_jsonl
from test_train import params_equal, tiny_config


def loss_free_config(**kw):
  cfg = tiny_config(**kw)
  moe = dataclasses.replace(cfg.model.moe,
                            router=LossFreeTopK(k=2))
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                            moe=moe))


class PoisonedData:
  """The task's data with NaN loss masks at the given batch indices."""

  def __init__(self, data, bad):
    self.data, self.bad = data, bad

  def batch(self, i):
    batch = dict(self.data.batch(i))
    if self.bad(i):
      batch["mask"] = np.full_like(batch["mask"], np.nan)
    return batch

  def eval_batches(self, n):
    return self.data.eval_batches(n)


class PoisonedTask(LMTask):

  def __init__(self, config, bad):
    super().__init__(config)
    self.bad = bad

  def data(self):
    return PoisonedData(super().data(), self.bad)


def test_nonfinite_step_changes_only_step_and_data_index():
  cfg = loss_free_config()
  task = cfg.task()
  model = task.build_model()
  init = jax.jit(lambda rng: loop.init_state(cfg, model, rng))
  state = loop.nn.meta.unbox(init(jax.random.PRNGKey(0)))
  step = loop.make_step(cfg, model, donate=False)
  data = PoisonedData(task.data(), lambda i: i == 1)
  s1, m1 = step(state, data.batch(0))
  s2, m2 = step(s1, data.batch(1))
  s3, m3 = step(s2, data.batch(2))
  assert float(m1["skipped"]) == 0 and float(m3["skipped"]) == 0
  assert float(m2["skipped"]) == 1 and float(m2["nonfinite_loss"]) == 1
  assert params_equal(s1.params, s2.params)
  assert params_equal(s1.opt_state, s2.opt_state)
  assert jax.tree.leaves(s1.router_state)  # the loss-free bias
  assert params_equal(s1.router_state, s2.router_state)
  assert int(s2.step) == 2 and int(s2.data_index) == 2
  assert not params_equal(s2.params, s3.params)
  assert not params_equal(s2.router_state, s3.router_state)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(s3.params))
  assert step._cache_size() == 1


def test_loop_counts_skipped_steps_and_logs_routing(tmp_path, capsys):
  cfg = tiny_config(max_bad_steps=2, steps=12, sample_tokens=0, progress=True)
  out = loop.train(PoisonedTask(cfg, lambda i: i in (2, 5)), str(tmp_path))
  # The expected duration, from steps 2..11, after step 11.
  captured = capsys.readouterr()
  assert re.fullmatch(r"about \d+\.\d min remaining: training \d+\.\d, 1 "
                      r"evaluation \d+\.\d \(\d+\.\d\d s/step\)\n",
                      captured.out)
  # Progress into a file (not a terminal): a plain line per logged step.
  assert "\r" not in captured.err
  lines = [l for l in captured.err.splitlines() if l.startswith("train: step")]
  assert [l.split()[2] for l in lines] == [f"{i}/12" for i in range(1, 13)]
  records = read_jsonl(out["metrics"])
  assert records[0] == {"step": 0, "routing": {
      "router": "top_k", "k": 2, "normalize": True, "random_second": False,
      "balance": "aux", "score_fn": "softmax"}}
  steps = [r for r in records if "loss" in r]
  assert [r["skipped"] for r in steps] == [0, 0, 1, 0, 0, 1] + [0] * 6
  assert steps[-1]["skipped_steps"] == 2 and out["skipped_steps"] == 2
  assert np.isfinite(out["eval_loss"])


def test_loop_stops_after_max_bad_steps_keeping_last_good_checkpoint(
    tmp_path):
  cfg = tiny_config(max_bad_steps=2, checkpoint_every=2)
  with pytest.raises(loop.TrainingStopped) as e:
    loop.train(PoisonedTask(cfg, lambda i: i >= 4), str(tmp_path))
  assert str(e.value) == (
      "stopped at step 6: 2 consecutive steps had a non-finite loss, "
      "gradient or update (max_bad_steps=2); the last checkpoint is step 4")
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2, 4]
  assert read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]["stopped"]


def damage(checkpoint_dir, how):
  if how == "truncate":
    for path in glob.glob(os.path.join(checkpoint_dir, "default", "d", "*")):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(os.path.join(checkpoint_dir, "default", "_METADATA"))


@pytest.mark.parametrize("how", ["truncate", "metadata"])
def test_resume_falls_back_to_newest_readable_checkpoint(tmp_path, how,
                                                         capsys):
  cfg = tiny_config(checkpoint_every=2, sample_tokens=0)
  full = loop.train(cfg, str(tmp_path / "full"))
  work = tmp_path / "resumed"
  loop.train(dataclasses.replace(cfg, steps=6), str(work))
  damage(str(work / "checkpoints" / "6"), how)
  capsys.readouterr()
  resumed = loop.train(cfg, str(work))
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "warning: checkpoint at step 6 is unreadable ("), err
  assert err[0].endswith("; resuming from step 4")
  if how == "metadata":
    assert "default/_METADATA is missing" in err[0]
  assert resumed["resumed_from"] == 4
  assert os.path.isdir(work / "checkpoints.unreadable" / "6")
  assert params_equal(full["state"].params, resumed["state"].params)
  assert params_equal(full["state"].opt_state, resumed["state"].opt_state)
  assert resumed["eval_loss"] == full["eval_loss"]
  a = [r["loss"] for r in read_jsonl(full["metrics"]) if "loss" in r]
  b = [r["loss"] for r in read_jsonl(resumed["metrics"]) if "loss" in r]
  np.testing.assert_array_equal(a, b)
  assert Checkpointer(str(work / "checkpoints")).all_steps() == [4, 6, 8]


def test_no_readable_checkpoint_is_an_error(tmp_path):
  cfg = tiny_config(steps=2, checkpoint_every=2, sample_tokens=0)
  loop.train(cfg, str(tmp_path))
  damage(str(tmp_path / "checkpoints" / "2"), "metadata")
  with pytest.raises(CheckpointError, match="step 2: FileNotFoundError"):
    loop.train(cfg, str(tmp_path))
  assert os.path.isdir(tmp_path / "checkpoints" / "2")  # left where it was


@pytest.mark.parametrize("below", [False, True])
def test_workdir_that_is_a_file(tmp_path, below):
  path = tmp_path / "file"
  path.write_text("")
  workdir = str(path / "run" if below else path)
  with pytest.raises(ValueError, match=f"workdir='{workdir}' is not a "
                     "directory"):
    loop.train(tiny_config(), workdir)


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay",
                                   "clip_norm", "b1", "b2", "min_lr_ratio"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_optim_config_refuses_nonfinite(field, value):
  from moejax.train.state import OptimConfig
  with pytest.raises(ValueError, match=f"^{field}={value} "):
    OptimConfig(**{field: value})


def test_step_with_nonfinite_update_is_skipped():
  """Finite loss and gradient, but the update (here an infinite learning
  rate, which OptimConfig refuses) makes the params non-finite: skipped."""
  import optax
  from moejax.train.step import make_train_step
  cfg = tiny_config()
  task = cfg.task()
  model = task.build_model()
  state = loop.nn.meta.unbox(jax.jit(lambda rng: loop.init_state(
      cfg, model, rng))(jax.random.PRNGKey(0)))
  opt = optax.sgd(float("inf"))
  state = state.replace(opt_state=opt.init(state.params))
  step = make_train_step(model, opt, task.method, donate=False,
                         loss_fn=task.loss_fn(model))
  new, metrics = step(state, task.data().batch(0))
  assert np.isfinite(float(metrics["loss"]))
  assert np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["skipped"]) == 1.0
  assert float(metrics["nonfinite_update"]) == 1.0
  assert float(metrics["nonfinite_loss"]) == 0.0
  assert params_equal(new.params, state.params)
  assert int(new.step) == 1


def test_mesh_larger_than_the_devices_names_the_cpu_flag():
  from moejax import sharding
  with pytest.raises(ValueError, match=r"uses 3 devices but 1 are available.*"
                     r"XLA_FLAGS=--xla_force_host_platform_device_count=3"):
    sharding.parse_mesh("data:3", 1)


def test_workdir_that_cannot_be_created_names_the_flag():
  with pytest.raises(ValueError, match=r"^workdir='/proc/nope' cannot be "
                     r"created \(.*\); allowed: a writable directory$"):
    loop.train(tiny_config(), "/proc/nope")


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_temperature_checked_before_training(value):
  with pytest.raises(ValueError, match=f"^temperature={value} is out of "
                     "range; allowed: finite >= 0"):
    tiny_config(temperature=value)



def test_workdir_of_another_configuration_is_one_clear_error(tmp_path):
  cfg = tiny_config(steps=2, checkpoint_every=2, sample_tokens=0)
  loop.train(cfg, str(tmp_path))
  other = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, moe=dataclasses.replace(cfg.model.moe, num_experts=8)))
  with pytest.raises(ValueError, match=(
      r"^workdir='.*' holds a run of another configuration \(stored -> new: "
      r"model\.moe\.num_experts: 4 -> 8\); its checkpoints do not fit this "
      r"run: use a new --workdir")):
    loop.train(other, str(tmp_path))
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]
  assert not os.path.exists(tmp_path / "checkpoints.unreadable")


def test_resume_with_more_steps_keeps_the_learning_rate_schedule(tmp_path,
                                                                  capsys):
  """The schedule depends on optim.total_steps (the CLI's --steps sets it): a
  resume keeps the stored one, says so in one line, and trains the steps
  past its end at its final rate."""
  from moejax.train.state import OptimConfig

  def run(steps):
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=steps)
    cfg = tiny_config(steps=steps, optim=optim, checkpoint_every=2,
                      eval_every=100, sample_tokens=0)
    out = loop.train(cfg, str(tmp_path))
    return out, {r["step"]: r["learning_rate"]
                 for r in read_jsonl(out["metrics"]) if "loss" in r}

  _, first = run(6)
  # Killed before step 6's checkpoint, resumed with a larger --steps.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  capsys.readouterr()
  out, second = run(8)
  assert out["resumed_from"] == 4
  assert ("note: resuming from step 4 on the stored learning-rate schedule "
          "and optimizer (optim.total_steps: stored 6, given 8); steps after "
          "6 train at its final learning rate 0.0003; a new --workdir starts "
          "another\n") in capsys.readouterr().out
  assert [second[s] for s in (1, 2, 3, 4, 5, 6)] == [
      first[s] for s in (1, 2, 3, 4, 5, 6)]
  assert second[7] == second[8] == pytest.approx(3e-4)
  assert loop.config_file.load(str(tmp_path)).optim.total_steps == 6
  # Fewer steps than the newest checkpoint's: nothing to train, refused.
  with pytest.raises(ValueError, match=(
      r"^steps=6 is below the step of the newest checkpoint in workdir='.*' "
      r"\(8\); allowed: >= 8, or a new --workdir$")):
    run(6)


def test_duration_estimate_counts_evaluations_and_samples(monkeypatch):
  """After step 11 of 71: the training steps, the 4 evaluations still to come
  (one batch timed after compiling it) and the sample (LMTask: its programs
  compile in about the train step's time; a token costs a sequence's share
  of an evaluation batch)."""
  clock = [0.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
  costs = iter([10.0, 2.0])  # the first evaluation compiles

  def evaluate():
    clock[0] += next(costs)

  task = LMTask(tiny_config(steps=71, eval_every=20, eval_batches=3,
                            sample_tokens=160, batch_size=16))
  # training 60 s; evaluations 4 x 3 x 2 s = 24 s; samples 16 (the train
  # step's compilation) + 160 x 2 / 16 = 36 s.
  assert loop._remaining(task, 1.0, 11, evaluate, 16.0) == (
      "about 2.0 min remaining: training 1.0, 4 evaluations 0.4, samples 0.6 "
      "(1.00 s/step)")
  # DiT: the sampler compiles once and runs sample_steps passes over the
  # samples (here 2 classes x 96 images = 3 batches of 64).
  from moejax.tasks.dit import DiTTrainConfig
  dit = DiTTrainConfig(sample_classes=(0, 1), samples_per_class=96,
                       quality_samples_per_class=0, batch_size=64).task()
  assert dit.output_seconds(0.5, 3.0) == pytest.approx(3.0 + 50 * 3 * 0.5)
  assert LMTask(tiny_config(sample_tokens=0)).output_seconds(0.5, 3.0) == 0
