"""experiments/train_lm.py: end to end, resume, and clear errors on bad input."""
import os
import subprocess
import sys

import pytest

from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train_lm.py")


def run(*args, timeout=600, script=SCRIPT):
  # The checkout's moejax, as `python -m pytest` imports it here.
  env = one_device_env(PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, script, *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
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
    (["--steps=-5"], "error: steps=-5 is out of range; allowed: integer >= 1"),
    (["--k=abc"], "error: flag --k=abc: invalid literal for int()"),
    (["--bogus=1"], "error: Unknown command line flag 'bogus'"),
    (["stray"], "error: unexpected arguments: stray"),
    (["--model.num_layer=3"], "error: model.num_layer='3' is not a config "
     "field; allowed: model.num_layers"),
    (["model.num_layers=abc"], "error: model.num_layers='abc' is not an "
     "integer; allowed: integer"),
    (["--model.num_layers"], "error: --model.num_layers has no value"),
    (["--config=/nonexistent/run.yaml"], "error: config="
     "'/nonexistent/run.yaml': no such file"),
])
def test_bad_input_fails_fast_with_clear_message(args, needle, tmp_path):
  out = run(*args, "--workdir", str(tmp_path), timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert needle in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_lm.py", "train_dit.py"])
def test_help_lists_the_project_flags_by_group(script):
  out = run("--help", timeout=120,
            script=os.path.join(ROOT, "experiments", script))
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout
  titles = [line for line in text.splitlines() if line.endswith(":")
            and not line.startswith(" ")]
  for title in ("model:", "routing:", "data:", "training:", "scale-out:"):
    assert title in titles
  assert "other:" not in titles  # every flag has its group
  for flag in ("--router", "--k", "--p", "--strategy", "--steps",
               "--max_bad_steps", "--mesh", "--workdir", "--[no]progress"):
    assert f"  {flag}  " in text, flag
  if script == "train_lm.py":
    assert "--steps  Training steps (default: the config's)." in text
    assert "(default: the config's; top_k for tiny and small)" in " ".join(
        text.split())
    for size in ("--num_layers", "--d_model", "--num_heads", "--d_ff",
                 "--vocab_size", "--num_experts", "--expert_width",
                 "--override"):
      assert f"  {size}  " in text, size
    fields = text[text.index("\nconfig fields"):]
    for field in ("model: num_layers, d_model, num_heads, d_ff",
                  "model.moe: num_experts, expert_width, router", "optim: "):
      assert field in fields, field
  else:
    assert "--steps  Training steps (default: preset)." not in text
    assert "(default: 'top_k')" in text and "--override" not in text
  for absl_flag in ("--flagfile", "--verbosity", "--jax_", "--xla_"):
    assert absl_flag not in text
  lm_only = "--seq_len" in text
  assert lm_only == (script == "train_lm.py")


@pytest.mark.slow
def test_effective_routing_is_printed_first(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  out = run("--router=top_p", f"--workdir={blocker}", timeout=120)
  assert out.returncode == 2
  assert out.stdout.startswith(
      "routing: top_p k=2 p=0.4 max_k=None normalize=False\n"), out.stdout
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: workdir='{blocker}' is not a directory ('{blocker}' is a file)")


@pytest.mark.slow
def test_config_file_then_overrides_then_flags(tmp_path):
  """--config (a YAML file), then the dotted overrides, then the flat flags:
  the routing line shows all three."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  run_yaml = tmp_path / "run.yaml"
  run_yaml.write_text("model:\n  moe:\n    router: {name: dtop_p, "
                      "p_init: 0.2, pi_kp: 0.5}\n")
  out = run(f"--config={run_yaml}", "--model.moe.router.p_init=0.3",
            "model.moe.router.pi_ki=0.7", "--pi_kp=0.9", "k=3",
            f"--workdir={blocker}", timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stdout.startswith(
      "routing: dtop_p k=3 max_k=None dtop_p_scope=global pi_kp=0.9 "
      "pi_ki=0.7 p_init=0.3 "), out.stdout


def test_split_overrides_leaves_flags_and_their_values():
  from absl import flags

  from moejax.cli import app, lm_flags
  if "override" not in flags.FLAGS:
    lm_flags.define_flags()
  argv = ["prog", "--workdir", "a=b", "steps=5", "--model.d_ff=64",
          "optim.b2=0.9", "--noprogress", "--seed=1", "--", "c=d"]
  assert app.split_overrides(argv) == [
      "prog", "--workdir", "a=b", "--steps=5", "--override=model.d_ff=64",
      "--override=optim.b2=0.9", "--noprogress", "--seed=1", "--", "c=d"]


@pytest.mark.slow
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
  from moejax.tasks.lm import TrainConfig

  values = _flag_defaults(dit_flags.define_flags)
  tables = {**lm_flags.MOE_FLAGS, **lm_flags.LM_MODEL_FLAGS,
            **lm_flags.RUN_FLAGS, **dit_flags.DIT_FLAGS}
  for name in tables:
    assert values[name] is None, name  # falls through to the dataclass
  # The documented default dispatch strategy is the one a run gets.
  assert MoEConfig().strategy == "auto"
  lm = lm_flags.build_train_config(values)
  assert lm.model.moe.strategy == "auto"
  assert "(default: auto)" in flags.FLAGS["strategy"].help
  objects = {MoEConfig: lm.model.moe, LMConfig: lm.model, TrainConfig: lm}
  for name, (_, cls, _) in {**lm_flags.MOE_FLAGS, **lm_flags.LM_MODEL_FLAGS,
                            **lm_flags.RUN_FLAGS}.items():
    assert getattr(objects[cls], name) == defaults.field_default(cls, name), (
        name)
  dit = dit_flags.build_dit_train_config(values)
  assert dit.model.moe.strategy == "auto"
  objects = {DiTConfig: dit.model, DiffusionConfig: dit.diffusion,
             DiTTrainConfig: dit}
  for name, (_, cls, _) in dit_flags.DIT_FLAGS.items():
    assert getattr(objects[cls], name) == defaults.field_default(cls, name), (
        name)
  dit_fields = {f.name for f in dataclasses.fields(DiTTrainConfig)} | set(
      DiTTrainConfig.ALIASES) - {"grad_accum"}  # the loop's, but grad_accum
  for name in lm_flags.RUN_FLAGS:
    if name in dit_fields:
      assert getattr(dit, name) == defaults.field_default(DiTTrainConfig,
                                                          name), name
  assert dit.dataset == "digits" and lm.dataset == "stdlib"
  # A flag that is set wins over the dataclass.
  assert lm_flags.build_train_config(
      dict(values, strategy="index")).model.moe.strategy == "index"
