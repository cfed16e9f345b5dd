"""One prepared accelerator check (a GPU such as an H100/H200): the MoE layer
against the dense FFN, the ~1B LM train step, and DTop-p vs top-k, in <= 8
minutes, written as JSON + a markdown table with the targets marked.

  experiments/accelerator_check.sh OUT_DIR            # on the accelerator
  experiments/accelerator_check.sh OUT_DIR --dry_run  # tiny sizes on a CPU

Axis legend (of the MoE sizes T x D x F x E x k):
  T  tokens, D model width, F expert width, E experts, k experts per token

Steps (each a subprocess with its own time budget; one that fails or runs out
of time is recorded and the others still run):
  1. `bench_moe.py`, top-k routing, strategies gather (+ batched matmul),
     dropless / sorted / ragged, index and einsum (einsum only at E <= 8), in
     bfloat16 and float32, at the three reference sizes and the two target
     sizes; ratio = MoE fwd+bwd / dense SwiGLU FFN of width k*F (equal active
     FLOPs) timed in the same rounds; TFLOP/s = the active FLOPs (18 T D k F
     for fwd+bwd) / time.
  2. `bench_lm_step.py --preset=1b` in bfloat16: the ~1B MoE (gather and
     ragged) and its dense equivalent: tokens/s and MFU against the device's
     dense bf16 peak.
  3. `compare_routers.py`: top-k vs DTop-p (the library's PI defaults) on the
     `small` preset, a few hundred steps, bfloat16.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> T x D x F x E x k. The reference sizes are bench_moe.py's default
# matrix; the targets are the accelerator targets' shapes (F = 8192 / 4 at
# E = 8, k = 2, and the fine-grained E = 64, k = 8 of the same active width).
SIZES = {
    "ref_e8": "4096x512x1024x8x2",
    "ref_e64": "4096x512x256x64x8",
    "ref_e128": "8192x256x128x128x8",
    "target_e8": "16384x2048x2048x8x2",
    "target_e64": "16384x2048x512x64x8",
}
# The dry run: one reference and the two target names at tiny sizes, bf16.
DRY_SIZES = {
    "ref_e8": "64x16x32x8x2",
    "target_e8": "128x16x32x8x2",
    "target_e64": "128x16x8x16x4",
}
STRATEGIES = "gather,dropless,sorted,ragged,index,einsum"

# Accelerator targets (bfloat16): (key, text, limit, "max"/"min").
TARGETS = [
    ("moe_e8", "MoE layer fwd+bwd <= 1.3x the dense FFN at T=4096*4, D=2048, "
     "F=8192/4, E=8, k=2 (best strategy, bf16)", 1.3, "max"),
    ("moe_e64", "MoE layer fwd+bwd <= 1.6x the dense FFN at fine-grained "
     "E=64, k=8 (T=16384, D=2048, F=512, bf16)", 1.6, "max"),
    ("mfu_moe", "train-step MFU >= 35% for the ~1B MoE (bf16)", 0.35, "min"),
    ("mfu_dense", "train-step MFU >= 45% for the dense equivalent (bf16)",
     0.45, "min"),
]

# Dense bf16 peak TFLOP/s by device name (for MFU); the first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
               ("H800", 989.0), ("A100", 312.0), ("L4", 121.0)]


def device_name() -> str:
  """The first GPU's name from nvidia-smi ('' when there is none)."""
  if not shutil.which("nvidia-smi"):
    return ""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name",
                          "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
  except (subprocess.SubprocessError, OSError):
    return ""
  return out.strip().splitlines()[0] if out.strip() else ""


def peak_tflops(name: str) -> float:
  for key, value in PEAK_TFLOPS:
    if key in name:
      return value
  return 0.0


def run_step(name: str, cmd: list[str], budget: float, log_dir: str) -> dict:
  """Runs one step's command with a time limit; its output goes to a log."""
  # One device: no forced host devices inherited (e.g. from a test session).
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if "xla_force_host_platform_device_count" not in f)
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=ROOT + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  log = os.path.join(log_dir, f"{name}.log")
  t0 = time.perf_counter()
  with open(log, "w") as f:
    try:
      rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f,
                          stderr=subprocess.STDOUT, timeout=budget).returncode
      timed_out = False
    except subprocess.TimeoutExpired:
      rc, timed_out = None, True
  seconds = time.perf_counter() - t0
  print(f"[{name}] rc={rc} {seconds:.0f} s{' TIMEOUT' if timed_out else ''}",
        flush=True)
  return {"name": name, "cmd": " ".join(cmd), "rc": rc, "seconds": seconds,
          "timed_out": timed_out, "log": os.path.relpath(log, log_dir)}


