"""Reading a compiled train step (both libraries): memory, XLA's cost,
collectives, the largest HLO instructions by bytes, the roofline step.

Axis legend: none (byte counts of whole arrays per chip).
"""
from __future__ import annotations

import math
import re


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s([a-z][\w-]*)\((.*)$")


def _bytes(text: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) *
             _DTYPE_BYTES[dt] for dt, dims in _SHAPE.findall(text))


def largest_instructions(hlo: str, top: int) -> list[dict]:
  """The `top` instructions of the scheduled computations (not fusion
  bodies) by bytes touched: result + operand shapes as printed in the HLO
  text (an estimate of what XLA's `bytes accessed` counts per op)."""
  fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo))
  rows, skip = [], False
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      skip = head.group(1) in fused
      continue
    if skip:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, result, opcode, rest = m.groups()
    if opcode in ("parameter", "constant", "get-tuple-element", "tuple",
                  "bitcast"):
      continue
    args = rest.split("), ")[0] if "), " in rest else rest
    source = re.search(r'op_name="([^"]*)"', line)
    rows.append({"name": name, "opcode": opcode,
                 "bytes": _bytes(result) + _bytes(args),
                 "result": " ".join(f"{d}[{s}]" for d, s in
                                    _SHAPE.findall(result))[:120],
                 "op_name": source.group(1)[-160:] if source else ""})
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:top]


def shard_bytes(leaves) -> int:
  import numpy as np
  total = 0
  for x in leaves:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      continue
    try:
      itemsize = np.dtype(x.dtype).itemsize
    except TypeError:  # PRNG key arrays (a few bytes)
      continue
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    total += math.prod(shape) * itemsize
  return total


def summarize(compiled, chip, devices: int, state_bytes: int,
              model_flops: float, top_ops: int = 25) -> dict:
  """Memory, cost, collectives, roofline and the `top_ops` largest
  instructions of one compiled step."""
  from moejax import aot
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  hlo = compiled.as_text()
  coll = aot.hlo_collectives(hlo)
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
          mem.output_size_in_bytes - mem.alias_size_in_bytes)
  traffic = sum(c["traffic"] for c in coll.values())
  flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  return {"state_bytes": int(state_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "peak_bytes": int(peak), "flops": flops,
          "bytes_accessed": accessed, "ici_traffic_bytes": traffic,
          "model_flops": model_flops, "collectives": coll,
          "top_ops": largest_instructions(hlo, top_ops),
          "estimate": aot.estimate_step(flops, accessed, traffic,
                                        model_flops, chip)}


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "libtpu", "flax", "maxtext"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


# ----------------------------------------------------------------------------
# moejax
