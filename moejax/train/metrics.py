"""Run logging: JSON lines and a loss/fanout plot."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np


def to_python(value: Any) -> Any:
  """numpy/jax scalars and arrays -> JSON-able Python values."""
  if isinstance(value, dict):
    return {k: to_python(v) for k, v in value.items()}
  arr = np.asarray(value)
  if arr.ndim == 0:
    return arr.item()
  return arr.tolist()


class MetricsWriter:
  """Appends one JSON object per record to `path` (flushes every write)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(to_python(record)) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
  """Drops records logged after `step` (used when resuming from a checkpoint)."""
  if not os.path.exists(path):
    return
  records = [r for r in read_jsonl(path) if r.get("step", -1) <= step]
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def plot_loss(ax, records: list[dict[str, Any]], ylabel: str) -> None:
  """Train loss over steps and, where logged, validation loss (`eval_loss`)."""
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
            label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.legend()


def plot_fanout(ax, records: list[dict[str, Any]],
                target_fanout: float | None = None) -> None:
  """Mean experts per token over steps, with the target as a dashed line."""
  fan = [r for r in records if "loss" in r and "experts_per_token" in r]
  ax.plot([r["step"] for r in fan], [r["experts_per_token"] for r in fan],
          label="mean fanout")
  if target_fanout is not None:
    ax.axhline(target_fanout, color="k", ls="--", lw=1, label="target")
  ax.set_xlabel("step")
  ax.set_ylabel("experts per token")
  ax.legend()


def plot_run(records: Iterable[dict[str, Any]], path: str,
             target_fanout: float | None = None) -> str:
  """Writes a PNG with training/eval loss and mean fanout over steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = list(records)
  has_fanout = any("loss" in r and "experts_per_token" in r for r in records)
  fig, axes = plt.subplots(1, 2 if has_fanout else 1,
                           figsize=(10 if has_fanout else 5, 3.5), squeeze=False)
  plot_loss(axes[0, 0], records, "loss (nats/byte)")
  if has_fanout:
    plot_fanout(axes[0, 1], records, target_fanout)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
