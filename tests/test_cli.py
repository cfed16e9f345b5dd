"""experiments/train_lm.py: end to end, resume, and clear errors on bad input."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "train_lm.py")


def run(*args, timeout=600):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT)


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
