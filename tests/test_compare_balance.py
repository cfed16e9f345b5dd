"""experiments/compare_balance.py refuses a bad `--runs` (or `--only`) before
anything trains: one line naming the flag, the value and what is allowed,
exit 2."""
import os
import subprocess
import sys

import pytest

from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "compare_balance.py")


@pytest.mark.slow
@pytest.mark.parametrize("extra, needles", [
    (["--runs=a=top_k;b=nope"], ("--runs", "router='nope'", "allowed: ",
                                 "expert_threshold")),
    (["--runs=a=top_k,lerning_rate=0.1"], ("--runs", "'lerning_rate'",
                                           "allowed: ")),
    (["--runs=a=top_k,k=two"], ("--runs", "'a=top_k,k=two'")),
    (["--runs=a=top_k,seeds=3"], ("--runs", "'seeds'")),  # the driver's own
    (["--runs=a=top_k;a=top_p"], ("--runs", "unique")),
    (["--runs=a=top_k", "--only=b"], ("--only='b'", "allowed: a")),
])
def test_bad_runs_exit_2_with_one_line(extra, needles, tmp_path):
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--mode=train", "--steps=2", "--seeds=0",
       f"--out={tmp_path / 'out'}", f"--workroot={tmp_path / 'runs'}", *extra],
      capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
      env=one_device_env())
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert all(n in lines[0] for n in needles), lines[0]
  assert not os.path.exists(tmp_path / "runs")  # nothing trained
