"""The plan contract of every dispatch strategy and the one strategy table.

Axis legend:
  S  tokens in one group (all groups laid end to end where a plan has several)
  E  experts
  C  capacity (slots per expert)
  D  model width
  L  a plan's own row layout: [E, C, D] slots, or rows sorted by expert

A plan (V-MoE's dispatcher) is a pytree built from a `Routing` by
`moejax.dispatch.plan`; every strategy's plan subclasses `Plan` and answers:

  plan.dispatch(x float[S, D]) -> float[L..., D]   tokens into the layout
  plan.matmul(h, w float[E, A, B])                 each row times its expert's
                                                   weight (the expert MLP's
                                                   matmul on this layout)
  plan.combine(y float[L..., D]) -> float[S, D]    sum over kept assignments of
                                                   gate * row
  plan.kept bool[S, E]                             assignments that survived
                                                   capacity
  plan.block_loop / plan.row_blocks()              the rows in blocks of one
                                                   expert each, for the fused
                                                   CPU block loop (only where
                                                   `block_loop` is True)

Strategies are named once here (`Strategy`, `STRATEGIES`) with their layout
(`LAYOUTS`); the backend resolves "auto" and "dropless" to a concrete one
(`moejax.backend.resolve_strategy`). The defaults: `DEFAULT_STRATEGY` ("auto")
for the MoE layer and `expert_parallel.routed_experts`; `PLAN_STRATEGY`
("index", the public default of `plan()`, and the plan `nn/mod.py` builds: its
`SlotPlan.token_index` gives the slots' token positions).
"""
from __future__ import annotations

import typing
from typing import Literal

import jax

Strategy = Literal["auto", "einsum", "index", "gather", "dropless", "sorted",
                   "ragged"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
# The layout of each strategy: "slots" = capacity-bounded [E, C, D]; "rows" =
# dropless rows sorted by expert; "auto" is a slot strategy of the backend
# (`moejax.backend.AUTO_STRATEGY`), "dropless" the backend's rows strategy.
LAYOUTS: dict[str, str] = {
    "auto": "slots", "einsum": "slots", "index": "slots", "gather": "slots",
    "dropless": "rows", "sorted": "rows", "ragged": "rows"}
# Strategies that keep capacity (the [E, C, D] layout) and those that ignore
# it and keep every assignment within the fanout bound.
SLOT_STRATEGIES: tuple[str, ...] = tuple(
    s for s in STRATEGIES if LAYOUTS[s] == "slots" and s != "auto")
DROPLESS: tuple[str, ...] = tuple(s for s in STRATEGIES if LAYOUTS[s] == "rows")
DEFAULT_STRATEGY: Strategy = "auto"
PLAN_STRATEGY: Strategy = "index"


class Plan:
  """Base class of the plans (`SlotPlan`, `GatherPlan`, `BlockPlan`,
  `DroplessPlan`): the interface of the module docstring."""
  # Whether the plan offers `row_blocks()` for the fused CPU block loop
  # (a field or property of the plans that have one).
  # `kept` (bool[S, E]) is a field or property of each plan; no default here
  # (a dataclass field would take an inherited attribute as its default).
  block_loop: bool = False

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> the plan's layout."""
    raise NotImplementedError

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """Rows of the layout times their experts' weights float[E, A, B]."""
    raise NotImplementedError

  def combine(self, y: jax.Array) -> jax.Array:
    """The layout -> float[S, D]: sum over kept assignments of gate * row."""
    raise NotImplementedError

  def row_blocks(self):
    """The rows in blocks of one expert each (`moejax.dispatch.cpu.RowBlocks`);
    only where `block_loop`."""
    raise NotImplementedError(f"{type(self).__name__} has no CPU block loop")
