"""Abstract (shape-only) train steps: parameter counts, AOT lowering and
compilation of big configs without materialising them.

Axis legend:
  B  global batch
  L  sequence length
  E  experts

`abstract_state(cfg, mesh)` is the `TrainState` as `jax.ShapeDtypeStruct`s
carrying their `NamedSharding`s (from `jax.eval_shape`, nothing allocated);
`lower_train_step(cfg, mesh)` lowers one jitted train step on those abstract
inputs (`jax.jit(...).lower(...)`), so `.compile()` checks that a pod-sized
config partitions, and reports its per-device memory, on any machine that has
as many devices as the mesh (e.g. 8 forced host devices standing in for a pod
mesh with the same axis names).

`compile_report(cfg, topology)` is `--compile_only` of the training script:
the run's own step compiled for a TPU slice (or the local devices), with the
per-device memory against the capacity, the FLOPs, and the estimated step
time and MFU (`format_report` prints it).

With `libtpu` installed (`pip install -e ".[tpu]"`), `topology_devices(name)`
gives the devices of a TPU slice (e.g. "v5p-64") on a machine without a TPU
(`jax.experimental.topologies`), `compile_for_topology` compiles the step for
them (real TPU HLO), and `tpu_report` reads the compiled step: per-device HBM
against the chip's capacity, XLA's FLOPs, the collectives of the HLO
(`hlo_collectives`) and a roofline step-time / MFU estimate (`estimate_step`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from moejax import dispatch
from moejax import flops as flops_lib
# The cost helpers are part of this module's interface.
from moejax.hlo import (COLLECTIVES, HLO_SOURCE, XLA_SOURCE,  # noqa: F401
                        extrapolate, hlo_collectives, step_cost,
                        unrolled_depths)
from moejax import platforms
from moejax import sharding
from moejax.models.lm import TransformerLM
from moejax.tasks.lm import TrainConfig
from moejax.train import loop
from moejax.train.loop import init_state, state_shardings


def abstract_state(cfg: TrainConfig, mesh) -> Any:
  """The initial TrainState as sharded `ShapeDtypeStruct`s (no allocation)."""
  model = TransformerLM(cfg.model)
  boxed = jax.eval_shape(lambda rng: init_state(cfg, model, rng),
                         jax.random.PRNGKey(cfg.loop.seed))
  shards = state_shardings(cfg, model, mesh)
  unboxed = nn.meta.unbox(boxed)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      unboxed, shards)


def abstract_batch(cfg: TrainConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """inputs/targets int32[B, L], mask float32[B, L], batch-sharded; packed
  token data (`TrainConfig.packed` with `packing`) adds segment_ids and
  positions int32[B, L], as its batches have."""
  shape = (cfg.loop.batch_size, cfg.seq_len)
  shard = sharding.batch_sharding(mesh)
  keys = {"inputs": jnp.int32, "targets": jnp.int32, "mask": jnp.float32}
  if getattr(cfg, "packed", False) and getattr(cfg, "packing", False):
    keys.update(segment_ids=jnp.int32, positions=jnp.int32)
  return {k: jax.ShapeDtypeStruct(shape, t, sharding=shard)
          for k, t in keys.items()}


def lower_train_step(cfg: TrainConfig, mesh):
  """`jax.stages.Lowered` of one train step of `cfg` on `mesh` (abstract)."""
  cfg.task().check(mesh)  # batch, grad_accum and model against the mesh
  model = TransformerLM(cfg.model)
  # Shapes first, outside the mesh context: anything evaluated eagerly there
  # would be placed on the mesh's devices, which this process may be unable
  # to run on (a TPU topology compiled for from a CPU host).
  state, batch = abstract_state(cfg, mesh), abstract_batch(cfg, mesh)
  # The training loop's own step (donation, loss, state shardings).
  step = loop.make_step(cfg, model, mesh)
  with jax.set_mesh(mesh):
    return step.lower(state, batch)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts of an LM config.

  Attributes:
    total: every parameter.
    routed: the routed experts' parameters (all E of every MoE layer).
    active: parameters one token uses: total - routed * (1 - fanout / E),
      with fanout the router's target mean fanout (shared experts, attention,
      embeddings and routers count in full).
    embedding: token embedding and output head.
  """
  total: int
  routed: int
  active: int
  embedding: int

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def count_params(cfg: TrainConfig) -> ParamCount:
  """Counts parameters from shapes only (`jax.eval_shape`)."""
  model = TransformerLM(cfg.model)
  tokens = jax.ShapeDtypeStruct((1, min(cfg.seq_len, 8)), jnp.int32)
  variables = jax.eval_shape(
      lambda t: model.init({"params": jax.random.PRNGKey(0),
                            "router": jax.random.PRNGKey(0)}, t, train=False),
      tokens)
  params = nn.meta.unbox(variables["params"])
  flat = flax.traverse_util.flatten_dict(params)
  sizes = {path: math.prod(v.shape) for path, v in flat.items()}
  total = sum(sizes.values())
  routed = sum(n for path, n in sizes.items() if "experts" in path)
  embedding = sum(n for path, n in sizes.items()
                  if path[0] in ("embed", "head"))
  moe = cfg.model.moe
  active = total
  if moe is not None:
    fanout = moe.router.target_fanout
    active = total - int(round(routed * (1 - fanout / moe.num_experts)))
  return ParamCount(total=total, routed=routed, active=active,
                    embedding=embedding)


