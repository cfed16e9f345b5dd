"""The prepared accelerator check runs end to end in its dry-run mode (tiny
sizes on the CPU) and writes its JSON and markdown with every expected row."""
import json
import os
import subprocess
import sys

import pytest

from moejax.experiment import load_module
from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
accelerator_check = load_module(os.path.join(ROOT, "experiments",
                                             "accelerator_check.py"))


# A sitecustomize for the dry run's processes, as on the GPU machine:
# tensorflow_datasets cannot be imported and the project is not installed
# (only the checkout on PYTHONPATH provides `moejax`).
BLOCKER = """
import os, sys

class _Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow_datasets":
      raise ImportError("tensorflow_datasets is not installed here")
    return None

root = os.environ["CHECK_ROOT"]
sys.meta_path[:] = [_Blocked()] + [f for f in sys.meta_path
                                   if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") == root
               or not os.path.isdir(os.path.join(p or ".", "moejax"))]
"""


# Seven processes (about 4.7 min on 2 loaded cores: dtop_p 86 s, mod 74 s, moe
# 35 s, lm 80 s), each mostly start-up and compilation at its tiny sizes.
@pytest.mark.slow
def test_dry_run_without_tfds_or_install_writes_every_row(tmp_path):
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(BLOCKER)
  probe = subprocess.run(  # the blocker works: no tfds, moejax from ROOT
      [sys.executable, "-c", "import moejax, importlib.util as u; "
       "print(moejax.__file__); import tensorflow_datasets"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env=one_device_env(PYTHONPATH=f"{ROOT}{os.pathsep}{site}",
                         CHECK_ROOT=ROOT))
  assert probe.stdout.startswith(os.path.join(ROOT, "moejax")), probe.stdout
  assert "ImportError" in probe.stderr or "ModuleNotFound" in probe.stderr

  out = tmp_path / "check"
  # One accelerator; the .sh puts ROOT first on PYTHONPATH, the blocker after.
  env = one_device_env(JAX_PLATFORMS="cpu", DRY_RUN="1", CHECK_ROOT=ROOT,
                       PYTHONPATH=str(site), PYTHON=sys.executable)
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "experiments", "accelerator_check.sh"),
       str(out), "--budget_s=100000"],  # no part may time out here
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for part in accelerator_check.PARTS:
    assert f"== part {part}: expected about" in proc.stdout
  result = json.loads((out / "accelerator_check.json").read_text())
  md = (out / "accelerator_check.md").read_text()
  assert result["dry_run"] and "DRY RUN" in md
  assert all(s["rc"] == 0 for s in result["steps"]), result["steps"]
  moe = {(r["name"], r["strategy"]) for r in result["moe_layer"]}
  for name in accelerator_check.DRY_SIZES:
    for strategy in ["dense"] + accelerator_check.DRY_STRATEGIES.split(","):
      assert (name, strategy) in moe, (name, strategy)
  assert all(r["ms"] > 0 and r["tflops"] > 0 for r in result["moe_layer"])
  assert {r["model"] for r in result["lm_step"]} == {"dense",
                                                     "moe/top_k/gather"}
  assert {(r["model"], r["attention"]) for r in result["attention_step"]} == {
      ("moe/top_k/gather", "xla"), ("moe/top_k/gather+dot_product",
                                    "dot_product")}
  assert "| moe/top_k/gather+dot_product | dot_product |" in md
  assert {r["label"] for r in result["dtop_p"]["rows"]} == {"top_k", "dtop_p"}
  assert result["dtop_p"]["paired"]["seeds"] == [0]
  mod = {r["label"]: r for r in result["mod"]["rows"]}
  assert set(mod) == set(accelerator_check.MOD_DRY_ARMS)
  assert all(r["seeds"] == [0] and r["eval_loss"][0] > 0
             for r in mod.values())
  targets = {t["key"]: t for t in result["targets"]}
  assert set(targets) == {"moe_e8", "moe_e64", "mfu_moe", "mfu_dense"}
  assert targets["moe_e8"]["status"] in ("met", "not met")
  assert targets["mfu_moe"]["status"] == "not measured"  # no peak on a CPU
  for t in accelerator_check.TARGETS:
    assert t[1] in md
  assert "| target_e64 |" in md and "| dtop_p |" in md
  assert "| mod_d512 |" in md and "dtop_p - top_k" in md


def test_mod_arms_get_equal_training_flops():
  plan = accelerator_check.mod_plan(accelerator_check.MOD_ARMS,
                                    accelerator_check.MOD_BASE, 1e16, False)
  by = {label: (steps, per_step) for label, _, steps, per_step in plan}
  assert set(by) == set(accelerator_check.MOD_ARMS)
  for steps, per_step in by.values():
    assert abs(steps * per_step / 1e16 - 1) < 0.01
  # MoD is cheaper per step than its dense model, so it trains longer; the
  # narrower dense models longer still.
  assert (by["dense_d512"][0] < by["mod_d512"][0] and
          by["dense_d512"][0] < by["dense_d384"][0] < by["dense_d256"][0])


def test_paired_differences_and_p():
  d = accelerator_check.paired({0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0},
                               {0: 1.1, 1: 2.3, 2: 3.2})
  assert d["seeds"] == [0, 1, 2]
  assert [round(x, 6) for x in d["deltas"]] == [0.1, 0.3, 0.2]
  assert abs(d["mean"] - 0.2) < 1e-9 and abs(d["std"] - 0.1) < 1e-9
  # t = 0.2 / (0.1 / sqrt 3) = 3.464 on 2 degrees of freedom: p = 0.0742.
  assert abs(d["p"] - 0.0742) < 1e-3
  assert accelerator_check.paired({0: 1.0}, {0: 2.0})["p"] is None


def test_targets_are_marked_from_rows():
  moe = [{"name": "target_e8", "dtype": "bfloat16", "strategy": "gather",
          "ratio": 1.2},
         {"name": "target_e8", "dtype": "bfloat16", "strategy": "index",
          "ratio": 1.5},
         {"name": "target_e64", "dtype": "bfloat16", "strategy": "gather",
          "ratio": 1.7},
         {"name": "target_e64", "dtype": "float32", "strategy": "gather",
          "ratio": 1.1}]
  lm = [{"model": "dense", "mfu": 0.5}, {"model": "moe/top_k/gather",
                                         "mfu": 0.3}]
  got = {t["key"]: (t["status"], t["by"]) for t in
         accelerator_check.targets(moe, lm)}
  assert got == {"moe_e8": ("met", "gather"),
                 "moe_e64": ("not met", "gather"),
                 "mfu_moe": ("not met", "moe/top_k/gather"),
                 "mfu_dense": ("met", "dense")}
