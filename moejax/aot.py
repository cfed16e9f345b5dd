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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax.models.lm import TransformerLM
from moejax.train.loop import TrainConfig, init_state, state_shardings
from moejax.train.step import make_train_step


def abstract_state(cfg: TrainConfig, mesh) -> Any:
  """The initial TrainState as sharded `ShapeDtypeStruct`s (no allocation)."""
  model = TransformerLM(cfg.model)
  boxed = jax.eval_shape(lambda rng: init_state(cfg, model, rng),
                         jax.random.PRNGKey(cfg.seed))
  shards = state_shardings(cfg, model, mesh)
  unboxed = nn.meta.unbox(boxed)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      unboxed, shards)


def abstract_batch(cfg: TrainConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """inputs/targets int32[B, L], mask float32[B, L], batch-sharded."""
  shape = (cfg.batch_size, cfg.seq_len)
  shard = sharding.batch_sharding(mesh)
  return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shard),
          "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shard),
          "mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shard)}


def lower_train_step(cfg: TrainConfig, mesh):
  """`jax.stages.Lowered` of one train step of `cfg` on `mesh` (abstract)."""
  sharding.check_batch(cfg.batch_size, mesh)
  sharding.check_model(cfg.model, mesh)
  model = TransformerLM(cfg.model)
  method = cfg.model.moe.router if cfg.model.moe is not None else None
  with jax.set_mesh(mesh):
    step = make_train_step(model, cfg.optim.optimizer(), method,
                           cfg.optim.schedule(),
                           state_sharding=state_shardings(cfg, model, mesh))
    return step.lower(abstract_state(cfg, mesh), abstract_batch(cfg, mesh))


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
  from the token layout (G over data x expert) to the expert layout (G over
  data, E over expert) and back: per device a buffer of `G E C D / (data *
  expert)` elements, of which the fraction `(X - 1) / X` leaves the device
  (X = expert axis size), twice in the forward pass and twice more in the
  backward (the transposed all-to-alls). Devices along `model` hold the same
  tokens and each sends its copy. Returns per-device bytes per layer and per
  step, and the total over all devices per step (0 when X = 1).
  """
  moe = cfg.model.moe
  if moe is None:
    return {"per_layer_per_device": 0.0, "per_step_per_device": 0.0,
            "per_step_total": 0.0}
  x_size = mesh_sizes.get("expert", 1)
  shards = mesh_sizes.get("data", 1) * x_size
  group = moe.group_size or cfg.seq_len
  groups = cfg.batch_size * cfg.seq_len // group
  if moe.strategy in ("einsum", "index", "gather"):
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
