"""Layer scan: the LM's runs of identical blocks as one `nn.scan`, and the
conversions between its stacked variables and the unrolled model's.

Axis legend:
  N  scanned periods (the stacked leading axis, logical name "layers")
  P  blocks per period

The blocks of a `TransformerLM` follow a repeating pattern: block i has an
MoE MLP when `i >= first_dense_layers` and `(i + 1) % moe_every == 0`, and is
a routed MoD block when `(i + 1) % mod_every == 0`. From the first multiple
of `P = lcm(moe_every, mod_every)` at or after `first_dense_layers` on, every
P consecutive blocks are alike, so with `scan_layers` the model runs
`ScanPlan.periods` such periods as one `nn.scan` whose body holds P blocks
(`block_0` .. `block_{P-1}`, each under `nn.remat` per the remat policy);
the blocks before (the dense prefix) and the ones left after the last whole
period stay unrolled (`layers_{i}`). XLA then compiles one period instead of
every layer, and keeps one period's recomputed activations live in the
backward pass instead of every layer's.

Every variable collection of a scanned block is stacked on a leading axis N
under the scan's module name (`ScanPlan.name`, e.g. `scan_0_1`: the scan
starts at block 0, in periods of 1 block): params (their logical names gain
"layers" in front, `moejax.sharding` maps it to no mesh axis), the routers'
controller state (`router_state`), the sown router outputs and the decoding
cache. `unstack_layers` turns any such tree into the unrolled model's layout
(`layers_{i}` for every block; the name says where the scan starts and its
period, so no config is needed), `stack_layers` the reverse.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYERS_AXIS = "layers"  # the logical name of the stacked axis N
_SCAN_NAME = re.compile(r"^scan_(\d+)_(\d+)$")
_BLOCK_NAME = re.compile(r"^block_(\d+)$")


@dataclasses.dataclass(frozen=True)
class ScanPlan:
  """Blocks `start .. start + periods * period - 1` scanned, `period` a
  body."""
  start: int
  period: int
  periods: int

  @property
  def name(self) -> str:
    """The scan's module name (and key of its stacked variables)."""
    return f"scan_{self.start}_{self.period}"

  @property
  def stop(self) -> int:
    """The first block after the scanned ones."""
    return self.start + self.periods * self.period

  def layer(self, k: int, j: int) -> int:
    """The block index of body block j in period k."""
    return self.start + k * self.period + j


def scan_plan(cfg: Any) -> ScanPlan | None:
  """The `ScanPlan` of an `LMConfig` with `scan_layers`, or None (scan off,
  or fewer blocks than one period after the dense prefix: all unrolled)."""
  if not getattr(cfg, "scan_layers", False):
    return None
  period = math.lcm(cfg.moe_every if cfg.moe is not None else 1,
                    cfg.mod_every if cfg.mod is not None else 1)
  start = -(-cfg.first_dense_layers // period) * period
  periods = (cfg.num_layers - start) // period
  return ScanPlan(start, period, periods) if periods >= 1 else None


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack(*leaves):
  if _is_box(leaves[0]):
    return leaves[0].replace(
        value=jnp.stack([b.value for b in leaves]),
        names=(LAYERS_AXIS, *leaves[0].names))
  return jnp.stack(leaves)


def _take(leaf, k: int):
  if _is_box(leaf):
    return leaf.replace(value=leaf.value[k], names=tuple(leaf.names[1:]))
  return leaf[k]


def _leading(tree) -> int:
  leaf = jax.tree.leaves(tree, is_leaf=_is_box)[0]
  return (leaf.value if _is_box(leaf) else leaf).shape[0]


def stack_layers(tree: Any, plan: ScanPlan | None) -> Any:
  """A tree keyed by module name (params, router_state, the sown "router"
  collection, a cache) in the unrolled layout -> the scanned model's: the
  scanned blocks' `layers_{i}` entries stacked (axis 0) under `plan.name`.
  Identity for None. Blocks without entries (e.g. dense blocks' controller
  state) stay without."""
  if plan is None or not isinstance(tree, dict):
    return tree
  out = {k: v for k, v in tree.items()
         if not (k.startswith("layers_") and k[7:].isdigit()
                 and plan.start <= int(k[7:]) < plan.stop)}
  body = {}
  for j in range(plan.period):
    parts = [tree.get(f"layers_{plan.layer(k, j)}")
             for k in range(plan.periods)]
    if all(p is None for p in parts):
      continue
    if any(p is None for p in parts):
      raise ValueError(f"block {j} of the scanned period has entries in "
                       "some periods only; the tree does not fit scan_layers")
    body[f"block_{j}"] = jax.tree.map(_stack, *parts, is_leaf=_is_box)
  if body:
    out[plan.name] = body
  return out


def unstack_layers(tree: Any) -> Any:
  """The reverse of `stack_layers`: every `scan_{start}_{period}` entry of a
  scanned model's tree split into `layers_{i}` entries (the unrolled
  layout). Trees without one are returned as they are."""
  if not isinstance(tree, dict) or not any(
      _SCAN_NAME.match(str(k)) for k in tree):
    return tree
  out = {}
  for key, value in tree.items():
    match = _SCAN_NAME.match(str(key))
    if not match:
      out[key] = value
      continue
    start, period = int(match[1]), int(match[2])
    for block, sub in value.items():
      j = int(_BLOCK_NAME.match(block)[1])
      for k in range(_leading(sub)):
        out[f"layers_{start + k * period + j}"] = jax.tree.map(
            lambda a, k=k: _take(a, k), sub, is_leaf=_is_box)
  return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(key: str):
  """Sort key: layers in block order, other modules by name."""
  if key.startswith("layers_") and key[7:].isdigit():
    return (0, int(key[7:]), "")
  return (1, 0, key)


def scan_plan_of(tree: Any) -> ScanPlan | None:
  """The plan a scanned tree was stacked with (from its scan entry), or
  None when it has none."""
  if not isinstance(tree, dict):
    return None
  for key, value in tree.items():
    match = _SCAN_NAME.match(str(key))
    if match:
      return ScanPlan(int(match[1]), int(match[2]), _leading(value))
  return None
