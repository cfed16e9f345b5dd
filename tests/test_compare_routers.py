"""experiments/compare_routers.py refuses `--runs` options that are not
training flags (a typo would otherwise run the defaults)."""
import os
import subprocess
import sys

import pytest

from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "compare_routers.py")


def _run(runs, out, *extra):
  return subprocess.run(
      [sys.executable, SCRIPT, f"--runs={runs}", f"--out={out}", "--seeds=0",
       "--aggregate_only", "--noplots", *extra],
      capture_output=True, text=True, timeout=120, cwd=str(out),
      env=one_device_env())


@pytest.mark.slow
@pytest.mark.parametrize("runs, needle", [
    ("top_k;top_p,lerning_rate=0.1", "'lerning_rate'"),
    ("dtop_p,out=/tmp/x", "'out'"),   # a flag of the script, not of a run
    ("top_p,p=high", "'top_p,p=high'"),   # the flag's parser refuses it
])
def test_bad_run_option_exits_2_with_one_line(runs, needle, tmp_path):
  proc = _run(runs, tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "results.json")


@pytest.mark.slow
def test_known_run_options_parse(tmp_path):
  proc = _run("t=top_k,learning_rate=0.1,steps=20;top_p,p=0.3", tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| t | top_k |" in proc.stdout
  assert os.path.exists(tmp_path / "results.json")
