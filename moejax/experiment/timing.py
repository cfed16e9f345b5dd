"""Wall-clock timing of jitted calls for the bench scripts.

Axis legend: none (seconds per call).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax


def time_calls(fn: Callable[..., Any], *args: Any, repeats: int,
               warmup: int = 1, calls: int = 1) -> list[float]:
  """Seconds per call of `fn(*args)`: `warmup` untimed calls (compilation),
  then `repeats` timings of `calls` back-to-back calls each, every timing
  ending when the last result is ready (`jax.block_until_ready`)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return times
