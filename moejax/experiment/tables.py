"""Markdown tables of experiment results.

Axis legend: none (rows of already formatted cells; per-seed scalars).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from moejax.experiment.stats import format_ms, paired_delta


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


def paired_table(pairs: Sequence[tuple[str, Mapping[Any, Optional[float]],
                                       Mapping[Any, Optional[float]]]], *,
                 first: str = "run", sem: bool = False) -> str:
  """Same-seed differences `other[s] - base[s]` as a markdown table.

  Args:
    pairs: (row name, base {seed: value}, other {seed: value}); a pair
      without a common seed has no row.
    first: title of the first column.
    sem: also the standard error of the mean difference and in how many
      seeds `other` is lower.

  Returns:
    Columns: name, seeds, per seed (+.4f), mean ± std [, sem, lower count].
  """
  body = []
  for name, base, other in pairs:
    d = paired_delta(base, other)
    if not d["seeds"]:
      continue
    row = [name, ",".join(map(str, d["seeds"])),
           " / ".join(f"{x:+.4f}" for x in d["deltas"]),
           format_ms((d["mean"], d["std"] or 0.0), "+.4f", ".4f")]
    if sem:
      row += [f"{d['sem']:.4f}" if d["sem"] is not None else "—",
              f"{sum(x < 0 for x in d['deltas'])} of {len(d['deltas'])}"]
    body.append(row)
  header = [first, "seeds", "per seed", "mean ± std"]
  if sem:
    header += ["sem", f"seeds where {first} is lower"]
  return markdown_table(header, body)
