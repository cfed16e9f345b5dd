"""What a compiled train step costs per device: FLOPs, HBM bytes accessed
and collectives, and where each number comes from.

Axis legend:
  n  devices in one replica group of a collective

`hlo_collectives(compiled.as_text())` counts each kind of collective
(all-to-all, all-gather, reduce-scatter, all-reduce, collective-permute) with
its per-device result bytes and the bytes a device sends for it
(`moejax.aot`'s roofline reads the latter as ICI traffic). `step_cost` reads
XLA's cost analysis, or for a layer-scanned model (whose loop body XLA counts
once) the unrolled step's, compiled at one and two periods and extrapolated
(`extrapolate`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from moejax import flops as flops_lib
from moejax.models.scan import scan_plan
from moejax.nn.blocks import REMAT_POLICIES

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s("
                 r"all-to-all|all-gather|reduce-scatter|all-reduce|"
                 r"collective-permute)(-start)?\(")
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    if dtype in _DTYPE_BYTES:
      out.append(math.prod(int(d) for d in dims.split(",") if d) *
                 _DTYPE_BYTES[dtype])
  return out


def _group_size(line: str) -> int:
  """Devices per replica group of one HLO collective line."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  # mesh[axis sizes] [, device_ids=(...)] {axes of one group}
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'",
                                                       m.group(2)))
  return 2 if "source_target_pairs" in line else 1


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Collectives of a compiled HLO module, per kind: count, bytes, traffic.

  One logical collective per channel id, source (`op_name` and stack frame
  of its metadata) and result shapes: XLA:TPU clones a collective into several
  async fusions under one channel id, while the collectives of a
  `jax.shard_map` may all carry channel id 1; `-done` halves of async pairs
  are not counted. `bytes` is the per-device result size (for all-gather-start
  the gathered output, for collective-permute-start the moved buffer);
  `traffic` the bytes a device sends for it in a ring/pairwise algorithm over
  a group of n devices: all-gather (n-1)/n x output, reduce-scatter (n-1) x
  output, all-reduce 2 (n-1)/n x size, all-to-all (n-1)/n x size,
  collective-permute the size. Collectives inside loop bodies count once.
  """
  out = {k: {"count": 0, "bytes": 0.0, "traffic": 0.0} for k in COLLECTIVES}
  seen = set()
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    result, kind, start = m.group(1), m.group(2), m.group(3)
    channel = re.search(r"channel_id=(\d+)", line)
    if channel:
      # Clones of one collective share its channel id and source metadata;
      # distinct collectives may share a channel id (those of a shard_map).
      source = re.search(r'op_name="([^"]*)"(?: stack_frame_id=(\d+))?', line)
      key = (kind, channel.group(1), source.groups() if source else None,
             tuple(_SHAPE.findall(result)))
      if key in seen:
        continue
      seen.add(key)
    sizes = _array_bytes(result)
    if not sizes:
      continue
    if start and kind == "all-gather":
      size = sizes[1] if len(sizes) > 1 else sizes[0]
    elif start and kind == "collective-permute":
      size = sizes[0]
    else:
      size = sum(sizes)
    n = max(_group_size(line), 1)
    share = (n - 1) / n
    traffic = {"all-gather": share * size, "reduce-scatter": (n - 1) * size,
               "all-reduce": 2 * share * size, "all-to-all": share * size,
               "collective-permute": size}[kind]
    out[kind]["count"] += 1
    out[kind]["bytes"] += size
    out[kind]["traffic"] += traffic
  return out


# Where each number of a report comes from (`step_cost`'s "cost_source").
XLA_SOURCE = "XLA cost analysis of the compiled step"
HLO_SOURCE = "the compiled step's HLO"


def _xla_cost(compiled) -> dict[str, Any]:
  """FLOPs, bytes accessed and collectives XLA reports for one program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {"flops_per_device": float(cost.get("flops", 0.0)),
          "hbm_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "collectives": hlo_collectives(compiled.as_text())}


def unrolled_depths(model) -> tuple[int, int, int] | None:
  """(d1, d2, period): the depths of the unrolled model whose compiles give
  a scanned model's costs (`step_cost`): the dense prefix, one (d1) or two
  (d2) periods of the scanned run and the blocks after it; None without a
  layer scan."""
  plan = scan_plan(model)
  if plan is None:
    return None
  d1 = plan.start + plan.period + model.num_layers - plan.stop
  return d1, d1 + plan.period, plan.period


def extrapolate(a: Any, b: Any, da: int, db: int, depth: int) -> Any:
  """Numbers of `a` (at depth da) and `b` (depth db) extended linearly to
  `depth`; nested dicts recursively, ints rounded, other values from `b`."""
  if isinstance(b, dict):
    return {k: extrapolate(a[k], v, da, db, depth) for k, v in b.items()}
  if isinstance(b, (int, float)) and not isinstance(b, bool):
    out = b + (b - a) * (depth - db) / (db - da)
    return int(round(out)) if isinstance(b, int) else out
  return b


def step_cost(cfg: Any, compiled, devices: int,
              compile_fn=None) -> dict[str, Any]:
  """FLOPs, HBM bytes accessed and collectives per device of one compiled
  train step of `cfg` (on `devices` devices), and "cost_source": where
  each came from.

  Unrolled models: XLA's cost analysis and the HLO's collectives. A layer
  scan (`scan_layers`) compiles to a while loop whose body XLA's cost
  analysis (and the HLO text) counts ONCE, undercounting the scanned blocks
  by the trip count (its memory analysis is right). Then the three come
  from the same step with the blocks unrolled, compiled by `compile_fn(cfg)`
  at one and two periods of the scan (`unrolled_depths`) and extrapolated
  linearly to the full depth (the periods are identical, so this is exact
  up to XLA fusing the two compiles differently). Without `compile_fn` the
  FLOPs are the analytic count instead (`moejax.flops`, x 4/3 with block
  remat: one more forward) and bytes and collectives XLA's undercounts,
  said so in "cost_source".
  """
  depths = unrolled_depths(cfg.model)
  if depths is None:
    return {**_xla_cost(compiled), "cost_source": {
        "flops_per_device": XLA_SOURCE, "hbm_bytes_accessed": XLA_SOURCE,
        "collectives": HLO_SOURCE}}
  d1, d2, _ = depths
  depth = cfg.model.num_layers
  if compile_fn is None:
    model_flops = flops_lib.train_flops(cfg.model, cfg.loop.batch_size,
                                        cfg.seq_len)
    remat = REMAT_POLICIES[cfg.model.remat].block
    out = _xla_cost(compiled)
    out["flops_per_device"] = (model_flops * (4 / 3 if remat else 1.0)
                               / devices)
    undercount = ("XLA, the scanned blocks counted once (an undercount; "
                  "compile_fn gives unrolled compiles)")
    out["cost_source"] = {
        "flops_per_device": "moejax.flops analytic count" + (
            " x 4/3 (block remat)" if remat else ""),
        "hbm_bytes_accessed": undercount, "collectives": undercount}
    return out
  costs = []
  for d in (d1, d2):
    model = dataclasses.replace(cfg.model, num_layers=d, scan_layers=False)
    costs.append(_xla_cost(compile_fn(dataclasses.replace(cfg, model=model))))
  out = extrapolate(costs[0], costs[1], d1, d2, depth)
  source = (f"the unrolled step compiled at {d1} and {d2} layers, "
            f"extrapolated to {depth} (XLA counts a scanned body once)")
  out["cost_source"] = dict.fromkeys(
      ("flops_per_device", "hbm_bytes_accessed", "collectives"), source)
  return out
