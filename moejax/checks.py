"""Validation of static arguments and config fields: one home for the checks
that every layer shares. Errors name the field, its value and what is allowed
(one line: ``name=value is out of range; allowed: ...``).

Axis legend: none (static Python values only). Used by the frozen config
dataclasses' ``__post_init__``, the routers' and plans' static arguments
(`moejax.routing`, `moejax.dispatch`) and the data sources. This module
imports nothing of moejax, so every layer may use it.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterable


def is_concrete(value: Any) -> bool:
  """Whether `value` is a Python (or numpy) number, not a bool or a tracer."""
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
  """`value` as an int in [low, high] (high None: no bound); else ValueError
  naming it."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if value < low or (high is not None and value > high):
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name}={value} is out of range; allowed: {allowed}")
  return value


def check_number(name: str, value: Any, low: float,
                 high: float | None = None, low_open: bool = False) -> None:
  """Raises ValueError unless `value` is a real number in [low, high] (or
  (low, high] if `low_open`; high None: no bound)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}={value!r} must be a real number")
  bad = not (value > low if low_open else value >= low)  # NaN is bad
  if high is not None:
    bad = bad or not value <= high
  if bad:
    lo = "(" if low_open else "["
    allowed = f"{lo}{low}, {high}]" if high is not None else (
        f"> {low}" if low_open else f">= {low}")
    raise ValueError(f"{name}={value} is out of range; allowed: {allowed}")


def check_p(name: str, value: Any) -> None:
  """Raises ValueError when `value` is a concrete number outside (0, 1] (a
  traced threshold passes: the controller sets it inside jit)."""
  if is_concrete(value) and not 0.0 < float(value) <= 1.0:
    raise ValueError(f"{name}={value} is out of range; allowed: (0, 1]")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
  """Raises ValueError unless `value` is one of `allowed`."""
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: "
                     f"{', '.join(map(str, allowed))}")


def check_positive_ints(config: Any, names: Iterable[str]) -> None:
  """Raises ValueError unless each field `names` of `config` is an int >= 1."""
  check_int_fields(config, names, 1)


def check_int_fields(config: Any, names: Iterable[str], low: int) -> None:
  """Raises ValueError unless each field `names` of `config` is an int >=
  `low` (a bool is not an int here)."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name}={value!r} is out of range; allowed: "
                       f"integer >= {low}")


def check_heads(d_model: int, num_heads: int) -> None:
  """Raises ValueError unless `num_heads` splits `d_model` into even head widths."""
  if d_model % num_heads or (d_model // num_heads) % 2:
    raise ValueError(f"num_heads={num_heads} must divide d_model="
                     f"{d_model} into even head widths")