def compiled_summary(compiled) -> dict[str, Any]:
  """Per-device memory and FLOPs of a compiled step (where XLA reports them)."""
  out: dict[str, Any] = {}
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      for key in ("argument_size_in_bytes", "output_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes"):
        if hasattr(mem, key):
          out[key] = int(getattr(mem, key))
  except Exception:  # noqa: BLE001 - not every backend reports memory
    pass
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if cost and "flops" in cost:
      out["flops_per_device"] = float(cost["flops"])
  except Exception:  # noqa: BLE001
    pass
  return out


def all_to_all_bytes(cfg: TrainConfig, mesh_sizes: dict[str, int],
                     train: bool = True) -> dict[str, float]:
  """Bytes one device sends by all-to-all in one train step, from shapes.

  Each MoE layer moves its expert buffers `[G, E, C, D]` (activation dtype)
  from the token layout (G over data x fsdp x expert) to the expert layout
  (G over data x fsdp, E over expert) and back: per device a buffer of
  `G E C D / (data * fsdp * expert)` elements, of which the fraction
  `(X - 1) / X` leaves the device (X = expert axis size), twice in the
  forward pass and twice more in the backward (the transposed all-to-alls). Devices along `model` hold the same
  tokens and each sends its copy. Returns per-device bytes per layer and per
  step, and the total over all devices per step (0 when X = 1).
  """
  moe = cfg.model.moe
  if moe is None:
    return {"per_layer_per_device": 0.0, "per_step_per_device": 0.0,
            "per_step_total": 0.0}
  x_size = mesh_sizes.get("expert", 1)
  shards = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1) * x_size
  group = moe.group_size or cfg.seq_len
  groups = cfg.loop.batch_size * cfg.seq_len // group
  if dispatch.choose_strategy(moe.strategy) in ("einsum", "index", "gather"):
    cap = moe.router.capacity(group, moe.router_experts,
                              moe.capacity_factor if train
                              else moe.eval_capacity_factor)
  else:  # dropless under shard_map: static bound C = S
    cap = group
  itemsize = np.dtype(jnp.dtype(cfg.model.dtype)).itemsize
  buffer = groups * moe.num_experts * cap * cfg.model.d_model * itemsize
  per_device = buffer / shards * (x_size - 1) / x_size
  passes = 4 if train else 2
  per_layer = per_device * passes
  layers = cfg.model.num_moe_layers
  devices = shards * mesh_sizes.get("model", 1)
  return {"per_layer_per_device": per_layer,
          "per_step_per_device": per_layer * layers,
          "per_step_total": per_layer * layers * devices,
          "capacity": cap, "groups": groups}


