"""The registry's pod-scale shapes (`moejax.configs`: the papers' and the
larger public ones): parameter counts from shapes, and one train step lowered
at full depth and compiled (one block deep, same widths/experts) on abstract
sharded inputs over 8 forced host devices standing in for the pod mesh."""
import importlib.util

import jax
import pytest
from jax.sharding import PartitionSpec as P

from moejax import aot, configs, sharding

CONFIGS = configs.REGISTRY
# name: (total, active) parameters the papers report (OLMoE-1B-7B for
# ProbMoE; MoD: the dense ~1.3B it routes; DeepSeekMoE 16B as published;
# Mixtral with multi-head attention: 47.5B / 13.7B, see its docstring).
PAPERS = {"paper_dtop_p": (6.9e9, 1.3e9), "paper_et": (575e6, 195e6),
          "paper_probmoe": (6.9e9, 1.3e9), "paper_mod": (1.3e9, 1.3e9),
          "deepseek_moe_16b": (16.4e9, 2.8e9),
          "mixtral_8x7b": (47.5e9, 13.7e9)}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_parameter_counts(name):
  mod = CONFIGS[name]
  count = aot.count_params(mod.config())
  total, active = PAPERS[name]
  assert abs(count.total / total - 1) < 0.03, count
  assert abs(count.active / active - 1) < 0.03, count
  assert count.routed < count.total and count.embedding < count.total
  assert sharding.parse_mesh(mod.pod_mesh, mod.pod_devices)
  for chips in (32, 256):  # the TPU slices' meshes divide the model
    assert sharding.parse_mesh(mod.tpu_mesh(chips), chips)


@pytest.mark.parametrize("name, expert_parallel",
                         [("paper_dtop_p", "gspmd"), ("paper_et", "shard_map")])
def test_paper_train_step_lowers_and_compiles_abstractly(name, expert_parallel):
  mod = CONFIGS[name]
  mesh = sharding.make_mesh(mod.test_mesh)
  full = mod.config(batch_size=8, expert_parallel=expert_parallel)
  lowered = aot.lower_train_step(full, mesh)  # every layer, nothing allocated
  assert "sharding" in lowered.as_text()[:200000]
  one_block = mod.config(batch_size=8, num_layers=1,
                         expert_parallel=expert_parallel)
  compiled = aot.lower_train_step(one_block, mesh).compile()
  hlo = compiled.as_text()
  assert "all-to-all" in hlo
  state_in = compiled.input_shardings[0][0]
  w_in = state_in.params["layers_0"]["mlp"]["experts"]["w_in"]
  assert w_in.spec == P("expert", None, "model")
  summary = aot.compiled_summary(compiled)
  assert summary.get("argument_size_in_bytes", 1) > 0


def _script(*args):
  import os
  import subprocess
  import sys
  from subprocess_env import one_device_env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
      [sys.executable, "experiments/paper_configs.py", *args], cwd=root,
      env=one_device_env(PYTHONPATH=root), capture_output=True, text=True,
      timeout=600)


def test_script_help_and_one_line_errors():
  out = _script("--help")
  assert out.returncode == 0, out.stderr
  assert "--topology" in out.stdout and "15-25 min" in out.stdout
  assert "--out  JSON output path ('' = none" in out.stdout
  for args, says in ((["--configs=nope"], "configs=nope is unknown"),
                     (["--topology=v9z-1"], "topology='v9z-1' is unknown"),
                     (["--max_tries=x"], "max_tries"),
                     (["--max_tries=0"], "max_tries=0 compiles nothing")):
    out = _script(*args)
    assert out.returncode == 2, (args, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], (args, out.stderr)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed")
def test_max_tries_counts_plans_from_first_plan():
  # paper_et on v5p-64 has 3 plans (no remat, remat, remat at half batch).
  # A mesh of the wrong size makes the one plan compiled fail at once: the
  # log names which plan the window holds.
  out = _script("--configs=paper_et", "--topology=v5p-64", "--mesh=data:3",
                "--first_plan=1", "--max_tries=1")
  assert out.returncode == 0, out.stderr
  tried = [l for l in out.stdout.splitlines() if l.startswith("compiling")]
  assert tried == ["compiling paper_et for v5p-64: plan 2/3 (remat on, 2 per "
                   "shard)..."], out.stdout
  out = _script("--configs=paper_et", "--topology=v5p-64", "--first_plan=3")
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: first_plan=3 compiles nothing: paper_et on v5p-64 has 3 plans; "
      "allowed: 0 to 2")
