"""Run logging: JSON lines, TensorBoard event files and a loss/fanout plot.

`MetricsWriter` appends each log record to `metrics.jsonl` and, given a
TensorBoard directory, writes its numbers there as scalars too
(`TensorBoardWriter`, with tensorboardX: `tensorboard --logdir WORKDIR` shows
them); without tensorboardX installed it says so once and writes JSON only.
"""
from __future__ import annotations

import json
import os
import sys
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


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """The TensorBoard scalars of a log record: {tag: value}.

  Numbers of an evaluation record (one with `eval_loss`) are tagged
  `eval/KEY`, others `train/KEY`; a list of numbers (e.g. `layer_fanout`)
  gives `train/KEY/i`; `step`, strings, flags and dicts are left out.
  """
  group = "eval" if "eval_loss" in record else "train"
  out = {}
  for key, value in to_python(record).items():
    if key == "step" or isinstance(value, (bool, str, dict)) or value is None:
      continue
    if isinstance(value, list):
      for i, v in enumerate(value):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          out[f"{group}/{key}/{i}"] = float(v)
    elif isinstance(value, (int, float)):
      out[f"{group}/{key}"] = float(value)
  return out


_WARNED_NO_TENSORBOARD = False


class TensorBoardWriter:
  """Scalars of log records as TensorBoard event files in `logdir`
  (tensorboardX's `SummaryWriter`, imported here: optional).

  Args:
    logdir: the event files' directory.
    purge_step: on a resumed run, the first step logged again: TensorBoard
      hides the earlier run's events from that step on.
  Without tensorboardX, `enabled` is False, writes do nothing, and the first
  such writer of the process says so in one line on stderr.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    global _WARNED_NO_TENSORBOARD
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      self._writer = None
      if not _WARNED_NO_TENSORBOARD:
        _WARNED_NO_TENSORBOARD = True
        sys.stderr.write("warning: tensorboardX is not installed (pip install "
                         "tensorboardX): no TensorBoard logs, metrics.jsonl "
                         "only\n")
      return
    self._writer = SummaryWriter(logdir, purge_step=purge_step)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def write(self, record: dict[str, Any]) -> None:
    if self._writer is None or "step" not in record:
      return
    step = int(record["step"])
    for tag, value in scalars(record).items():
      self._writer.add_scalar(tag, value, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class MetricsWriter:
  """Appends one JSON object per record to `path` (flushes every write) and,
  with `tensorboard_dir`, writes its scalars there (`TensorBoardWriter`)."""

  def __init__(self, path: str, tensorboard_dir: str | None = None,
               purge_step: int | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self.tensorboard = (TensorBoardWriter(tensorboard_dir, purge_step)
                        if tensorboard_dir else None)

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(to_python(record)) + "\n")
    if self.tensorboard is not None:
      self.tensorboard.write(record)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


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
  legend_below(ax)


def legend_below(ax, *twins, ncol: int = 3) -> None:
  """The legend of `ax` (and of its twin axes `twins`) under its x label,
  outside the curves."""
  handles, labels = ax.get_legend_handles_labels()
  for twin in twins:
    more = twin.get_legend_handles_labels()
    handles, labels = handles + more[0], labels + more[1]
  ax.legend(handles, labels, fontsize=7, loc="upper center",
            bbox_to_anchor=(0.5, -0.2), ncol=min(ncol, max(1, len(handles))),
            frameon=False)


def routing_series(records: list[dict[str, Any]]
                   ) -> dict[str, tuple[list[int], list[float]]]:
  """The routing quantities of the training records, by panel label.

  Returns {name: (steps, values)} for: `mean fanout` and `kept per token`
  (experts that ran per token: below the fanout when capacity drops
  assignments), `layer L fanout` (when the per-layer fanout varies), and
  `drop fraction` and `MaxVio` (load imbalance). A fixed-k router's mean
  fanout is a flat line; the others show what its routing does.
  """
  train = [r for r in records if "loss" in r and "experts_per_token" in r]
  steps = [r["step"] for r in train]
  out = {}
  for key, name in (("experts_per_token", "mean fanout"),
                    ("kept_per_token", "kept per token"),
                    ("drop_fraction", "drop fraction"),
                    ("max_vio", "MaxVio")):
    if train and all(key in r for r in train):
      out[name] = (steps, [float(r[key]) for r in train])
  layers = [r.get("layer_fanout") for r in train]
  if train and all(isinstance(l, list) for l in layers):
    per_layer = list(zip(*layers))
    if any(max(v) - min(v) > 1e-6 for v in per_layer):
      for i, values in enumerate(per_layer):
        out[f"layer {i} fanout"] = (steps, [float(v) for v in values])
  return out


def plot_fanout(ax, records: list[dict[str, Any]],
                target_fanout: float | None = None) -> None:
  """Experts per token over steps (mean, kept, per layer), with the target
  (a grey dashed line under the curves: a fixed-k router's mean fanout lies
  on it and stays visible)."""
  if target_fanout is not None:
    ax.axhline(target_fanout, color="0.6", ls="--", lw=1.5, label="target",
               zorder=1)
  for name, (steps, values) in routing_series(records).items():
    if "fanout" in name or name == "kept per token":
      ax.plot(steps, values, label=name, zorder=3,
              lw=0.8 if name.startswith("layer") else 1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("experts per token")
  legend_below(ax)


def plot_balance(ax, records: list[dict[str, Any]]) -> None:
  """Drop fraction and MaxVio (load imbalance) over steps."""
  series = routing_series(records)
  for name in ("drop fraction", "MaxVio"):
    if name in series:
      ax.plot(*series[name], label=name)
  ax.set_xlabel("step")
  legend_below(ax)


def run_title(records: list[dict[str, Any]], name: str = "") -> str:
  """`NAME: ROUTER field=value ...` from the run's first record (its routing
  settings), or NAME alone."""
  routing = next((r["routing"] for r in records if "routing" in r), None)
  if not routing:
    return name
  settings = dict(routing)
  text = " ".join([str(settings.pop("router", "dense"))]
                  + [f"{k}={v}" for k, v in settings.items()])
  return f"{name}: {text}" if name else text


def run_figure(records: Iterable[dict[str, Any]],
               target_fanout: float | None = None, title: str = ""):
  """The run's figure: training/eval loss; experts per token (mean, kept,
  per layer); drop fraction and MaxVio, over steps; `run_title` above."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = list(records)
  has_fanout = any("loss" in r and "experts_per_token" in r for r in records)
  fig, axes = plt.subplots(1, 3 if has_fanout else 1,
                           figsize=(15 if has_fanout else 5, 4), squeeze=False)
  plot_loss(axes[0, 0], records, "loss (nats/byte)")
  if has_fanout:
    plot_fanout(axes[0, 1], records, target_fanout)
    plot_balance(axes[0, 2], records)
  fig.suptitle(run_title(records, title), fontsize=10)
  fig.tight_layout()
  return fig


def plot_run(records: Iterable[dict[str, Any]], path: str,
             target_fanout: float | None = None) -> str:
  """Writes `run_figure` as a PNG at `path`, titled with the workdir."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  workdir = os.path.dirname(os.path.abspath(path))
  fig = run_figure(records, target_fanout, os.path.basename(workdir))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