# ----------------------------------------------------------------------------
# TPU slices without a TPU: topology devices, compiled-step analysis, roofline.


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's public peak figures (per chip, bfloat16).

  Attributes:
    name: e.g. "TPU v5p".
    peak_flops: dense bfloat16 FLOP/s.
    hbm_bytes: HBM capacity.
    hbm_bandwidth: HBM bytes/s.
    ici_bandwidth: inter-chip interconnect bytes/s of the chip, all links and
      both directions together (the vendor's per-chip Gbps / 8).
  """
  name: str
  peak_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  ici_bandwidth: float


GIB = 2**30
# Peak FLOP/s from the one table of `moejax.flops` (by device kind).
CHIPS = {
    "v5e": Chip("TPU v5e", flops_lib.PEAK_FLOPS["TPU v5 lite"], 16 * GIB,
                819e9, 1600e9 / 8),
    "v5p": Chip("TPU v5p", flops_lib.PEAK_FLOPS["TPU v5"], 95 * GIB, 2765e9,
                4800e9 / 8),
    "v6e": Chip("TPU v6e", flops_lib.PEAK_FLOPS["TPU v6 lite"], 32 * GIB,
                1640e9, 3584e9 / 8),
}

# Slice name -> (chip, topology name for `get_topology_desc`). v5e/v6e slice
# names count chips, v5p names count TensorCores (two per chip).
TOPOLOGIES = {
    "v5e-4": ("v5e", "v5e:2x2"), "v5e-8": ("v5e", "v5e:2x4"),
    "v5e-16": ("v5e", "v5e:4x4"), "v5e-64": ("v5e", "v5e:8x8"),
    "v5e-256": ("v5e", "v5e:16x16"),
    "v5p-8": ("v5p", "v5:2x2x1"), "v5p-64": ("v5p", "v5:2x4x4"),
    "v5p-128": ("v5p", "v5:4x4x4"), "v5p-256": ("v5p", "v5:4x4x8"),
    "v6e-4": ("v6e", "v6e:2x2"), "v6e-64": ("v6e", "v6e:8x8"),
    "v6e-256": ("v6e", "v6e:16x16"),
}


def topology_devices(name: str):
  """(Chip, devices) of a TPU slice, e.g. "v5p-64" or "v5e:2x2".

  The devices come from `jax.experimental.topologies.get_topology_desc`
  (needs `libtpu`, no TPU): they can be put in a mesh and compiled for, not
  run on. Raises ValueError for an unknown name and ImportError without libtpu.
  """
  if name in TOPOLOGIES:
    chip, topology = TOPOLOGIES[name]
  else:
    gen = name.split(":", 1)[0]
    chip = {"v5": "v5p", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}.get(gen)
    if chip is None or ":" not in name:
      raise ValueError(f"topology={name!r} is unknown; allowed: "
                       f"{', '.join(TOPOLOGIES)} or GEN:AxB[xC] with GEN in "
                       "v5e, v5 (v5p), v6e")
    topology = "v5:" + name.split(":", 1)[1] if chip == "v5p" else name
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError as e:
    raise ImportError("compiling for a TPU topology needs libtpu: "
                      'pip install -e ".[tpu]"') from e
  # Compiling needs no TPU: do not wait for the lock libtpu takes for a TPU
  # (held by any process that loaded libtpu); without a TPU, load it quietly.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  platforms.quiet_libtpu_env()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  return CHIPS[chip], list(desc.devices)


def topology_mesh(spec: str, devices):
  """A (data, fsdp, expert, model) mesh over TPU topology devices, laid out
  on the physical torus by `mesh_utils.create_device_mesh` (the model axis
  innermost, on the nearest chips)."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  sizes = sharding.parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, sharding.MESH_AXES)


def _shard_bytes(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def state_bytes(cfg: TrainConfig, mesh) -> dict[str, int]:
  """Per-device bytes of the params and the optimizer state (shard shapes)."""
  state = abstract_state(cfg, mesh)
  return {"params_bytes": _shard_bytes(state.params),
          "optimizer_bytes": _shard_bytes(state.opt_state)}


def estimate_step(flops_per_device: float, hbm_bytes_per_device: float,
                  ici_traffic_per_device: float, model_flops_per_device: float,
                  chip: Chip) -> dict[str, float]:
  """Roofline step time: the largest of compute, HBM and ICI times.

  compute = XLA's FLOPs / peak, hbm = XLA's bytes accessed / HBM bandwidth,
  ici = collective traffic / the chip's ICI bandwidth; the step takes at least
  the largest of the three (perfect overlap; the sum is the no-overlap bound).
  MFU = model FLOPs (`moejax.flops`, 3 x forward) / (step x peak).
  """
  compute = flops_per_device / chip.peak_flops
  hbm = hbm_bytes_per_device / chip.hbm_bandwidth
  ici = ici_traffic_per_device / chip.ici_bandwidth
  step = max(compute, hbm, ici)
  total = compute + hbm + ici
  return {"compute_s": compute, "hbm_s": hbm, "ici_s": ici, "step_s": step,
          "step_no_overlap_s": total,
          "bound": ("compute", "hbm", "ici")[int(np.argmax([compute, hbm,
                                                            ici]))],
          "mfu": model_flops_per_device / (step * chip.peak_flops)
                 if step > 0 else 0.0,
          "mfu_no_overlap": model_flops_per_device / (total * chip.peak_flops)
                            if total > 0 else 0.0}


def tpu_report(cfg: TrainConfig, compiled, mesh, chip: Chip,
               compile_fn=None) -> dict[str, Any]:
  """Per-device memory, FLOPs, collectives and roofline of a compiled step.

  Memory: params and optimizer from the state's shard shapes; `temp_bytes`
  (XLA's temporaries: the activations kept for the backward pass and every
  intermediate buffer) from `memory_analysis()`; `hbm_peak_bytes` = arguments
  + temporaries + outputs not aliased to (donated) arguments, against the
  chip's HBM. FLOPs, bytes accessed and collectives: `step_cost` (a
  scanned model's from unrolled compiles by `compile_fn`), with their
  sources in "cost_source".
  """
  mem = compiled.memory_analysis()
  devices = mesh.devices.size
  cost = step_cost(cfg, compiled, devices, compile_fn)
  coll = cost["collectives"]
  model_flops = flops_lib.train_flops(cfg.model, cfg.loop.batch_size,
                                      cfg.seq_len) / devices
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
          mem.output_size_in_bytes - mem.alias_size_in_bytes)
  row = {**state_bytes(cfg, mesh),
         "argument_bytes": int(mem.argument_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes),
         "hbm_peak_bytes": int(peak), "hbm_capacity_bytes": chip.hbm_bytes,
         "fits": bool(peak <= chip.hbm_bytes),
         "flops_per_device": cost["flops_per_device"],
         "model_flops_per_device": float(model_flops),
         "hbm_bytes_accessed": cost["hbm_bytes_accessed"],
         "collectives": coll, "cost_source": cost["cost_source"]}
  traffic = sum(c["traffic"] for c in coll.values())
  row["ici_traffic_bytes"] = traffic
  row["estimate"] = estimate_step(row["flops_per_device"],
                                  row["hbm_bytes_accessed"], traffic,
                                  model_flops, chip)
  return row


def compile_for_topology(cfg: TrainConfig, topology: str, mesh_spec: str):
  """(compiled step, mesh, chip) of `cfg` on a TPU slice (see
  `topology_devices`), ahead of time on this host."""
  chip, devices = topology_devices(topology)
  mesh = topology_mesh(mesh_spec, devices)
  return lower_train_step(cfg, mesh).compile(), mesh, chip


# ----------------------------------------------------------------------------
# --compile_only: the exact run compiled for a slice or the local devices.

# Chip of each TPU device kind (`device.device_kind`).
CHIP_OF_KIND = {"TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e"}


def device_capacity(device) -> int | None:
  """Memory bytes one device has: the accelerator's limit
  (`memory_stats()["bytes_limit"]`), for a CPU device the host's memory
  divided among the local devices; None when unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - not every backend reports memory
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
    return int(host // max(1, jax.local_device_count()))
  return None


def compile_report(cfg: TrainConfig, topology: str | None = None
                   ) -> dict[str, Any]:
  """Compiles one train step of `cfg` (the loop's step, abstract inputs) and
  reports per device: params / optimizer / temporaries / total bytes against
  the capacity (`fits`), XLA's and the model's FLOPs, and the estimated step
  time and MFU.

  With `topology` (e.g. "v5p-64"; needs libtpu, no TPU) for that TPU slice on
  the run's mesh (`topology_mesh`); else for the local devices of the run
  (`cfg.loop.mesh`, `cfg.loop.num_devices`). The estimate is
  `estimate_step`'s roofline on a TPU chip, compute time at the device's peak
  (`moejax.flops`) on other accelerators, none on a CPU.

  Raises:
    ValueError: unknown topology, or the run does not fit the mesh.
    ImportError: a topology without libtpu installed.
  """
  cfg = cfg.task().config  # as the loop trains it (e.g. the tokenizer's vocab)
  if topology:
    chip, devices = topology_devices(topology)
    mesh = topology_mesh(cfg.loop.mesh, devices)
    capacity = chip.hbm_bytes
    where = f"{topology} ({len(devices)} x {chip.name})"
  else:
    devices = loop.select_devices(cfg.loop.num_devices)
    mesh = sharding.make_mesh(cfg.loop.mesh, devices)
    kind = devices[0].device_kind
    chip = CHIPS.get(CHIP_OF_KIND.get(kind, ""))
    capacity = device_capacity(devices[0])
    where = f"{len(devices)} local {kind} device(s)"
  n = mesh.devices.size
  model_flops = flops_lib.train_flops(cfg.model, cfg.loop.batch_size,
                                      cfg.seq_len) / n
  row: dict[str, Any] = {
      "where": where, "mesh": sharding.mesh_spec(mesh), "devices": n,
      **state_bytes(cfg, mesh), "flops_per_device": 0.0,
      "model_flops_per_device": float(model_flops),
      "capacity_bytes": capacity}
  try:
    compiled = lower_train_step(cfg, mesh).compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA:TPU refuses a program whose buffers exceed the HBM.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    line = str(e).strip().splitlines()[0]
    return {**row, "fits": False, "error": line.split(": ", 1)[-1]}
  mem = compiled.memory_analysis()
  cost = step_cost(cfg, compiled, n,
                   lambda c: lower_train_step(c, mesh).compile())
  row["flops_per_device"] = cost["flops_per_device"]
  row["cost_source"] = cost["cost_source"]
  if mem is not None:
    row["temp_bytes"] = int(mem.temp_size_in_bytes)
    row["total_bytes"] = int(mem.argument_size_in_bytes +
                             mem.temp_size_in_bytes +
                             mem.output_size_in_bytes -
                             mem.alias_size_in_bytes)
  total = row.get("total_bytes")
  row["fits"] = None if total is None or capacity is None else bool(
      total <= capacity)
  if chip is not None:
    traffic = sum(c["traffic"] for c in cost["collectives"].values())
    row["estimate"] = estimate_step(
        row["flops_per_device"], cost["hbm_bytes_accessed"], traffic,
        model_flops, chip)
  else:
    peak = flops_lib.peak_flops(devices[0].device_kind)
    if peak and row["flops_per_device"]:
      step = row["flops_per_device"] / peak
      row["estimate"] = {"step_s": step, "bound": "compute",
                         "mfu": model_flops / (step * peak)}
  return row


def _gib(x: float) -> str:
  """Bytes in GiB, or MiB below 1 GiB."""
  return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / 2**20:.1f} MiB"


def format_report(row: dict[str, Any]) -> str:
  """The lines `--compile_only` prints for a `compile_report` row."""
  fits = {True: "fits", False: "does NOT fit",
          None: "fits (capacity unknown)"}[row["fits"]]
  lines = [f"compiled for {row['where']}, mesh {row['mesh']}: {fits}"]
  mem = (f"params {_gib(row['params_bytes'])} + optimizer "
         f"{_gib(row['optimizer_bytes'])}")
  if "temp_bytes" in row:
    mem += (f" + temporaries {_gib(row['temp_bytes'])}; total "
            f"{_gib(row['total_bytes'])}")
  if row["capacity_bytes"]:
    mem += f" of {_gib(row['capacity_bytes'])}"
  lines.append(f"memory per device: {mem}")
  if "error" in row:  # no program: XLA refused it
    lines.append(f"XLA: {row['error']}")
    lines.append(f"model FLOPs per step per device: "
                 f"{row['model_flops_per_device']:.3g}")
    return "\n".join(lines)
  lines.append(f"FLOPs per step per device: {row['flops_per_device']:.3g} "
               f"(XLA), model {row['model_flops_per_device']:.3g}")
  sources = dict.fromkeys(row.get("cost_source", {}).values())
  if sources and list(sources) != [XLA_SOURCE, HLO_SOURCE]:
    lines.append("FLOPs / bytes / collectives from: " + "; ".join(
        f"{', '.join(k for k, v in row['cost_source'].items() if v == s)}:"
        f" {s}" for s in sources))
  est = row.get("estimate")
  if est:
    lines.append(f"estimated step time: {est['step_s'] * 1e3:.3g} ms "
                 f"({est['bound']}-bound), MFU {100 * est['mfu']:.1f}%")
  else:
    lines.append("estimated step time: unknown (no peak FLOP/s for this "
                 "device)")
  return "\n".join(lines)
