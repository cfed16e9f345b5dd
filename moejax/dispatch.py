"""Dispatchers: turn a `Routing` into static-shape gather/compute/combine plans.

Axis legend:
  S  tokens in one group
  E  experts
  C  capacity (slots per expert)
  D  model width
  F  expert width
  M  rows of the dropless layout (S * max_fanout)

A plan moves tokens into an expert-major layout, runs expert weights on it and
brings the results back:

  h = plan.dispatch(x)          # x float[S, D] -> plan layout ([E, C, D] or [M, D])
  h = plan.matmul(h, w)         # w float[E, D, F]: each row times its expert's weight
  y = plan.combine(h)           # -> float[S, D]: sum over kept assignments of gate * row

`plan.kept` (bool[S, E]) holds the assignments that survived capacity. Strategies:
  "einsum"   one-hot dispatch/combine tensors (the GShard reference; O(S*E*C*D)).
  "index"    gather into slots, scatter-add back (the default).
  "dropless" assignments sorted by expert, `jax.lax.ragged_dot` for the expert
             matmuls; ignores capacity and keeps every assignment among each token's
             `max_fanout` largest gates (static bound; default E = everything).
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from moejax.routing.base import Routing, check_int

STRATEGIES = ("einsum", "index", "dropless")
_HIGHEST = jax.lax.Precision.HIGHEST


def capacity(num_tokens: int, k: float, num_experts: int,
             capacity_factor: float, multiple: int = 4) -> int:
  """Slots per expert: `ceil(capacity_factor * S * k / E)` rounded up to `multiple`.

  Args:
    num_tokens: S, tokens in the group.
    k: target mean fanout (experts per token).
    num_experts: E.
    capacity_factor: > 0.
    multiple: round up to a multiple of this (4 by default).
  """
  if not capacity_factor > 0:
    raise ValueError(
        f"capacity_factor={capacity_factor} is out of range; allowed: > 0")
  if not k > 0:
    raise ValueError(f"k={k} is out of range; allowed: > 0")
  c = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return max(multiple, multiple * math.ceil(c / multiple))


def ratio_capacity(num_tokens: int, ratio: float) -> int:
  """Expert-choice / MoD capacity `ceil(ratio * S)`, at least 1."""
  if not 0 < ratio:
    raise ValueError(f"capacity ratio={ratio} is out of range; allowed: > 0")
  return max(1, math.ceil(ratio * num_tokens))


def slot_ranks(routing: Routing) -> tuple[jax.Array, jax.Array]:
  """Each expert's order of its routed tokens.

  Returns:
    order: int32[S, E]; order[r, e] = token at rank r of expert e (routed tokens
      by priority descending, ties to the lower token index, then unrouted).
    rank: int32[S, E]; rank[s, e] = position of token s in expert e's order.
  """
  num_tokens = routing.gates.shape[0]
  key = jnp.where(routing.routed, -routing.priority.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(key, axis=0, stable=True).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None],
                          order.shape)
  rank = jnp.zeros_like(order).at[order, jnp.arange(order.shape[1])[None, :]].set(
      rows)
  return order, rank


@flax.struct.dataclass
class SlotPlan:
  """Capacity-bounded plan in the `[E, C, D]` layout ("einsum" and "index").

  Attributes:
    gates: float32[S, E] the routing's gates.
    position: int32[S, E] slot of each kept assignment, -1 elsewhere.
    token_index: int32[E, C] token held by each slot (0 for empty slots).
    slot_gate: float32[E, C] gate of each slot, 0 for empty slots.
    strategy: "einsum" or "index" (static).
  """
  gates: jax.Array
  position: jax.Array
  token_index: jax.Array
  slot_gate: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="index")

  @property
  def capacity(self) -> int:
    return self.token_index.shape[1]

  @property
  def kept(self) -> jax.Array:
    """bool[S, E]: assignments that fit in capacity."""
    return self.position >= 0

  @property
  def slot_valid(self) -> jax.Array:
    """bool[E, C]: slots that hold a token."""
    return self.slot_gate != 0

  def _one_hot(self) -> jax.Array:
    return jax.nn.one_hot(self.position, self.capacity, dtype=jnp.float32)

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[E, C, D]; empty slots are zeros."""
    if self.strategy == "einsum":
      mask = self._one_hot().astype(x.dtype)
      return jnp.einsum("sec,sd->ecd", mask, x, precision=_HIGHEST)
    h = jnp.take(x, self.token_index, axis=0)
    return jnp.where(self.slot_valid[..., None], h, jnp.zeros((), x.dtype))

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[E, C, A] times w float[E, A, B] -> float[E, C, B]."""
    return jnp.einsum("eca,eab->ecb", h, w)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[E, C, D] -> float[S, D]: sum over kept (s, e) of gate * y[e, slot]."""
    if self.strategy == "einsum":
      weights = self._one_hot() * self.gates[..., None]
      return jnp.einsum("sec,ecd->sd", weights.astype(y.dtype), y,
                        precision=_HIGHEST)
    num_tokens, width = self.gates.shape[0], y.shape[-1]
    weighted = y * self.slot_gate[..., None].astype(y.dtype)
    out = jnp.zeros((num_tokens, width), y.dtype)
    return out.at[self.token_index.reshape(-1)].add(weighted.reshape(-1, width))


