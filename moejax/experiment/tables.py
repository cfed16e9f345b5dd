"""Markdown tables of experiment results.

Axis legend: none (rows of already formatted cells).
"""
from __future__ import annotations

from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table (no trailing newline).

  Args:
    header: column titles.
    rows: cells per row, already formatted; a short row is padded with "".
  """
  width = len(header)
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * width]
  for row in rows:
    if len(row) > width:
      raise ValueError(f"row has {len(row)} cells; the header has {width}")
    cells = list(row) + [""] * (width - len(row))
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)
