"""Routing contract shared by every router and dispatcher.

Axis legend:
  S  tokens in one group
  E  experts

A router maps float32 logits `[S, E]` to a `RouterOutput`. Its `Routing` says, for
each (token, expert) pair, the combine weight (`gates`, exactly 0 = not routed) and
the priority an expert uses to keep tokens when it is over capacity (higher first,
ties to the lower token index). Token-choice and expert-choice routers, fixed or
variable fanout, all speak this one form; dispatchers turn it into indices.
"""
from __future__ import annotations

import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Routing:
  """Where each token goes.

  Attributes:
    gates: float32[S, E]; combine weight of token s at expert e, exactly 0 where
      the token is not routed to the expert.
    priority: float32[S, E]; over capacity an expert keeps routed tokens of higher
      priority first, ties to the lower token index. Ignored where gates == 0.
  """
  gates: jax.Array
  priority: jax.Array

  @property
  def routed(self) -> jax.Array:
    """bool[S, E]: the assignments the router made."""
    return self.gates != 0


@flax.struct.dataclass
class RouterOutput:
  """A router's result for one group.

  Attributes:
    routing: the `Routing`.
    aux: dict of unweighted scalar losses (`load_balance`, `z_loss`, `entropy`).
    metrics: dict of arrays, at least `experts_per_token` (scalar) and
      `expert_load` float32[E] (fraction of assignments, sums to 1).
  """
  routing: Routing
  aux: dict[str, Any]
  metrics: dict[str, Any]


def _is_concrete(x) -> bool:
  return isinstance(x, numbers.Number) and not isinstance(x, bool)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
  """Validates a static integer argument; raises ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if value < low or (high is not None and value > high):
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name}={value} is out of range; allowed: {allowed}")
  return value


def check_p(name: str, value) -> None:
  """Validates a probability threshold in (0, 1] when it is a concrete number."""
  if _is_concrete(value) and not 0.0 < float(value) <= 1.0:
    raise ValueError(f"{name}={value} is out of range; allowed: (0, 1]")


def check_logits(logits: jax.Array) -> jax.Array:
  """Checks `[S, E]` and returns float32 logits."""
  if logits.ndim != 2:
    raise ValueError(
        f"logits must have shape [S, E] (one group); got shape {logits.shape}. "
        "Use jax.vmap for several groups.")
  return logits.astype(jnp.float32)
