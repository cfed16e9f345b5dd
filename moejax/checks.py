"""Validation of config fields: errors name the field, its value and what is allowed.

Axis legend: none (static Python values only). Used by the frozen config
dataclasses' ``__post_init__``.
"""
from __future__ import annotations

from typing import Any, Iterable


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
  """Raises ValueError unless `value` is one of `allowed`."""
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: "
                     f"{', '.join(map(str, allowed))}")


def check_positive_ints(config: Any, names: Iterable[str]) -> None:
  """Raises ValueError unless each field `names` of `config` is an int >= 1."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} is out of range; allowed: "
                       "integer >= 1")


def check_heads(d_model: int, num_heads: int) -> None:
  """Raises ValueError unless `num_heads` splits `d_model` into even head widths."""
  if d_model % num_heads or (d_model // num_heads) % 2:
    raise ValueError(f"num_heads={num_heads} must divide d_model="
                     f"{d_model} into even head widths")
