"""experiments/train_lm.py: end to end, resume, and clear errors on bad input."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train_lm.py")


def run(*args, timeout=600):
  # The checkout's moejax, as `python -m pytest` imports it here.
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("args,needle", [
    (["--k=9"], "k=9 is larger than num_experts=8"),
    (["--p=1.5"], "p=1.5 is out of range; allowed: (0, 1]"),
    (["--capacity_factor=0"], "capacity_factor=0.0 is out of range"),
    (["--mesh=data:3"], "--mesh='data:3' uses 3 devices"),
    (["--mesh=batch:8"], "mesh axis 'batch'"),
    (["--router=bogus"], "router='bogus' is unknown"),
    (["--config=huge"], "config='huge' is unknown"),
    (["--strategy=magic"], "strategy='magic' is not supported"),
    (["--dataset=tfds:no_such_set", "--data_dir=/nonexistent"],
     "no_such_set"),
    (["--dataset=text:/nonexistent/*.txt"], "/nonexistent/*.txt"),
    (["--steps=0"], "steps=0 is out of range"),
])
def test_bad_input_fails_fast_with_clear_message(args, needle, tmp_path):
  out = run(*args, "--workdir", str(tmp_path), timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert needle in out.stderr
  assert "Traceback" not in out.stderr


def test_train_and_resume(tmp_path):
  common = ["--config=tiny", "--batch_size=8", "--seq_len=32",
            "--checkpoint_every=2", "--log_every=1", "--eval_batches=1",
            "--sample_tokens=8", "--noprogress", f"--workdir={tmp_path}"]
  first = run(*common, "--steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "validation loss:" in first.stdout
  assert "sample:" in first.stdout
  assert os.path.exists(tmp_path / "metrics.jsonl")
  assert os.path.exists(tmp_path / "run.png")
  second = run(*common, "--steps=4")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 2" in second.stdout


def _flag_defaults(define):
  """{name: default} of every flag after `define()` (process-wide absl
  flags; their defaults are restored afterwards)."""
  from absl import flags
  before = {name: flags.FLAGS[name].default for name in flags.FLAGS}
  try:
    define()
    return {name: flags.FLAGS[name].default for name in flags.FLAGS}
  finally:
    for name, default in before.items():
      flags.FLAGS.set_default(name, default)


def test_unset_flags_take_the_dataclass_defaults():
  import dataclasses

  from absl import flags

  from moejax.cli import defaults, dit_flags, lm_flags
  from moejax.diffusion import DiffusionConfig
  from moejax.models.dit import DiTConfig
  from moejax.models.lm import LMConfig
  from moejax.nn.moe import MoEConfig
  from moejax.tasks.dit import DiTTrainConfig
  from moejax.train import TrainConfig

  values = _flag_defaults(dit_flags.define_flags)
  tables = {**lm_flags.MOE_FLAGS, **lm_flags.LM_MODEL_FLAGS,
            **lm_flags.RUN_FLAGS, **dit_flags.DIT_FLAGS}
  for name in tables:
    assert values[name] is None, name  # falls through to the dataclass
  # The documented default dispatch strategy is the one a run gets.
  assert MoEConfig().strategy == "gather"
  lm = lm_flags.build_train_config(values)
  assert lm.model.moe.strategy == "gather"
  assert "(default: gather)" in flags.FLAGS["strategy"].help
  objects = {MoEConfig: lm.model.moe, LMConfig: lm.model, TrainConfig: lm}
  for name, (_, cls, _) in {**lm_flags.MOE_FLAGS, **lm_flags.LM_MODEL_FLAGS,
                            **lm_flags.RUN_FLAGS}.items():
    assert getattr(objects[cls], name) == defaults.field_default(cls, name), (
        name)
  dit = dit_flags.build_dit_train_config(values)
  assert dit.model.moe.strategy == "gather"
  objects = {DiTConfig: dit.model, DiffusionConfig: dit.diffusion,
             DiTTrainConfig: dit}
  for name, (_, cls, _) in dit_flags.DIT_FLAGS.items():
    assert getattr(objects[cls], name) == defaults.field_default(cls, name), (
        name)
  dit_fields = {f.name for f in dataclasses.fields(DiTTrainConfig)}
  for name in lm_flags.RUN_FLAGS:
    if name in dit_fields:
      assert getattr(dit, name) == defaults.field_default(DiTTrainConfig,
                                                          name), name
  assert dit.dataset == "digits" and lm.dataset == "stdlib"
  # A flag that is set wins over the dataclass.
  assert lm_flags.build_train_config(
      dict(values, strategy="index")).model.moe.strategy == "index"
