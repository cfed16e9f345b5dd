"""Statistics over seeds: mean ± std and paired same-seed differences.

Axis legend: none (lists of per-seed scalars; `None` entries are missing runs
and are skipped).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

MeanStd = tuple[Optional[float], Optional[float]]


def mean_std(values: Iterable[Optional[float]]) -> MeanStd:
  """Mean and sample standard deviation (ddof=1; 0 for one value).

  Returns (None, None) when no value is given.
  """
  values = [float(v) for v in values if v is not None]
  if not values:
    return None, None
  mean = sum(values) / len(values)
  std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
         if len(values) > 1 else 0.0)
  return mean, std


def format_ms(ms: Optional[MeanStd], fmt: str = ".3f",
              std_fmt: Optional[str] = None, *, pct: bool = False,
              missing: str = "–") -> str:
  """`"m ± s"` of a (mean, std) pair; `pct` prints 100·m% ± 100·s."""
  if ms is None or ms[0] is None:
    return missing
  mean, std = ms[0], ms[1]
  scale, unit = (100.0, "%") if pct else (1.0, "")
  return (f"{scale * mean:{fmt}}{unit} ± "
          f"{scale * std:{std_fmt or fmt}}")


def format_values(values: Iterable[Optional[float]], fmt: str = ".4f",
                  std_fmt: Optional[str] = None, *, missing: str = "–") -> str:
  """Mean ± std of per-seed values; a single value alone, without ± 0."""
  values = [v for v in values if v is not None]
  if len(values) == 1:
    return f"{values[0]:{fmt}}"
  return format_ms(mean_std(values), fmt, std_fmt, missing=missing)


def paired_delta(base: Mapping[Any, Optional[float]],
                 other: Mapping[Any, Optional[float]]) -> dict[str, Any]:
  """Same-seed differences `other[s] - base[s]` and their spread.

  Seeds share data order and initialisation, so the paired difference has a
  much smaller spread than the difference of two means when seed-to-seed
  variation dominates.

  Args:
    base: {seed: value} of the reference run.
    other: {seed: value} of the compared run.

  Returns:
    {"seeds": common seeds (sorted), "deltas": per seed, "mean", "std"
    (sample std, ddof=1), "sem" (std / sqrt(n))}; mean/std/sem are None
    without a common seed.
  """
  seeds = sorted(s for s in base if s in other and base[s] is not None
                 and other[s] is not None)
  deltas = [float(other[s]) - float(base[s]) for s in seeds]
  mean, std = mean_std(deltas)
  sem = std / math.sqrt(len(deltas)) if std is not None else None
  return {"seeds": seeds, "deltas": deltas, "mean": mean, "std": std,
          "sem": sem}


def by_seed(records: Iterable[Mapping[str, Any]], key: str,
            seed_key: str = "seed") -> dict[Any, Optional[float]]:
  """{seed: record[key]} of the records of one run."""
  return {r[seed_key]: r.get(key) for r in records}


def tail_mean(records: Iterable[Mapping[str, Any]], key: str,
              fraction: float = 0.25, *, round_up: bool = True) -> Any:
  """Mean of a logged training metric over the last `fraction` of the
  training records (those with a "loss") that hold it: a scalar, or per
  position for a per-layer list. The count of records is rounded up (or down
  with `round_up=False`), at least 1. None where no record holds the metric.
  """
  rows = [r[key] for r in records if "loss" in r
          and isinstance(r.get(key), (int, float, list))]
  if not rows:
    return None
  count = len(rows) * fraction
  rows = rows[-max(1, int(math.ceil(count) if round_up else count)):]
  if isinstance(rows[0], list):
    return [sum(c) / len(c) for c in zip(*rows)]
  return sum(rows) / len(rows)
