"""Dropless plans: every routed assignment within the fanout bound is kept.

Axis legend:
  S  tokens in one group
  E  experts
  m  static bound on experts per token (`max_fanout`)
  M  rows of the ragged layout (S * m)
  B  rows per block of the sorted-blocks layout
  N  blocks of the sorted-blocks layout (static bound); R = N * B rows
  D  model width

"ragged" (`DroplessPlan`) sorts the rows by expert and runs `lax.ragged_dot`
(a grouped matmul on GPU/TPU). "sorted" (`BlockPlan`) pads each expert's rows
to whole blocks of B rows: a loop over the used blocks on CPU (and the fused
block loop, `row_blocks`), one batched matmul with per-block weights
elsewhere; its dispatch and combine are gathers (`moejax.dispatch.kernels`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moejax.backend import use_loop_matmul
from moejax.dispatch.base import Plan
from moejax.dispatch.cpu import BLOCK_ROWS, RowBlocks
from moejax.dispatch.kernels import gather_combine, gather_rows, grouped_matmul
from moejax.dispatch.slots import (assignments, exclusive_cumsum,
                                   inverse_permutation)
from moejax.routing.base import Routing, take_rows


@flax.struct.dataclass
class DroplessPlan(Plan):
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



def default_block_size(num_rows: int, num_experts: int) -> int:
  """Block rows B for `num_rows` = S*m assignments over E experts.

  `BLOCK_ROWS` (the CPU block loop runs only the used blocks, so padding
  costs about E*B/2 rows of compute; XLA:CPU's small matmuls, the weight
  gradients above all, lose efficiency below ~256 rows), smaller when there
  are fewer rows per expert: the power of two in [8, BLOCK_ROWS] at most
  S*m/E.
  """
  target = max(1, num_rows // num_experts)
  size = 8
  while size * 2 <= min(target, BLOCK_ROWS):
    size *= 2
  return size


def num_blocks(num_rows: int, num_experts: int, block_size: int) -> int:
  """Static bound N on the blocks of `num_rows` rows padded per expert."""
  return max(1, (num_rows + min(num_experts, num_rows) * (block_size - 1))
             // block_size)


@flax.struct.dataclass
class BlockPlan(Plan):
  """Dropless plan in the sorted-blocks `[R, D]` layout ("sorted").

  Rows are sorted by expert and each expert's rows padded to whole blocks of
  B rows; block b belongs to expert `block_expert[b]` (E for unused trailing
  blocks). The expert matmul is one batched matmul over blocks with the
  weights gathered per block.

  Attributes:
    gates: float32[S, E] the routing's gates.
    kept: bool[S, E] assignments in the layout.
    row_token: int32[R] token of each row (0 for padding rows).
    row_gate: float32[R] gate of each row (0 for padding rows).
    token_row: int32[S, m] row of each assignment, R where none.
    token_gate: float32[S, m] gate of each assignment, 0 where none.
    block_expert: int32[N] expert of each block, E for unused blocks.
    group_sizes: int32[E] rows per expert (before padding).
    block_loop: static; True on CPU: `matmul` loops over the used blocks and
      `row_blocks` feeds the fused block loop.
  """
  gates: jax.Array
  kept: jax.Array
  row_token: jax.Array
  row_gate: jax.Array
  token_row: jax.Array
  token_gate: jax.Array
  block_expert: jax.Array
  group_sizes: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="sorted")
  block_loop: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def block_size(self) -> int:
    return self.row_token.shape[0] // self.block_expert.shape[0]

  @property
  def token_valid(self) -> jax.Array:
    return self.token_row < self.row_token.shape[0]

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[R, D] rows sorted by expert; padding rows zero."""
    return gather_rows(x, self.row_token, self.row_gate != 0, self.token_row,
                       self.token_valid)

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[R, A] times each row's expert weight w float[E, A, B] -> [R, B].

    On CPU (`block_loop`) a loop over the used blocks (`grouped_matmul`);
    elsewhere one batched matmul with the weights gathered per block.
    """
    nb, size = self.block_expert.shape[0], self.block_size
    blocks = h.reshape(nb, size, h.shape[-1])
    if self.block_loop:
      num_used = jnp.sum(self.block_expert < w.shape[0]).astype(jnp.int32)
      out = grouped_matmul(blocks, w, self.block_expert,
                           jnp.arange(nb, dtype=jnp.int32), num_used)
    else:
      experts = jnp.minimum(self.block_expert, w.shape[0] - 1)
      wb = jnp.take(w, experts, axis=0)  # [N, A, B]
      out = jnp.einsum("nra,nab->nrb", blocks, wb)
    return out.reshape(nb * size, w.shape[-1])

  def row_blocks(self) -> RowBlocks:
    """The rows in their blocks for the fused CPU block loop (`block_loop`)."""
    nb, size = self.block_expert.shape[0], self.block_size
    num_used = jnp.sum(self.block_expert < self.gates.shape[-1]
                       ).astype(jnp.int32)
    return RowBlocks(self.row_gate.reshape(nb, size),
                     self.row_token.reshape(nb, size),
                     (self.row_gate != 0).reshape(nb, size), self.block_expert,
                     jnp.arange(nb, dtype=jnp.int32), num_used)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[R, D] -> float[S, D]."""
    return gather_combine(y, self.token_gate, self.token_row, self.token_valid,
                          self.row_token, jax.lax.stop_gradient(self.row_gate))


