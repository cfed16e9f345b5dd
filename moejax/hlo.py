"""Collectives of a compiled XLA HLO module, read from its text.

Axis legend:
  n  devices in one replica group of a collective

`hlo_collectives(compiled.as_text())` counts each kind of collective
(all-to-all, all-gather, reduce-scatter, all-reduce, collective-permute) with
its per-device result bytes and the bytes a device sends for it
(`moejax.aot`'s roofline reads the latter as ICI traffic).
"""
from __future__ import annotations

import math
import re

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