def _load(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def active_flops(row: dict) -> float:
  """fwd+bwd FLOPs of the dense SwiGLU FFN of width k*F on T tokens."""
  return 18.0 * row["tokens"] * row["d_model"] * row["k"] * row["width"]


def moe_row(name: str, r: dict) -> dict:
  """A bench_moe.py row with its size name and active TFLOP/s."""
  return {"name": name, "size": r["size"], "dtype": r["dtype"],
          "strategy": "dense" if r["router"] == "dense" else r["strategy"],
          "ms": r["ms"], "ratio": r["ratio"],
          "tflops": active_flops(r) / (r["ms"] / 1e3) / 1e12,
          "peak_mib": r.get("peak_mib")}


def targets(moe: list[dict], lm: list[dict]) -> list[dict]:
  """Each target with its measured value and met / not met / not measured."""
  def best(size_name):
    rows = [r for r in moe if r["name"] == size_name and
            r["dtype"] == "bfloat16" and r["strategy"] != "dense"]
    row = min(rows, key=lambda r: r["ratio"]) if rows else None
    return (row["ratio"], row["strategy"]) if row else (None, None)

  def mfu(model_prefix):
    rows = [r for r in lm if r["model"].startswith(model_prefix) and
            r.get("mfu") is not None]
    row = max(rows, key=lambda r: r["mfu"]) if rows else None
    return (row["mfu"], row["model"]) if row else (None, None)

  measured = {"moe_e8": best("target_e8"), "moe_e64": best("target_e64"),
              "mfu_moe": mfu("moe/"), "mfu_dense": mfu("dense")}
  out = []
  for key, text, limit, kind in TARGETS:
    value, how = measured[key]
    if value is None:
      status = "not measured"
    else:
      ok = value <= limit if kind == "max" else value >= limit
      status = "met" if ok else "not met"
    out.append({"key": key, "target": text, "limit": limit, "kind": kind,
                "value": value, "by": how, "status": status})
  return out


def markdown(result: dict) -> str:
  dry = result["dry_run"]
  note = " (DRY RUN: tiny sizes on CPU, not a measurement)" if dry else ""
  lines = [f"# Accelerator check: {result['device'] or 'no GPU'}{note}",
           "", f"jax {result.get('jax', '?')}, device kind "
           f"{result.get('device_kind', '?')}, wall {result['wall_s']:.0f} s, "
           f"peak {result['peak_tflops'] or 'unknown'} TFLOP/s (dense bf16).",
           "", "## Targets", "", "| target | measured | status |",
           "| --- | --- | --- |"]
  for t in result["targets"]:
    value = "-" if t["value"] is None else (
        f"{t['value']:.2f}x ({t['by']})" if t["kind"] == "max"
        else f"{t['value'] * 100:.1f}% ({t['by']})")
    lines.append(f"| {t['target']} | {value} | {t['status']} |")
  lines += ["", "## MoE layer fwd+bwd vs the dense FFN (top-k, capacity "
            "factor 1.25)", "",
            "| size | T,D,F,E,k | dtype | strategy | ms | x dense | TFLOP/s "
            "(active) |", "| --- " * 7 + "|"]
  for r in result["moe_layer"]:
    lines.append(f"| {r['name']} | {r['size']} | {r['dtype']} | "
                 f"{r['strategy']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
                 f"{r['tflops']:.1f} |")
  lines += ["", "## LM train step (bf16)", "",
            "| model | params | step ms | tokens/s | TFLOP/s | MFU | x dense |",
            "| --- " * 7 + "|"]
  for r in result["lm_step"]:
    mfu = "-" if r.get("mfu") is None else f"{r['mfu'] * 100:.1f}%"
    lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | "
                 f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['achieved_tflops']:.1f} | {mfu} | "
                 f"{r.get('step_vs_dense', float('nan')):.2f} |")
  lines += ["", "## DTop-p vs top-k (library PI defaults)", "",
            "| run | eval loss | fanout | tokens/s |", "| --- " * 4 + "|"]
  for r in result["compare"]:
    loss, fan, tps = (r.get("eval_loss"), r.get("experts_per_token"),
                      r.get("tokens_per_s"))
    if not loss or loss[0] is None:
      lines.append(f"| {r.get('label', '?')} | failed | - | - |")
      continue
    lines.append(
        f"| {r['label']} | {loss[0]:.4f} ± {loss[1]:.4f} | "
        f"{'-' if not fan or fan[0] is None else f'{fan[0]:.2f}'} | "
        f"{'-' if not tps or tps[0] is None else f'{tps[0]:,.0f}'} |")
  lines += ["", "## Steps", "", "| step | rc | seconds | command |",
            "| --- " * 4 + "|"]
  for s in result["steps"]:
    rc = "timeout" if s["timed_out"] else s["rc"]
    lines.append(f"| {s['name']} | {rc} | {s['seconds']:.0f} | "
                 f"`{s['cmd']}` |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--dry_run", action="store_true",
                      default=bool(os.environ.get("DRY_RUN")),
                      help="tiny sizes, a few steps, on any backend")
  parser.add_argument("--budget_s", type=float, default=470.0,
                      help="total seconds for the three steps")
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  logs = os.path.join(out, "logs")
  os.makedirs(logs, exist_ok=True)
  py, dry = sys.executable, args.dry_run
  name = device_name()
  peak = peak_tflops(name)
  start = time.perf_counter()
  # Shares of the budget: MoE layer 50%, LM step 25%, routers 25%.
  budget = {"moe": 0.5 * args.budget_s, "lm": 0.25 * args.budget_s,
            "compare": 0.25 * args.budget_s}
  steps = []

  # 1. MoE layer vs dense: one process per size on the accelerator (a size
  # that runs out of time loses only itself), one for all in a dry run.
  sizes = DRY_SIZES if dry else SIZES
  groups = [list(sizes)] if dry else [[n] for n in sizes]
  moe = []
  for group in groups:
    label = "moe_" + ("all" if len(group) > 1 else group[0])
    path = os.path.join(out, f"{label}.json")
    cmd = [py, "experiments/bench_moe.py",
           "--sizes=" + ",".join(sizes[n] for n in group),
           f"--strategies={STRATEGIES}", "--routers=top_k",
           f"--dtype={'bfloat16' if dry else 'bfloat16,float32'}",
           "--bf16_strategies=all",
           f"--repeats={2 if dry else 5}", "--warmup=1", "--meshes=",
           f"--out={path}"]  # one accelerator: no mesh rows
    share = budget["moe"] * (len(group) / len(sizes))
    steps.append(run_step(label, cmd, share, logs))
    by_size = {sizes[n]: n for n in group}
    for r in (_load(path) or {}).get("rows", []):
      moe.append(moe_row(by_size.get(r["size"].replace(",", "x"), "?"), r))

  # 2. LM train step: the ~1B MoE and its dense equivalent.
  lm_path = os.path.join(out, "lm_step.json")
  cmd = [py, "experiments/bench_lm_step.py",
         f"--preset={'tiny' if dry else '1b'}", "--dtype=bfloat16",
         f"--strategies={'gather' if dry else 'gather,ragged'}",
         f"--steps={2 if dry else 10}",
         f"--warmup={1 if dry else 2}", f"--out={lm_path}"]
  if peak:
    cmd.append(f"--peak_tflops={peak}")
  steps.append(run_step("lm_step", cmd, budget["lm"], logs))
  lm_result = _load(lm_path) or {}
  lm = lm_result.get("rows", [])

  # 3. DTop-p vs top-k, small preset, library PI defaults.
  cmp_out = os.path.join(out, "compare")
  size_flags = (["--config=tiny", "--steps=2", "--eval_every=2",
                 "--eval_batches=1", "--batch_size=4", "--seq_len=32",
                 "--log_every=1", "--num_experts=4", "--k=2"] if dry else
                ["--config=small", "--steps=300", "--eval_every=100",
                 "--eval_batches=8", "--log_every=10"])
  cmd = [py, "experiments/compare_routers.py", *size_flags,
         "--runs=top_k;dtop_p", "--seeds=0", "--dtype=bfloat16",
         "--plots=false", "--sample_tokens=0", "--checkpoint_every=100000",
         f"--workroot={os.path.join(out, 'compare_runs')}", f"--out={cmp_out}"]
  steps.append(run_step("compare", cmd, budget["compare"], logs))
  compare = (_load(os.path.join(cmp_out, "results.json")) or {}).get("rows",
                                                                     [])

  result = {"device": name, "device_kind": lm_result.get("device", "?"),
            "dry_run": dry, "peak_tflops": peak, "jax": lm_result.get("jax"),
            "wall_s": time.perf_counter() - start,
            "sizes": sizes, "targets": targets(moe, lm), "moe_layer": moe,
            "lm_step": lm, "compare": compare, "steps": steps}
  with open(os.path.join(out, "accelerator_check.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, "accelerator_check.md"), "w") as f:
    f.write(markdown(result))
  print(markdown(result))
  return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
  sys.exit(main())
