"""Capacity-bounded plans in the expert-major `[E, C, D]` layout.

Axis legend:
  S  tokens (all groups laid end to end)
  G  routing groups (S/G tokens each)
  E  experts; V = G * E virtual experts (one per group and expert)
  C  capacity (slots per expert and group)
  m  static bound on experts per token (`max_fanout`)
  D  model width
  N  blocks of B slots of the CPU block loop

"einsum" and "index" (`SlotPlan`) and "gather" (`GatherPlan`) keep the same
assignments: each expert keeps its routed tokens by priority descending, ties
to the lower token index, up to C. "gather" assigns its slots by one sort of
the S*m assignments (a top-C per expert for m = E) and moves rows with
gathers in both directions (`moejax.dispatch.kernels`); on CPU it also lays
its slots out in blocks for the fused block loop (`row_blocks`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moejax.backend import use_loop_matmul
from moejax.dispatch.base import Plan
from moejax.dispatch.cpu import BLOCK_ROWS, RowBlocks
from moejax.dispatch.kernels import gather_combine, gather_rows, scatter_combine
from moejax.routing.base import Routing, take_rows

_HIGHEST = jax.lax.Precision.HIGHEST


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
class SlotPlan(Plan):
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
      # 0 * NaN = NaN: contract finite rows only, then mark the slots of
      # non-finite tokens NaN (a bad token stays in its own slots).
      mask = self._one_hot().astype(x.dtype)
      finite = jnp.all(jnp.isfinite(x), axis=-1)
      h = jnp.einsum("sec,sd->ecd", mask, jnp.where(finite[:, None], x, 0),
                     precision=_HIGHEST)
      bad = jnp.einsum("sec,s->ec", mask, (~finite).astype(x.dtype)) > 0
      return jnp.where(bad[..., None], jnp.nan, h).astype(x.dtype)
    h = jnp.take(x, self.token_index, axis=0)
    return jnp.where(self.slot_valid[..., None], h, jnp.zeros((), x.dtype))

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[E, C, A] times w float[E, A, B] -> float[E, C, B]."""
    return jnp.einsum("eca,eab->ecb", h, w)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[E, C, D] -> float[S, D]: sum over kept (s, e) of gate * y[e, slot]."""
    if self.strategy == "einsum":
      one_hot = self._one_hot()
      weights = one_hot * self.gates[..., None]
      finite = jnp.all(jnp.isfinite(y), axis=-1)  # [E, C]
      out = jnp.einsum("sec,ecd->sd", weights.astype(y.dtype),
                       jnp.where(finite[..., None], y, 0), precision=_HIGHEST)
      bad = jnp.einsum("sec,ec->s", one_hot, (~finite).astype(jnp.float32)) > 0
      return jnp.where(bad[:, None], jnp.nan, out).astype(y.dtype)
    num_tokens, width = self.gates.shape[0], y.shape[-1]
    weighted = y * self.slot_gate[..., None].astype(y.dtype)
    out = jnp.zeros((num_tokens, width), y.dtype)
    return out.at[self.token_index.reshape(-1)].add(weighted.reshape(-1, width))



def assignments(routing: Routing, max_fanout: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Each token's routed experts, at most `max_fanout` of them.

  Returns:
    expert: int32[S, m] expert of each assignment (distinct per token).
    valid: bool[S, m] assignment exists (routed); with m < E the kept ones are
      the token's m largest |gates|.
  """
  num_tokens, num_experts = routing.gates.shape
  routed = routing.routed
  if max_fanout >= num_experts:
    expert = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                              (num_tokens, num_experts))
    return expert, routed
  key = jax.lax.stop_gradient(
      jnp.where(routed, jnp.abs(routing.gates.astype(jnp.float32)), -1.0))
  values, expert = jax.lax.top_k(key, max_fanout)
  return expert.astype(jnp.int32), values >= 0


def exclusive_cumsum(x: jax.Array) -> jax.Array:
  return jnp.cumsum(x) - x


def inverse_permutation(perm: jax.Array, values: jax.Array) -> jax.Array:
  """out[perm[i]] = values[i] (perm a permutation of range(len(perm)))."""
  return jnp.zeros(perm.shape, values.dtype).at[perm].set(
      values, unique_indices=True)



