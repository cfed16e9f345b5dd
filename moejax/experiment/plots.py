"""Matplotlib helpers of the experiment drivers (headless, PNG files).

Axis legend: none (lists of per-step records).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence


def pyplot():
  """`matplotlib.pyplot` on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save(fig, path: str, dpi: int = 110) -> str:
  """Lays out `fig`, writes it to `path` (PNG), closes it; returns `path`."""
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


@contextlib.contextmanager
def figure(path: str, ncols: int = 1, figsize=(7, 4), dpi: int = 110,
           **kwargs) -> Iterator[Any]:
  """`with figure(path, 2) as (fig, axes):` ... saves the PNG and closes it.

  Yields `(fig, axes)`; axes is one Axes for ncols=1 and no extra kwargs
  (matplotlib's `subplots` squeezing), else as `plt.subplots` returns it.
  """
  fig, axes = pyplot().subplots(1, ncols, figsize=figsize, **kwargs)
  yield fig, axes
  save(fig, path, dpi)


def series(history: Sequence[dict[str, Any]], key: str,
           require: str = "loss") -> tuple[list[Any], list[Any]]:
  """(steps, values) of `key` over the records that also hold `require`
  (training records hold "loss"; evaluation records "eval_loss")."""
  rows = [h for h in history if key in h and require in h
          and h[key] is not None]
  return [h["step"] for h in rows], [h[key] for h in rows]
