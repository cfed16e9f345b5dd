"""Expert parallelism: a batch of routed groups through the experts on a mesh.

Axis legend:
  G   groups (global)
  Gl  groups on one device (G / (data * fsdp * expert))
  S   tokens in one group
  E   experts
  El  experts on one device (E / expert)
  X   size of the mesh's `expert` axis
  C   capacity (slots per expert)
  D   model width
  F   expert width (Fl = F / model on one device)
  M   rows of the dropless layout

Two ways behind one switch (`MoEConfig.expert_parallel`):

  "gspmd"      each device plans its own groups at once (a `jax.shard_map`
               over the batch axes `data` x `fsdp` x `expert`: one "gather"
               plan with `num_groups` = its Gl groups, capacity per group
               and expert); the expert buffers of the slot strategies get
               sharding constraints (token side: G over data x fsdp x expert;
               expert side: G over data x fsdp, E over expert), and GSPMD
               inserts the all-to-all between them. "gather" lays them out
               expert-major (its plans' rows e * Gl + g: each expert's slots
               of a device's groups together, the blocks the all-to-all
               moves) as `[X, E, Gd, Gl, C, D]` (G split over data x fsdp
               x expert, Gd = data x fsdp), so
               that an expert-side shard `[X, El, 1, Gl, C, D]` is what the
               all-to-all delivers, source-major, with no layout copy;
               "einsum" and "index" plan per group (vmap), `[G, E, C, D]`.
               "sorted", and "gather" on a mesh without `expert` and
               `model` axes, run each device's groups through
               the single-device path (the whole expert weights, gathered
               by GSPMD where they are sharded);
               "ragged" sorts all G * S tokens at once (`ragged_dot` has no
               G batching rule).
  "shard_map"  an explicit `jax.shard_map` over the current mesh: each device
               plans its groups (as above) into the expert-major
               `[E, Gl, C, D]` (per-group plans: transposed),
               `jax.lax.all_to_all` over `expert` sends each device's block
               of E/X experts to it ([E, Gl, C, D] -> [X * El, Gl, C, D],
               source-major: no layout copy on either side), the local
               experts run on [X, El, Gl, C, D] (a `psum` over `model`
               completes the F-sharded matmul), and a second all-to-all
               brings the outputs back. The expert weights enter split E
               over `expert` and F over `model` (GSPMD gathers their
               `fsdp` shards first). Buffers are static:
               capacity C for the slot strategies; the dropless strategies
               ("dropless", "sorted", "ragged") use "index" slots with the
               static bound C = S (a token reaches an expert at most once, so
               nothing can drop), at E/k times the buffer of a capacity
               factor of 1.

Without a mesh (`jax.set_mesh`) both run the same local computation, so models
are unchanged on one device.

`routed_experts` resolves the strategy and chooses its path once
(`_choose_path`): `_single_device_path`, `_per_device_path`, `_gspmd_path` or
`_shard_map_path`.
"""
from __future__ import annotations

import functools
import math
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from moejax import dispatch, experts, sharding
from moejax.routing.base import Routing

Mode = Literal["gspmd", "shard_map"]
MODES: tuple[str, ...] = typing.get_args(Mode)
# Strategies whose plans use the capacity-bounded [E, C, D] layout.
SLOT_STRATEGIES = dispatch.SLOT_STRATEGIES


def _flat(routing: Routing) -> Routing:
  """float32[G, S, E] gates/priority -> float32[G * S, E]."""
  num_experts = routing.gates.shape[-1]
  return Routing(gates=routing.gates.reshape(-1, num_experts),
                 priority=routing.priority.reshape(-1, num_experts))


def group_plans(routing: Routing, capacity: int, strategy: str,
                max_fanout: int | None, expert_major: bool = False):
  """Plans of G groups with capacity C per group and expert: one "gather"
  plan over all G * S tokens (`num_groups` = G; rows e * G + g when
  `expert_major`, see `dispatch.plan`), per-group plans (vmap) for "einsum"
  and "index". Use with `dispatch_groups` / `combine_groups` (group-major)
  or the shard_map path's expert-major layout."""
  if strategy == "gather":
    return dispatch.plan(_flat(routing), capacity, strategy=strategy,
                         max_fanout=max_fanout,
                         num_groups=routing.gates.shape[0],
                         expert_major=expert_major)
  return jax.vmap(lambda r: dispatch.plan(r, capacity, strategy=strategy,
                                          max_fanout=max_fanout))(routing)


def _gathered(plans) -> tuple[int, int, int] | None:
  """(G, S, E) of a "gather" plan over all groups, None for vmapped plans."""
  if not isinstance(plans, dispatch.GatherPlan) or plans.gates.ndim != 2:
    return None
  num_experts = plans.gates.shape[-1]
  num_groups = plans.token_index.shape[0] // num_experts
  return num_groups, plans.gates.shape[0] // num_groups, num_experts


