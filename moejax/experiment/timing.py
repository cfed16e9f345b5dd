"""Wall-clock timing of jitted calls for the bench scripts.

Every timing ends when the result is ready (`jax.block_until_ready`), so it
covers the device's work, not only the dispatch. The bench scripts compare
variants in interleaved rounds (`interleaved`: every variant once per round),
so that a slow phase of a shared machine hits all of them alike, and report
the median or the best of the rounds.

Axis legend: none (seconds per call).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Hashable, Mapping, Optional

import jax
from absl import flags


def define_flags(*, repeats: int, warmup: Optional[int] = None,
                 flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`--repeats` (timed rounds) and, given a default, `--warmup` (untimed
  calls after compilation): the timing flags the bench scripts share."""
  flags.DEFINE_integer("repeats", repeats, "Timed rounds; each round times "
                       "every variant once (interleaved).",
                       flag_values=flag_values)
  if warmup is not None:
    flags.DEFINE_integer("warmup", warmup, "Untimed calls of each variant "
                         "after compilation.", flag_values=flag_values)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """(`fn(*args)` once its result is ready, wall seconds): e.g. a first call
  that compiles."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


@dataclasses.dataclass
class Timings:
  """Per round: `wall` seconds per call and `cpu` process seconds per call
  (all threads; on a shared, overloaded machine the steadier measure of the
  work done)."""
  wall: list[float] = dataclasses.field(default_factory=list)
  cpu: list[float] = dataclasses.field(default_factory=list)


def interleaved(fns: Mapping[Hashable, Callable[[], Any]], repeats: int, *,
                warmup: int = 0, calls: int = 1) -> dict[Hashable, Timings]:
  """Times zero-argument callables in `repeats` interleaved rounds.

  Args:
    fns: {name: fn}; `fn()` runs one call of a variant (a closure over its
      arguments, or over a state it advances).
    repeats: rounds; each times every variant once, in the order of `fns`.
    warmup: untimed calls of each variant first (compilation, caches).
    calls: back-to-back calls per timing; the times are per call.

  Returns:
    {name: Timings} with `repeats` entries each.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  out = {name: Timings() for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      result = None
      for _ in range(calls):
        result = fn()
      jax.block_until_ready(result)
      out[name].wall.append((time.perf_counter() - wall) / calls)
      out[name].cpu.append((time.process_time() - cpu) / calls)
  return out


def time_calls(fn: Callable[..., Any], *args: Any, repeats: int,
               warmup: int = 1, calls: int = 1) -> list[float]:
  """Seconds per call of `fn(*args)`: `warmup` untimed calls (compilation),
  then `repeats` timings of `calls` back-to-back calls each."""
  return interleaved({0: lambda: fn(*args)}, repeats, warmup=warmup,
                     calls=calls)[0].wall
