"""Dispatch plans: turn a `Routing` into static-shape gather/compute/combine plans.

Axis legend:
  S  tokens in one group (all G groups laid end to end with `num_groups`)
  G  routing groups
  E  experts
  C  capacity (slots per expert)
  D  model width
  F  expert width
  m  static bound on experts per token (`max_fanout`)
  M  rows of the ragged dropless layout (S * m)
  B  rows per block of the sorted-blocks layout
  N  blocks of the sorted-blocks layout (static bound); R = N * B rows

A plan moves tokens into an expert-major layout, runs expert weights on it and
brings the results back:

  h = plan.dispatch(x)          # x float[S, D] -> plan layout ([E, C, D] or [R, D])
  h = plan.matmul(h, w)         # w float[E, D, F]: each row times its expert's weight
  y = plan.combine(h)           # -> float[S, D]: sum over kept assignments of gate * row

`plan.kept` (bool[S, E]) holds the assignments that survived capacity. Strategies:
  capacity-bounded, `[E, C, D]` layout, identical kept sets
  (`moejax.dispatch.slots`):
  "einsum"   one-hot dispatch/combine tensors (the GShard reference; O(S*E*C*D)).
  "index"    gather into slots (column-wise argsort of priorities), scatter-add
             back.
  "gather"   slots assigned by one sort of the S*m routed assignments (for
             m = E, a top-C per expert column); dispatch and combine are
             gathers whose backward passes are gathers too (custom VJPs over
             the token->slot map and its inverse, `moejax.dispatch.kernels`),
             no scatter-add of rows. With a large m (S*m > 2*E*C) combine
             falls back to the scatter-add of "index".
  dropless (ignore capacity; keep every assignment among each token's
  `max_fanout` largest gates, default E = everything;
  `moejax.dispatch.dropless`):
  "ragged"   rows sorted by expert, `jax.lax.ragged_dot` for the expert matmuls
             (a real grouped matmul on GPU/TPU; XLA:CPU lowers it to a dense
             matmul over every expert).
  "sorted"   rows sorted by expert and padded per expert to blocks of B rows
             (static bound N = (S*m + E*(B-1)) // B blocks); each block times its
             expert's weight (a loop over the used blocks on CPU, one batched
             matmul with per-block weights elsewhere); gather dispatch/combine.
  "dropless" "sorted" on CPU, "ragged" elsewhere (`resolve_strategy`, in
             `moejax.backend` with every other backend choice).
  "auto"     the backend's fastest capacity strategy ("gather" on CPU, GPU
             and TPU; `moejax.backend.choose_strategy`).

On CPU, "gather" and "sorted" plans have `block_loop` set and offer
`plan.row_blocks()`, their rows in blocks of one expert each, for the fused
expert FFN in one loop over the used blocks (`moejax.dispatch.cpu`; the
experts module, `moejax.experts.ffn`, passes the weights and activation).
Empty slots and blocks cost nothing there.
All paths are jit-able with static shapes and no host synchronisation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.backend import resolve_strategy
from moejax.checks import check_int
from moejax.dispatch.base import (DROPLESS, PLAN_STRATEGY, STRATEGIES, Plan,
                                  Strategy)
from moejax.dispatch.dropless import block_plan, dropless_plan
from moejax.dispatch.slots import gather_plan, slot_plan
# The capacity formula is the routing methods' (one definition, re-exported).
from moejax.routing.base import Routing, capacity


def ratio_capacity(num_tokens: int, ratio: float) -> int:
  """Expert-choice / MoD capacity `ceil(ratio * S)`, at least 1."""
  if not 0 < ratio:
    raise ValueError(f"capacity ratio={ratio} is out of range; allowed: > 0")
  return max(1, math.ceil(ratio * num_tokens))


def plan(routing: Routing, capacity: int, *,
         strategy: Strategy = PLAN_STRATEGY,
         max_fanout: int | None = None, block_size: int | None = None,
         num_groups: int = 1, expert_major: bool = False) -> Plan:
  """Builds a dispatch plan for one group.

  Args:
    routing: `Routing` with gates/priority float32[S, E].
    capacity: static integer C >= 1, slots per expert (see `capacity()`); ignored
      by the dropless strategies.
    strategy: one of `STRATEGIES` (see the module docstring). The default,
      "index" (`PLAN_STRATEGY`), is the public API's; the MoE layer's is
      "auto" (`DEFAULT_STRATEGY`).
    max_fanout: static bound m on experts per token (the router's largest
      possible fanout; default E). The dropless strategies keep every
      assignment among each token's m largest gates; "gather" sizes its
      token->slot map with it (a router must not exceed it); "einsum" and
      "index" ignore it.
    block_size: rows per block B of the CPU block loops: "sorted" (default
      `default_block_size(S * m, E)`) and "gather" (default
      `slot_block_size(C)`; the capacity is padded to whole blocks).
    num_groups: G >= 1 routing groups laid end to end in the S tokens (S/G
      each): capacity C applies per group and expert. "gather" plans all
      groups at once (its layout is [G*E, C, D]); the dropless strategies
      keep everything anyway; "einsum" and "index" need G = 1 (vmap them).
    expert_major: "gather" with G groups: rows e * G + g (each expert's slots
      of all groups together, the blocks an all-to-all over experts sends)
      instead of g * E + e; the same slots otherwise. Other strategies
      ignore it.
  Returns:
    a `Plan` pytree (`SlotPlan`, `GatherPlan`, `BlockPlan` or `DroplessPlan`).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not supported; allowed: "
                     f"{', '.join(STRATEGIES)}")
  if routing.gates.ndim != 2 or min(routing.gates.shape) < 1:
    num_tokens, num_experts = (routing.gates.shape + (0, 0))[:2]
    axis, size = ("S", num_tokens) if num_tokens < 1 else ("E", num_experts)
    raise ValueError(f"routing has {axis}={size} "
                     f"{'tokens' if axis == 'S' else 'experts'}; allowed: "
                     f"{axis} >= 1 (gates float32[S, E], one group)")
  num_experts = routing.gates.shape[-1]
  max_fanout = num_experts if max_fanout is None else check_int(
      "max_fanout", max_fanout, 1, num_experts)
  if block_size is not None:
    block_size = check_int("block_size", block_size, 1)
  num_groups = check_int("num_groups", num_groups, 1)
  if routing.gates.shape[0] % num_groups:
    raise ValueError(f"num_groups={num_groups} must divide the tokens "
                     f"S={routing.gates.shape[0]}")
  strategy = resolve_strategy(strategy)
  routing = finite_routing(routing)
  if num_groups > 1 and strategy in ("einsum", "index"):
    raise ValueError(f"num_groups={num_groups} is not supported by "
                     f"strategy={strategy!r}; allowed: 1 (vmap over groups)")
  if strategy == "ragged":
    return dropless_plan(routing, max_fanout)
  if strategy == "sorted":
    return block_plan(routing, max_fanout, block_size)
  capacity = check_int("capacity", capacity, 1)
  if strategy == "gather":
    return gather_plan(routing, capacity, max_fanout, block_size, num_groups,
                       expert_major)
  return slot_plan(routing, capacity, strategy)


def finite_routing(routing: Routing) -> Routing:
  """The `Routing` every strategy plans: non-finite values made harmless.

  An assignment whose gate is NaN or +-inf is not routed (gate 0), and a
  non-finite priority ranks as the most extreme finite value of its sign (NaN
  lowest), so every strategy keeps the same assignments and no slot goes to
  a NaN. Finite routings pass unchanged (elementwise, fused into the plan).
  """
  big = float(jnp.finfo(jnp.float32).max)
  priority = routing.priority.astype(jnp.float32)
  return Routing(
      gates=jnp.where(jnp.isfinite(routing.gates), routing.gates, 0.0),
      priority=jnp.nan_to_num(priority, nan=-big, posinf=big, neginf=-big))


def drop_fraction(routing: Routing, kept: jax.Array) -> jax.Array:
  """float32[]: assignments lost to capacity / all assignments."""
  routed = routing.routed
  total = jnp.maximum(routed.sum(), 1)
  return (routed & ~kept).sum() / total
