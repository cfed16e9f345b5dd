"""Dispatch: a `Routing` -> a static-shape plan that moves tokens to experts.

Reading order: `base` (the `Plan` contract, the strategy table), `plans`
(`plan()`, the strategies), `slots` and `dropless`
(the layouts), `kernels` (their differentiable row movers), `cpu` (the fused
block loop of the CPU path); every backend-dependent choice is made in
`moejax.backend`.
The expert weights and MLP live in `moejax.experts`.
"""
from moejax.backend import (choose_strategy, current_backend,
                            resolve_strategy, use_loop_matmul)
from moejax.dispatch.base import (DEFAULT_STRATEGY, LAYOUTS, PLAN_STRATEGY,
                                  SLOT_STRATEGIES, Strategy)
from moejax.dispatch.cpu import BLOCK_ROWS, RowBlocks, block_ffn, block_moe
from moejax.dispatch.dropless import (BlockPlan, DroplessPlan,
                                      default_block_size, num_blocks)
from moejax.dispatch.kernels import (gather_combine, gather_rows,
                                     grouped_matmul, scatter_combine)
from moejax.dispatch.plans import (DROPLESS, STRATEGIES, Plan, capacity,
                                   drop_fraction, plan, ratio_capacity)
from moejax.dispatch.slots import (GatherPlan, SlotPlan, slot_block_size,
                                   slot_ranks)

__all__ = [
    "plan", "capacity", "ratio_capacity", "drop_fraction", "STRATEGIES",
    "DROPLESS", "SLOT_STRATEGIES", "LAYOUTS", "DEFAULT_STRATEGY",
    "PLAN_STRATEGY", "Strategy", "Plan", "SlotPlan", "GatherPlan", "BlockPlan", "DroplessPlan",
    "RowBlocks", "choose_strategy", "resolve_strategy", "use_loop_matmul",
    "current_backend",
    "default_block_size", "num_blocks", "slot_block_size", "slot_ranks",
    "BLOCK_ROWS", "gather_rows", "gather_combine", "scatter_combine",
    "grouped_matmul", "block_moe", "block_ffn",
]