def block_plan(routing: Routing, max_fanout: int,
                block_size: int | None) -> BlockPlan:
  num_tokens, num_experts = routing.gates.shape
  expert, valid = assignments(routing, max_fanout)  # [S, m]
  fanout = expert.shape[1]
  n = num_tokens * fanout
  size = block_size or default_block_size(n, num_experts)
  nb = num_blocks(n, num_experts, size)
  num_rows = nb * size
  flat_expert = jnp.where(valid, expert, num_experts).reshape(-1)
  iota = jnp.arange(n, dtype=jnp.int32)
  sorted_expert, source = jax.lax.sort((flat_expert, iota), num_keys=1,
                                       is_stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)
  counts = counts[:num_experts]
  starts = exclusive_cumsum(counts)
  expert_blocks = (counts + size - 1) // size
  block_end = jnp.cumsum(expert_blocks)
  first_row = (block_end - expert_blocks) * size  # [E]
  clipped = jnp.minimum(sorted_expert, num_experts - 1)
  row_sorted = jnp.where(sorted_expert < num_experts,
                         first_row[clipped] + iota - starts[clipped], num_rows)
  token_row = inverse_permutation(source, row_sorted).reshape(
      num_tokens, fanout).astype(jnp.int32)
  token_valid = token_row < num_rows
  gate = take_rows(routing.gates, expert)
  token_gate = jnp.where(token_valid, gate, 0.0)
  # Row r: block b = r // B of expert block_expert[b], offset within the expert.
  blocks = jnp.arange(nb, dtype=jnp.int32)
  block_expert = jnp.sum(block_end[None, :] <= blocks[:, None], axis=1,
                         dtype=jnp.int32)  # [N], E = unused
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  row_expert = jnp.minimum(jnp.repeat(block_expert, size), num_experts - 1)
  offset = rows - first_row[row_expert]
  row_valid = (jnp.repeat(block_expert, size) < num_experts) & (
      offset < counts[row_expert])
  row_source = jnp.take(source, starts[row_expert] + offset, mode="clip")
  row_token = jnp.where(row_valid, row_source // fanout, 0).astype(jnp.int32)
  row_gate = jnp.where(row_valid, jnp.take(token_gate.reshape(-1), row_source,
                                           mode="clip"), 0.0)
  kept = jnp.zeros((num_tokens, num_experts), bool).at[
      jnp.arange(num_tokens)[:, None], expert].set(valid)
  return BlockPlan(gates=routing.gates, kept=kept, row_token=row_token,
                   row_gate=row_gate, token_row=token_row,
                   token_gate=token_gate, block_expert=block_expert,
                   group_sizes=counts, block_loop=use_loop_matmul())



def dropless_plan(routing: Routing, max_fanout: int) -> DroplessPlan:
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


