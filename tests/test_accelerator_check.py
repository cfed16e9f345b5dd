"""The prepared accelerator check runs end to end in its dry-run mode (tiny
sizes on the CPU) and writes its JSON and markdown with every expected row."""
import json
import os
import subprocess

from moejax.experiment import load_module
from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
accelerator_check = load_module(os.path.join(ROOT, "experiments",
                                             "accelerator_check.py"))


def test_dry_run_writes_json_and_markdown_with_every_row(tmp_path):
  out = tmp_path / "check"
  env = one_device_env(JAX_PLATFORMS="cpu", DRY_RUN="1")  # one accelerator
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "experiments", "accelerator_check.sh"),
       str(out), "--budget_s=1200"],  # a shared CI machine may be slow
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / "accelerator_check.json").read_text())
  md = (out / "accelerator_check.md").read_text()
  assert result["dry_run"] and "DRY RUN" in md
  assert [s["rc"] for s in result["steps"]] == [0, 0, 0]
  moe = {(r["name"], r["strategy"]) for r in result["moe_layer"]}
  for name, size in accelerator_check.DRY_SIZES.items():
    experts = int(size.split("x")[3])
    for strategy in ["dense"] + accelerator_check.STRATEGIES.split(","):
      if strategy in ("einsum", "ragged") and experts > 8:
        continue  # one-hot einsum, and ragged on a CPU, only at E <= 8
      assert (name, strategy) in moe, (name, strategy)
  assert all(r["ms"] > 0 and r["tflops"] > 0 for r in result["moe_layer"])
  assert {r["model"] for r in result["lm_step"]} == {"dense",
                                                     "moe/top_k/gather"}
  assert {r["label"] for r in result["compare"]} == {"top_k", "dtop_p"}
  targets = {t["key"]: t for t in result["targets"]}
  assert set(targets) == {"moe_e8", "moe_e64", "mfu_moe", "mfu_dense"}
  assert targets["moe_e8"]["status"] in ("met", "not met")
  assert targets["mfu_moe"]["status"] == "not measured"  # no peak on a CPU
  for t in accelerator_check.TARGETS:
    assert t[1] in md
  assert "| target_e64 |" in md and "| dtop_p |" in md


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