def dispatch_groups(plans, x: jax.Array) -> jax.Array:
  """x float[G, S, D] -> float[G, E, C, D] through `group_plans`."""
  shape = _gathered(plans)
  if shape is None:
    return jax.vmap(lambda p, xg: p.dispatch(xg))(plans, x)
  num_groups, _, num_experts = shape
  h = plans.dispatch(x.reshape(-1, x.shape[-1]))
  return h.reshape(num_groups, num_experts, *h.shape[1:])


def combine_groups(plans, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """y float[G, E, C, D] -> (float[G, S, D], kept bool[G, S, E])."""
  shape = _gathered(plans)
  if shape is None:
    return jax.vmap(lambda p, yg: p.combine(yg))(plans, y), plans.kept
  num_groups, num_tokens, num_experts = shape
  out = plans.combine(y.reshape(-1, *y.shape[2:]))
  return (out.reshape(num_groups, num_tokens, -1),
          plans.kept.reshape(num_groups, num_tokens, num_experts))


def _batch_shards(num_groups: int):
  """(mesh, batch axes) when the groups split evenly over the mesh's batch
  axes (data x fsdp x expert) of a mesh of more than one device, else
  None."""
  mesh = sharding.current_mesh()
  if mesh is None:
    return None
  sizes = dict(mesh.shape)
  if math.prod(sizes.values()) == 1:
    return None
  axes = tuple(a for a in sharding.BATCH_AXES if a in sizes)
  shards = math.prod(sizes[a] for a in axes)
  if not axes or num_groups % shards:
    return None
  return mesh, axes


def _stacked(tree):
  """Each leaf with a leading axis of one (per-device leaves of any rank
  leave a shard_map stacked over devices)."""
  return jax.tree.map(lambda a: a[None], tree)


def _unstacked(tree):
  return jax.tree.map(lambda a: a[0], tree)


def _one_device() -> bool:
  mesh = sharding.current_mesh()
  return mesh is None or math.prod(dict(mesh.shape).values()) == 1


def routed_experts(routing: Routing, x: jax.Array, weights: dict[str, jax.Array],
                   *, capacity: int,
                   strategy: dispatch.Strategy = dispatch.DEFAULT_STRATEGY,
                   max_fanout: int | None = None, activation: str = "swiglu",
                   mode: Mode = "gspmd", remat: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
  """All groups through their routed experts.

  Args:
    routing: `Routing` with gates/priority float32[G, S, E].
    x: float[G, S, D] tokens.
    weights: expert weights (see `moejax.experts`).
    capacity: static C (slots per expert and group).
    strategy: a `dispatch.STRATEGIES` name (default "auto"), resolved once
      here (`dispatch.resolve_strategy`: "auto" is the backend's slot
      strategy, "dropless" its rows strategy); slot strategies ("einsum",
      "index", "gather") use the [G, E, C, D] buffers, the dropless ones
      ("sorted", "ragged") their own layouts (see above).
    max_fanout: the router's static fanout bound (dropless layouts, "gather").
    activation: "swiglu" or "gelu".
    mode: "gspmd" or "shard_map" (see the module docstring).
    remat: recompute the expert hidden activations in the backward pass
      (`experts.ffn(remat=True)`; single-device "gather"/"sorted" path).
  Returns:
    (y float[G, S, D], kept bool[G, S, E]).
  """
  if mode not in MODES:
    raise ValueError(f"expert_parallel={mode!r} is not supported; allowed: "
                     f"{', '.join(MODES)}")
  # "auto" -> the backend's slot strategy, "dropless" -> its rows strategy.
  strategy = dispatch.resolve_strategy(strategy)
  path = _choose_path(strategy, mode, routing.gates.shape[0])
  return path(routing, x, weights, capacity=capacity, strategy=strategy,
              max_fanout=max_fanout, activation=activation, remat=remat)


def _choose_path(strategy: str, mode: str, num_groups: int):
  """The path of a resolved strategy, chosen once: `_shard_map_path`, else
  (gspmd) `_single_device_path` (one plan over all groups: on one device,
  "ragged", and "sorted" where the groups do not split over the mesh),
  `_per_device_path` ("sorted", and "gather" on a mesh without expert and
  model axes: each device runs the single-device path on its groups) or
  `_gspmd_path` (slot buffers with sharding constraints)."""
  if mode == "shard_map":
    return _shard_map_path
  shards = _batch_shards(num_groups)
  if strategy == "ragged" or (strategy in ("gather", "sorted") and
                              _one_device()) or (
                                  strategy == "sorted" and shards is None):
    return _single_device_path
  sizes = dict(sharding.current_mesh().shape) if shards else {}
  data_only = sizes.get("expert", 1) == 1 and sizes.get("model", 1) == 1
  if strategy not in SLOT_STRATEGIES or (strategy == "gather" and shards and
                                         data_only):
    return _per_device_path
  return _gspmd_path


def _single_device_path(routing, x, weights, *, capacity, strategy,
                        max_fanout, activation, remat):
  """One plan over all G * S tokens: on one device nothing is sharded
  ("gather" keeps capacity per group; the fused CPU block loop of
  `experts.ffn`); the dropless layouts have no capacity, so groups do not
  change what is kept (and `ragged_dot` has no batching rule for a G axis)."""
  num_groups, num_tokens, num_experts = routing.gates.shape
  plan = dispatch.plan(
      _flat(routing), capacity, strategy=strategy, max_fanout=max_fanout,
      num_groups=num_groups if strategy == "gather" else 1)
  y = experts.ffn(plan, x.reshape(-1, x.shape[-1]), weights, activation,
                  remat=remat and strategy != "ragged")
  return (y.reshape(x.shape),
          plan.kept.reshape(num_groups, num_tokens, num_experts))


def _per_device_path(routing, x, weights, *, capacity, strategy, max_fanout,
                     activation, remat):
  """"sorted", and "gather" on a data-parallel mesh (experts replicated):
  each device runs the single-device path on its groups."""
  def local_ffn(r, xg, w):  # one layout over a device's groups
    plan = dispatch.plan(
        _flat(r), capacity, strategy=strategy, max_fanout=max_fanout,
        num_groups=r.gates.shape[0] if strategy == "gather" else 1)
    y = experts.ffn(plan, xg.reshape(-1, xg.shape[-1]), w, activation,
                    remat=remat)
    return y.reshape(xg.shape), plan.kept.reshape(r.gates.shape)
  mesh, axes = _batch_shards(routing.gates.shape[0])
  # check_vma=False: the CPU block loop's carries start replicated.
  return jax.shard_map(local_ffn, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                       out_specs=(P(axes), P(axes)),
                       check_vma=False)(routing, x, weights)


def _gspmd_path(routing, x, weights, *, capacity, strategy, max_fanout,
                activation, remat):
  """Slot buffers with sharding constraints; GSPMD inserts the all-to-all
  (see the module docstring)."""
  del remat  # the slot buffers' MLP (`experts.mlp`) saves its activations
  shards = _batch_shards(routing.gates.shape[0])
  if strategy == "gather" and shards is not None:
    # Each device plans its groups at once, expert-major ([E, Gl, C, D]: each
    # expert's slots of all groups together, the blocks the all-to-all
    # moves), as block [x, :, d] of float[X, E, Gd, Gl, C, D] (device (d, x)
    # of the batch axes, d over data x fsdp); the plan stays on its device
    # between dispatch and combine.
    mesh, axes = shards
    group_axes = tuple(a for a in sharding.GROUP_AXES if a in axes)
    blocks = P("expert" if "expert" in axes else None, None,
               group_axes or None)
    def local_dispatch(r, xg):
      plans = group_plans(r, capacity, strategy, max_fanout,
                          expert_major=True)
      return _expert_major_dispatch(plans, xg)[None, :, None], _stacked(plans)
    h, stacked = jax.shard_map(local_dispatch, mesh=mesh,
                               in_specs=(P(axes), P(axes)),
                               out_specs=(blocks, P(axes)))(routing, x)
    combine = jax.shard_map(
        lambda p, yg: _expert_major_combine(_unstacked(p), yg[0, :, 0]),
        mesh=mesh, in_specs=(P(axes), blocks), out_specs=(P(axes), P(axes)))
    names = (sharding.ACT_TOKENS_XEGCD, sharding.ACT_XEGCD,
             sharding.ACT_XEGCF)
    matmul = _source_major_matmul
  else:
    plans = group_plans(routing, capacity, strategy, max_fanout)
    h = dispatch_groups(plans, x)
    stacked = plans
    combine = combine_groups
    names = (sharding.ACT_TOKENS_GECD, sharding.ACT_GECD, sharding.ACT_GECF)
    matmul = experts.batched_matmul
  tokens, slots, hidden = names
  h = sharding.constrain(h, tokens)  # dispatched locally
  h = sharding.constrain(h, slots)   # all-to-all to experts
  y = experts.mlp(h, weights, activation, matmul, hidden_names=hidden)
  y = sharding.constrain(y, slots)
  y = sharding.constrain(y, tokens)  # all-to-all back
  return combine(stacked, checkpoint_name(y, experts.EXPERT_OUTPUTS))


def _source_major_matmul(h: jax.Array, w: jax.Array) -> jax.Array:
  """h float[X, E, ..., A] times w float[E, A, B] -> float[X, E, ..., B]
  (expert-major blocks from X sources: [X, El, Gl, C, A] in the shard_map
  path, [X, E, Gd, Gl, C, A] in the gspmd one)."""
  return jnp.einsum("xe...a,eab->xe...b", h, w)


def _expert_major_dispatch(plans, x: jax.Array) -> jax.Array:
  """x float[Gl, S, D] -> float[E, Gl, C, D] through `group_plans(...,
  expert_major=True)`: a "gather" plan's rows are already expert-major (the
  reshape is free); per-group plans are transposed."""
  h = dispatch_groups(plans, x)  # [Gl * E rows, C, D] as [Gl, E, C, D]
  if _gathered(plans) is None:
    return jnp.swapaxes(h, 0, 1)
  return h.reshape(h.shape[1], h.shape[0], *h.shape[2:])


def _expert_major_combine(plans, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """y float[E, Gl, C, D] -> (float[Gl, S, D], kept bool[Gl, S, E]): the
  inverse of `_expert_major_dispatch` (a "gather" plan reads its rows flat)."""
  if _gathered(plans) is None:
    y = jnp.swapaxes(y, 0, 1)
  return combine_groups(plans, y)


def _local_experts(routing: Routing, x: jax.Array, weights: dict[str, Any], *,
                   capacity: int, strategy: str, max_fanout: int | None,
                   activation: str, collectives: bool):
  """One device's part of the shard_map path (see the module docstring);
  `collectives=False` is the same computation without a mesh."""
  plans = group_plans(routing, capacity, strategy, max_fanout,
                      expert_major=True)
  num_groups = routing.gates.shape[0]
  h = _expert_major_dispatch(plans, x)                     # [E, Gl, C, D]
  if collectives:
    # Each device's experts are a contiguous block of the expert-major
    # buffer: the all-to-all sends blocks and receives them source-major.
    h = jax.lax.all_to_all(h, "expert", 0, 0, tiled=True)  # [X*El, Gl, C, D]
  local = h.reshape(-1, weights["w_in"].shape[0], num_groups, *h.shape[2:])
  y = experts.mlp(local, weights, activation, _source_major_matmul)
  y = y.reshape(h.shape)
  if collectives:
    y = jax.lax.psum(y, "model")  # complete the F-sharded contraction
    y = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True)  # [E, Gl, C, D]
  return _expert_major_combine(plans, checkpoint_name(y,
                                                      experts.EXPERT_OUTPUTS))


def _shard_map_path(routing, x, weights, *, capacity, strategy, max_fanout,
                    activation, remat):
  """The explicit all-to-all path (see the module docstring)."""
  del remat  # the slot buffers' MLP (`experts.mlp`) saves its activations
  num_groups, num_tokens, num_experts = routing.gates.shape
  if strategy not in SLOT_STRATEGIES:  # static dropless bound: C = S
    strategy, capacity = "index", num_tokens
  mesh = sharding.current_mesh()
  sizes = dict(mesh.shape) if mesh is not None else {}
  expert_size, model_size = sizes.get("expert", 1), sizes.get("model", 1)
  local = functools.partial(_local_experts, capacity=capacity,
                            strategy=strategy, max_fanout=max_fanout,
                            activation=activation)
  if mesh is None or math.prod(sizes.values()) == 1:
    return local(routing, x, weights, collectives=False)
  needed = ("data", "expert", "model")  # fsdp is optional
  missing = [a for a in needed if a not in sizes]
  if missing:
    raise ValueError(f"expert_parallel='shard_map' needs a mesh with axes "
                     f"{needed}; the current mesh lacks {missing}")
  batch_axes = sharding.batch_axes(mesh)
  shards = sharding.batch_shards(mesh)
  width = weights["w_in"].shape[-1]
  for name, value, size, axes in (
      ("groups (batch*length/group_size)", num_groups, shards,
       "*".join(a for a in batch_axes if a != "fsdp" or sizes[a] > 1)),
      ("num_experts", num_experts, expert_size, "expert"),
      ("expert_width", width, model_size, "model")):
    if value % size:
      raise ValueError(f"expert_parallel='shard_map': {name}={value} must be "
                       f"divisible by the {axes} mesh size {size}")
  tokens = P(batch_axes)
  w_specs = {k: P("expert", "model", None) if k == "w_out"
             else P("expert", None, "model") for k in weights}
  fn = jax.shard_map(functools.partial(local, collectives=True), mesh=mesh, in_specs=(tokens, tokens, w_specs),
                     out_specs=(tokens, tokens))
  return fn(routing, x, weights)