def slot_block_size(capacity_: int, target: int = BLOCK_ROWS) -> int:
  """Rows B of the "gather" block loop: `target`, or C rounded up to a
  multiple of 8 when C is smaller (the capacity is padded to whole blocks)."""
  return min(target, 8 * -(-capacity_ // 8))


@flax.struct.dataclass
class GatherPlan(Plan):
  """Capacity-bounded plan in the `[E, C, D]` layout ("gather").

  Same kept set and slots contents as "index" (each expert keeps its routed
  tokens by priority descending, ties to the lower token index); slots are
  assigned by one stable sort of the S*m assignments by (expert, -priority)
  (for m = E by a top-C per expert instead, `top_slots`), and
  dispatch/combine are gathers in both directions.

  Attributes:
    gates: float32[S, E] the routing's gates.
    kept: bool[S, E] assignments that fit in capacity.
    token_index: int32[G*E, C] token held by each slot (0 for empty slots);
      with G > 1 groups (`plan(num_groups=G)`) row g * E + e holds the slots
      of expert e for the tokens of group g (row e * G + g when
      `expert_major`).
    slot_gate: float32[G*E, C] gate of each slot, 0 for empty slots.
    token_slot: int32[S, m] flat slot (v * C + c) of each assignment, G*E*C
      where it is not kept.
    token_gate: float32[S, m] gate of each kept assignment, 0 elsewhere.
    token_major: static; False when the token->slot map is larger than the
      slots (S*m > 2*E*C): combine and the dispatch backward then scatter-add.
    block_order: int32[E * ceil(C / B)] blocks of B slots (the capacity
      padded to whole blocks) holding tokens first, for the CPU block loop
      (`row_blocks`).
    num_used: int32[] blocks holding at least one token.
    block_size: static B of `row_blocks`; 0 = no block loop (accelerators).
    expert_major: static; the rows (virtual experts) are expert-major,
      e * G + g (`plan(expert_major=True)`), not group-major.
  """
  gates: jax.Array
  kept: jax.Array
  token_index: jax.Array
  slot_gate: jax.Array
  token_slot: jax.Array
  token_gate: jax.Array
  block_order: jax.Array
  num_used: jax.Array
  token_major: bool = flax.struct.field(pytree_node=False, default=True)
  block_size: int = flax.struct.field(pytree_node=False, default=0)
  strategy: str = flax.struct.field(pytree_node=False, default="gather")
  expert_major: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def capacity(self) -> int:
    return self.token_index.shape[-1]

  @property
  def slot_valid(self) -> jax.Array:
    """bool[E, C]: slots that hold a token."""
    return self.slot_gate != 0

  @property
  def token_valid(self) -> jax.Array:
    """bool[S, m]: assignments that hold a slot."""
    num_experts = self.token_index.shape[0]
    return self.token_slot < num_experts * self.capacity

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[E, C, D]; empty slots are zeros."""
    num_experts, cap = self.token_index.shape
    index, valid = self.token_index.reshape(-1), self.slot_valid.reshape(-1)
    if self.token_major:
      h = gather_rows(x, index, valid, self.token_slot, self.token_valid)
    else:
      h = jnp.where(valid[:, None], jnp.take(x, index, axis=0),
                    jnp.zeros((), x.dtype))
    return h.reshape(num_experts, cap, x.shape[-1])

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[G*E, C, A] times w float[E, A, B] -> float[G*E, C, B]."""
    num_experts = w.shape[0]
    h = h.reshape(-1, num_experts, *h.shape[1:])
    out = jnp.einsum("geca,eab->gecb", h, w)
    return out.reshape(-1, *out.shape[2:])

  @property
  def block_loop(self) -> bool:
    """Whether the plan has the CPU block loop (`row_blocks`)."""
    return self.block_size > 0

  def row_blocks(self) -> RowBlocks:
    """The slots in blocks of B (capacity padded to whole blocks), used ones
    first, for the fused CPU block loop; only when `block_loop`."""
    num_experts, cap = self.token_index.shape
    size = self.block_size
    per_expert = -(-cap // size)
    padded = per_expert * size

    def pad(a):
      return jnp.pad(a, ((0, 0), (0, padded - cap)))
    row_token, row_gate = pad(self.token_index), pad(self.slot_gate)
    block_expert = jnp.repeat(
        _real_expert(jnp.arange(num_experts, dtype=jnp.int32),
                     self.gates.shape[-1], num_experts, self.expert_major),
        per_expert)
    return RowBlocks(row_gate.reshape(-1, size), row_token.reshape(-1, size),
                     (row_gate != 0).reshape(-1, size), block_expert,
                     self.block_order, self.num_used)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[E, C, D] -> float[S, D]: sum over kept (s, e) of gate * y[e, slot]."""
    width = y.shape[-1]
    rows = y.reshape(-1, width)
    row_token = self.token_index.reshape(-1)
    if self.token_major:
      return gather_combine(rows, self.token_gate, self.token_slot,
                            self.token_valid, row_token,
                            jax.lax.stop_gradient(self.slot_gate.reshape(-1)))
    return scatter_combine(rows, row_token, self.slot_gate.reshape(-1),
                           self.gates.shape[0])


def _real_expert(virtual: jax.Array, real_experts: int, num_virtual: int,
                 expert_major: bool) -> jax.Array:
  """The expert e of each virtual expert (row) of a G-group plan: rows
  g * E + e, or e * G + g when `expert_major`."""
  if expert_major:
    return virtual // (num_virtual // real_experts)
  return virtual % real_experts


def top_slots(routing: Routing, capacity_: int, num_groups: int,
              expert_major: bool = False) -> tuple[jax.Array, jax.Array]:
  """Each (group, expert)'s kept tokens in slot order, from a top-C per expert.

  The slots of "gather" without the sort of S*m assignments: for m = E (a
  router whose fanout may reach every expert: expert choice, uncapped top-p)
  that sort is over S*E elements, while a top-C per expert column gives the
  same slots (routed tokens by priority descending, ties to the lower token
  index: `lax.top_k` keeps the lower index first).

  Returns:
    slot_token: int32[G*E, C] global token of each slot (0 where empty);
      rows g * E + e, or e * G + g when `expert_major`.
    slot_valid: bool[G*E, C].
  """
  num_tokens, num_experts = routing.gates.shape
  per_group = num_tokens // num_groups
  finite = jnp.maximum(routing.priority.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
  key = jax.lax.stop_gradient(jnp.where(routing.routed, finite, -jnp.inf))
  key = key.reshape(num_groups, per_group, num_experts).transpose(0, 2, 1)
  take = min(capacity_, per_group)
  values, token = jax.lax.top_k(key, take)  # [G, E, take]
  valid = values > -jnp.inf
  token = token + (jnp.arange(num_groups, dtype=jnp.int32)
                   * per_group)[:, None, None]
  pad = ((0, 0), (0, 0), (0, capacity_ - take))
  token = jnp.pad(jnp.where(valid, token, 0), pad)
  valid = jnp.pad(valid, pad)
  if expert_major:
    token, valid = token.transpose(1, 0, 2), valid.transpose(1, 0, 2)
  return (token.reshape(-1, capacity_).astype(jnp.int32),
          valid.reshape(-1, capacity_))


def _gather_plan_all_experts(routing: Routing, capacity_: int,
                             block_size: int | None,
                             num_groups: int,
                             expert_major: bool) -> GatherPlan:
  """`gather_plan` for m = E (every expert is a possible assignment)."""
  num_tokens, real_experts = routing.gates.shape
  token_index, slot_valid = top_slots(routing, capacity_, num_groups,
                                      expert_major)
  num_experts = num_groups * real_experts
  num_slots = num_experts * capacity_
  slot_expert = jnp.broadcast_to(
      _real_expert(jnp.arange(num_experts, dtype=jnp.int32), real_experts,
                   num_experts, expert_major)[:, None], token_index.shape)
  slot_id = jnp.arange(num_slots, dtype=jnp.int32).reshape(token_index.shape)
  token_slot = jnp.full((num_tokens, real_experts), num_slots, jnp.int32).at[
      jnp.where(slot_valid, token_index, num_tokens), slot_expert].set(
          slot_id, mode="drop")
  kept = token_slot < num_slots
  token_gate = jnp.where(kept, routing.gates, 0.0)
  slot_gate = jnp.where(slot_valid, routing.gates[token_index, slot_expert],
                        0.0)
  kept_e = slot_valid.sum(axis=1)
  return _with_blocks(routing, kept, token_index, slot_gate, token_slot,
                      token_gate, kept_e, capacity_, block_size,
                      token_major=num_tokens * real_experts <= 2 * num_slots,
                      expert_major=expert_major)


def _with_blocks(routing: Routing, kept, token_index, slot_gate, token_slot,
                 token_gate, kept_e, capacity_: int, block_size: int | None,
                 token_major: bool, expert_major: bool) -> GatherPlan:
  """The GatherPlan with the block order of the CPU loop (kept_e: int32[V]
  tokens each virtual expert keeps)."""
  # Blocks of B slots holding tokens: the first ceil(kept_e / B) of expert e.
  size = (block_size or slot_block_size(capacity_)) if use_loop_matmul() else 0
  per_expert = -(-capacity_ // size) if size else 1
  used_e = (kept_e + max(size, 1) - 1) // max(size, 1)
  used = jnp.arange(per_expert)[None, :] < used_e[:, None]  # [V, C/B]
  block_order = jnp.argsort(~used.reshape(-1), stable=True).astype(jnp.int32)
  return GatherPlan(gates=routing.gates, kept=kept,
                    token_index=token_index.astype(jnp.int32),
                    slot_gate=slot_gate, token_slot=token_slot.astype(jnp.int32),
                    token_gate=token_gate, block_order=block_order,
                    num_used=jnp.sum(used_e).astype(jnp.int32),
                    token_major=token_major, block_size=size,
                    expert_major=expert_major)


def gather_plan(routing: Routing, capacity_: int, max_fanout: int,
                 block_size: int | None = None,
                 num_groups: int = 1, expert_major: bool = False) -> GatherPlan:
  num_tokens, real_experts = routing.gates.shape
  if max_fanout >= real_experts:
    return _gather_plan_all_experts(routing, capacity_, block_size, num_groups,
                                    expert_major)
  expert, valid = assignments(routing, max_fanout)  # [S, m]
  fanout = expert.shape[1]
  n = num_tokens * fanout
  # Groups: (group, expert) pairs are virtual experts g * E + e (e * G + g
  # when expert-major), each with C slots, so that capacity applies per group.
  num_experts = num_groups * real_experts
  group = jnp.arange(num_tokens, dtype=jnp.int32) // (num_tokens // num_groups)
  virtual = (expert * num_groups + group[:, None] if expert_major else
             group[:, None] * real_experts + expert)
  flat_expert = jnp.where(valid, virtual, num_experts).reshape(-1)
  priority = jax.lax.stop_gradient(take_rows(
      routing.priority.astype(jnp.float32), expert)).reshape(-1)
  iota = jnp.arange(n, dtype=jnp.int32)
  # One stable sort by (expert, -priority): token order breaks ties.
  sorted_expert, _, source = jax.lax.sort(
      (flat_expert, -priority, iota), num_keys=2, is_stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)
  starts = exclusive_cumsum(counts)
  position = iota - starts[sorted_expert]
  kept_sorted = (sorted_expert < num_experts) & (position < capacity_)
  num_slots = num_experts * capacity_
  slot_sorted = jnp.where(kept_sorted, sorted_expert * capacity_ + position,
                          num_slots)
  token_slot = inverse_permutation(source, slot_sorted).reshape(
      num_tokens, fanout)
  token_valid = token_slot < num_slots
  gate = take_rows(routing.gates, expert)  # [S, m]
  token_gate = jnp.where(token_valid, gate, 0.0)
  # Slot (e, c) holds sorted element starts[e] + c when c < counts[e].
  slots = jnp.arange(capacity_, dtype=jnp.int32)
  slot_valid = slots[None, :] < jnp.minimum(counts[:num_experts],
                                            capacity_)[:, None]
  slot_source = jnp.take(source, starts[:num_experts, None] + slots[None, :],
                         mode="clip")  # [E, C] flat (s * m + j)
  token_index = jnp.where(slot_valid, slot_source // fanout, 0)
  slot_gate = jnp.where(slot_valid,
                        jnp.take(token_gate.reshape(-1), slot_source,
                                 mode="clip"), 0.0)
  kept = jnp.zeros((num_tokens, real_experts), bool).at[
      jnp.arange(num_tokens)[:, None], expert].set(token_valid)
  return _with_blocks(routing, kept, token_index, slot_gate, token_slot,
                      token_gate, jnp.minimum(counts[:num_experts], capacity_),
                      capacity_, block_size,
                      token_major=num_tokens * fanout <= 2 * num_slots,
                      expert_major=expert_major)



def slot_plan(routing: Routing, capacity_: int, strategy: str) -> SlotPlan:
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


