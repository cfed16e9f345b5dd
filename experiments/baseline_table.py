"""One side-by-side table of the routers' baselines, from committed run records.

Reads the per-run JSON records that the comparison runners write (one file per
run and seed: `compare_balance.py`'s `balance/records/` and
`balance/matched/records/` and the other `balance/` sets, `compare_routers.py`'s
`dtop_p/tiny_dropless/records/` and `finegrained/small_600/records/`) and
tabulates, per router and record set,
mean ± std over seeds of: validation loss, training drop fraction (the last
logged step), validation MaxVio, load CV (std / mean of the expert loads,
mean over layers), dead experts (fraction of experts with less than 1% of
the mean load, validation) and training tokens/s; a dense model has no
routing columns ("–"). Trains nothing.

  python experiments/baseline_table.py --out=experiments/reports/baselines

Writes OUT.md and OUT.json. Rows of different record sets are not comparable
with each other (different sequence lengths, steps, capacity), so each set
gets its own table.
"""
from __future__ import annotations

import glob
import json
import os

from absl import app, flags
import numpy as np

REPORTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports")
SETS = {
    "balance": ("balance/records", "`tiny` reduced (4 layers, D = 128, E = 8, "
                "k = 2), 300 steps, batch 8 x 64 bytes, training capacity "
                "factor 1.25, evaluation capacity factor 4 (`balance.md`)"),
    "balance_matched": ("balance/matched/records", "the same model, 1000 "
                        "steps, ET at matched fanout (`balance.md`)"),
    "balance_matched_2000": ("balance/matched_2000/records", "the same, "
                             "2000 steps (`balance.md`)"),
    "balance_paper_shape": ("balance/paper_shape/records", "ET's routing "
                            "shape: 16 routed experts + 1 shared, ET at mean "
                            "fanout 1 vs token-choice top-1 (Switch gate, aux "
                            "loss), otherwise as `balance`, 1000 steps "
                            "(`balance.md`)"),
    "dropless": ("dtop_p/tiny_dropless/records", "`tiny` (4 layers, D = 128, "
                 "E = 8, target fanout 2), 300 steps, batch 8 x 128 bytes, "
                 "dropless (`dtop_p.md`)"),
    "dropless_1000": ("dtop_p/tiny_dropless_1000/records", "the same model "
                      "and data, 1000 steps, dropless (`dtop_p.md`)"),
    "finegrained": ("finegrained/small_600/records", "`small` blocks (6 "
                    "layers, D = 256), batch 8 x 128 bytes, 600 steps, "
                    "dropless; every MoE arm has experts of 4096 hidden units "
                    "in all per layer, 1024 active (the dense FFN's width) "
                    "(`finegrained.md`)"),
}
COLUMNS = [("val. loss", "loss", 4), ("train drops", "drop", 3),
           ("val. MaxVio", "max_vio", 2), ("load CV", "load_cv", 2),
           ("dead experts (fraction)", "dead", 3), ("fanout", "fanout", 2),
           ("tokens/s", "tokens_per_s", 0)]

flags.DEFINE_string("out", os.path.join(REPORTS, "baselines"),
                    "Output path without extension (.md and .json).")
FLAGS = flags.FLAGS


def _load_cv(load) -> float:
  """float[L, E] expert loads -> mean over layers of std / mean."""
  load = np.asarray(load, np.float64)
  return float(np.mean(load.std(-1) / load.mean(-1)))


def metrics(record: dict) -> dict[str, float]:
  """The table's columns of one run record (either runner's layout)."""
  last = [h for h in record["history"] if "loss" in h][-1]
  if "final_eval" in record:  # compare_routers.py
    ev = record["final_eval"]
    if record["router"] == "dense":  # no router: the routing columns are None
      return {"loss": ev["eval_loss"], "drop": None, "max_vio": None,
              "load_cv": None, "dead": None, "fanout": None,
              "tokens_per_s": record["tokens_per_s"]}
    return {"loss": ev["eval_loss"], "drop": last.get("drop_fraction", 0.0),
            "max_vio": ev["eval_max_vio"], "load_cv": ev["eval_load_cv"],
            # eval_dead_experts counts the experts per layer below 1% of
            # the mean load (`routing.losses.load_stats`), mean over layers.
            "dead": ev["eval_dead_experts"] / record["config"]["num_experts"],
            "fanout": ev["eval_experts_per_token"],
            "tokens_per_s": record["tokens_per_s"]}
  ev = record["evals"]["eval"]  # compare_balance.py
  load = np.asarray(ev["expert_load"])
  return {"loss": ev["loss"], "drop": last.get("drop_fraction", 0.0),
          "max_vio": ev["max_vio"], "load_cv": _load_cv(load),
          "dead": float(np.mean(
              load < 0.01 * load.mean(axis=-1, keepdims=True))),
          "fanout": ev["experts_per_token"],
          "tokens_per_s": record["tokens_per_s"]}


def table(records: list[dict]) -> tuple[str, dict]:
  by_label: dict[str, list[dict]] = {}
  for r in records:
    by_label.setdefault(r["label"], []).append(r)
  head = "| router | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
  summary = {}
  for label in sorted(by_label):
    runs = sorted(by_label[label], key=lambda r: r["seed"])
    values = [metrics(r) for r in runs]
    cells, summary[label] = [], {"seeds": [r["seed"] for r in runs]}
    for _, key, digits in COLUMNS:
      if any(m[key] is None for m in values):  # a dense model's routing
        summary[label][key] = {"mean": None, "std": None}
        cells.append("–")
        continue
      v = np.array([m[key] for m in values], np.float64)
      std = float(v.std(ddof=1)) if len(v) > 1 else 0.0  # sample std
      summary[label][key] = {"mean": float(v.mean()), "std": std}
      cells.append(f"{v.mean():.{digits}f} ± {std:.{digits}f}")
    lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines), summary


def main(argv):
  del argv
  md = ["# Baselines side by side", "",
        "Generated by `python experiments/baseline_table.py` from the "
        "committed per-run records (no training); mean ± sample std over "
        "seeds. "
        "Drops: training drop fraction at the last logged step; MaxVio, load "
        "CV, dead experts and fanout: validation, with the evaluation "
        "routing; tokens/s: training throughput on the shared 2-core CPU "
        "(noisy: other jobs ran beside these runs). Expert choice is balanced by "
        "construction (MaxVio 0) and drops nothing; its cost is tokens "
        "without an expert (see `balance.md`).", ""]
  result = {}
  for name, (folder, what) in SETS.items():
    files = sorted(glob.glob(os.path.join(REPORTS, folder, "*.json")))
    if not files:
      continue
    records = []
    for path in files:
      with open(path) as fh:
        records.append(json.load(fh))
    text, result[name] = table(records)
    md += [f"## {name}: {what}", "", text, ""]
  with open(FLAGS.out + ".md", "w") as fh:
    fh.write("\n".join(md))
  with open(FLAGS.out + ".json", "w") as fh:
    json.dump(result, fh, indent=1)
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