@flax.struct.dataclass
class DroplessPlan:
  """Plan in the sorted-by-expert `[M, D]` layout ("dropless").

  Attributes:
    gates: float32[S, E] the routing's gates.
    kept: bool[S, E] assignments in the layout (all routed ones within the bound).
    row_token: int32[M] token of each row (0 for padding rows at the end).
    row_gate: float32[M] gate of each row (0 for padding rows).
    group_sizes: int32[E] rows per expert, in expert order.
  """
  gates: jax.Array
  kept: jax.Array
  row_token: jax.Array
  row_gate: jax.Array
  group_sizes: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="dropless")

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[M, D] rows sorted by expert; padding rows zero."""
    h = jnp.take(x, self.row_token, axis=0)
    return jnp.where((self.row_gate != 0)[:, None], h, jnp.zeros((), x.dtype))

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[M, A] times each row's expert weight w float[E, A, B] -> [M, B]."""
    return jax.lax.ragged_dot(h, w, self.group_sizes)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[M, D] -> float[S, D]."""
    num_tokens, width = self.gates.shape[0], y.shape[-1]
    weighted = y * self.row_gate[:, None].astype(y.dtype)
    return jnp.zeros((num_tokens, width), y.dtype).at[self.row_token].add(weighted)


def _slot_plan(routing: Routing, capacity_: int, strategy: str) -> SlotPlan:
  num_tokens, num_experts = routing.gates.shape
  order, rank = slot_ranks(routing)
  routed = routing.routed
  position = jnp.where(routed & (rank < capacity_), rank, -1)
  if capacity_ > num_tokens:
    order = jnp.concatenate(
        [order, jnp.zeros((capacity_ - num_tokens, num_experts), jnp.int32)], 0)
  top = order[:capacity_]  # [C, E]; routed tokens first in each column
  slot_valid = (jnp.arange(capacity_)[:, None] <
                routing.routed.sum(axis=0)[None, :])
  slot_gate = jnp.where(slot_valid,
                        jnp.take_along_axis(routing.gates, top, axis=0), 0.0)
  return SlotPlan(gates=routing.gates, position=position.astype(jnp.int32),
                  token_index=top.T, slot_gate=slot_gate.T, strategy=strategy)


def _dropless_plan(routing: Routing, max_fanout: int) -> DroplessPlan:
  num_tokens, num_experts = routing.gates.shape
  values, experts = jax.lax.top_k(routing.gates, max_fanout)  # [S, m]
  valid = values != 0
  flat_expert = jnp.where(valid, experts, num_experts).reshape(-1)
  perm = jnp.argsort(flat_expert, stable=True)
  row_token = (perm // max_fanout).astype(jnp.int32)
  row_gate = jnp.where(valid.reshape(-1), values.reshape(-1), 0.0)[perm]
  group_sizes = jnp.bincount(flat_expert, length=num_experts + 1)[:num_experts]
  kept = jnp.zeros(routing.gates.shape, bool).at[
      jnp.arange(num_tokens)[:, None], experts].set(valid)
  # Row gates must carry the gradient of the routing's gates.
  row_gate = jnp.where(
      row_gate != 0,
      routing.gates[row_token, jnp.minimum(flat_expert[perm], num_experts - 1)],
      0.0)
  return DroplessPlan(gates=routing.gates, kept=kept, row_token=row_token,
                      row_gate=row_gate, group_sizes=group_sizes.astype(jnp.int32))


def plan(routing: Routing, capacity: int, *, strategy: str = "index",
         max_fanout: int | None = None) -> SlotPlan | DroplessPlan:
  """Builds a dispatch plan for one group.

  Args:
    routing: `Routing` with gates/priority float32[S, E].
    capacity: static integer C >= 1, slots per expert (see `capacity()`); ignored
      by "dropless".
    strategy: "einsum", "index" or "dropless".
    max_fanout: "dropless" only: static bound on experts per token (the router's
      largest possible fanout; default E, which keeps everything).
  Returns:
    a `SlotPlan` or `DroplessPlan` pytree.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not supported; allowed: "
                     f"{', '.join(STRATEGIES)}")
  num_experts = routing.gates.shape[-1]
  if strategy == "dropless":
    max_fanout = num_experts if max_fanout is None else check_int(
        "max_fanout", max_fanout, 1, num_experts)
    return _dropless_plan(routing, max_fanout)
  capacity = check_int("capacity", capacity, 1)
  return _slot_plan(routing, capacity, strategy)


def drop_fraction(routing: Routing, kept: jax.Array) -> jax.Array:
  """float32[]: assignments lost to capacity / all assignments."""
  routed = routing.routed
  total = jnp.maximum(routed.sum(), 1)
  return (routed & ~kept).sum() / total
