"""The accelerator check's results: the targets, paired same-seed differences,
the MoE-layer rows, the records the parts write, and the markdown report
(`accelerator_check.py` runs the parts; this file only reads and formats).

Standard library only (scipy for the paired t-test where installed), like the
check itself: the check's own process stays off the accelerator.

Axis legend (of the MoE sizes T x D x F x E x k):
  T  tokens, D model width, F expert width, E experts, k experts per token
"""
from __future__ import annotations

import json
import math
import os


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


def peak_tflops(name: str) -> float:
  for key, value in PEAK_TFLOPS:
    if key in name:
      return value
  return 0.0


def paired(base: dict, other: dict) -> dict:
  """Same-seed differences other - base ({seed: loss}) with a two-sided
  paired t-test (p None with fewer than 2 seeds or without scipy)."""
  seeds = sorted(set(base) & set(other))
  deltas = [other[s] - base[s] for s in seeds]
  n = len(deltas)
  mean = sum(deltas) / n if n else None
  std = (math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
         if n > 1 else None)
  p = None
  if n > 1 and std:
    try:
      from scipy import stats  # pylint: disable=g-import-not-at-top
      p = float(stats.t.sf(abs(mean / (std / math.sqrt(n))), n - 1) * 2)
    except ImportError:
      pass
  return {"seeds": seeds, "deltas": deltas, "mean": mean, "std": std, "p": p}


def load_json(path: str) -> dict | None:
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


def _pm(ms, fmt=".4f") -> str:
  if not ms or ms[0] is None:
    return "-"
  return f"{ms[0]:{fmt}}" + ("" if ms[1] is None else f" ± {ms[1]:{fmt}}")


def _paired_line(name: str, d: dict) -> str:
  if not d or d.get("mean") is None:
    return f"| {name} | - | - | - |"
  per = " / ".join(f"{x:+.4f}" for x in d["deltas"])
  std = "" if d["std"] is None else f" ± {d['std']:.4f}"
  p = "-" if d.get("p") is None else f"{d['p']:.3f}"
  return f"| {name} | {per} | {d['mean']:+.4f}{std} | {p} |"


def _dtop_p_lines(part: dict) -> list[str]:
  lines = ["", "## DTop-p vs top-k (`small`, dropless, PI defaults, "
           "load-balance weight 1e-2 for both, fixed before the run)", "",
           "| run | seeds | eval loss | fanout | drop | tokens/s |",
           "| --- " * 6 + "|"]
  for r in part.get("rows", []):
    seeds = ",".join(map(str, r.get("seeds", [])))
    lines.append(
        f"| {r.get('label', '?')} | {seeds} | {_pm(r.get('eval_loss'))} | "
        f"{_pm(r.get('experts_per_token'), '.2f')} | "
        f"{_pm(r.get('drop_fraction'), '.3f')} | "
        f"{_pm(r.get('tokens_per_s'), ',.0f')} |")
  lines += ["", "| paired (same seed) | per seed | mean ± std | p (paired t) "
            "|", "| --- " * 4 + "|",
            _paired_line("dtop_p - top_k", part.get("paired"))]
  return lines


def _mod_lines(part: dict) -> list[str]:
  flops = part.get("train_flops")
  lines = ["", "## MoD vs dense at equal training FLOPs"
           + (f" ({flops:.2g} per run)" if flops else ""), "",
           "| run | steps | training FLOPs | seeds | eval loss |",
           "| --- " * 5 + "|"]
  for r in part.get("rows", []):
    lines.append(f"| {r['label']} | {r['steps']} | {r['train_flops']:.3g} | "
                 f"{','.join(map(str, r['seeds']))} | "
                 f"{_pm(r['eval_loss'])} |")
  lines += ["", "| paired (same seed) | per seed | mean ± std | p (paired t) "
            "|", "| --- " * 4 + "|"]
  lines += [_paired_line(k, v) for k, v in part.get("paired", {}).items()]
  return lines


def _attention_lines(rows: list[dict]) -> list[str]:
  """The ~1B step per attention implementation, against its xla row."""
  if not rows:
    return []
  xla = {r["model"]: r["step_s"] for r in rows if r["attention"] == "xla"}
  lines = ["", "## Attention implementations (~1B MoE train step, bf16)", "",
           "| model | attention | step ms | tokens/s | x xla step |",
           "| --- " * 5 + "|"]
  for r in rows:
    base = xla.get(r["model"].split("+")[0])
    ratio = f"{r['step_s'] / base:.2f}" if base else "-"
    lines.append(f"| {r['model']} | {r['attention']} | "
                 f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{ratio} |")
  return lines


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
  lines += _attention_lines(result.get("attention_step") or [])
  lines += _dtop_p_lines(result.get("dtop_p") or {})
  lines += _mod_lines(result.get("mod") or {})
  lines += ["", "## Steps", "", "| step | rc | seconds | command |",
            "| --- " * 4 + "|"]
  for s in result["steps"]:
    rc = "timeout" if s["timed_out"] else s["rc"]
    lines.append(f"| {s['name']} | {rc} | {s['seconds']:.0f} | "
                 f"`{s['cmd']}` |")
  return "\n".join(lines) + "\n"


def load_records(directory: str) -> list[dict]:
  if not os.path.isdir(directory):
    return []
  return [r for r in (load_json(os.path.join(directory, n))
                      for n in sorted(os.listdir(directory))
                      if n.endswith(".json")) if r and "error" not in r]
