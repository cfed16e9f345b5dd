"""Expert-choice routing (Zhou et al. 2022): each expert picks its tokens.

Axis legend:
  S  tokens in one group
  E  experts
  C  capacity (tokens per expert)

`expert_choice` is the router, `ExpertChoice` the method (`--router=
expert_choice`). Balanced by construction, but not token-local: a token's
routing depends on the other tokens of its group. `select_top_tokens` is also
Mixture-of-Depths' block selection (one expert).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.checks import check_int
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 ceil_div, check_capacity_args, check_logits,
                                 finite_tokens, register, scatter_rows)

_TINY = float(jnp.finfo(jnp.float32).tiny)


def select_top_tokens(scores: jax.Array, capacity: int) -> jax.Array:
  """bool[S, E]: for each expert (column) its `capacity` highest-score tokens.

  Ties go to the lower token index (lax.top_k is stable). A capacity above S
  keeps every token.

  Args:
    scores: float32[S, E].
    capacity: static C >= 1.
  """
  num_tokens = scores.shape[0]
  capacity = min(capacity, num_tokens)
  _, index = jax.lax.top_k(scores.T, capacity)  # [E, C]
  chosen = scatter_rows(jnp.ones(index.shape, jnp.float32), index, num_tokens)
  return chosen.T > 0  # [S, E]


def expert_choice(logits: jax.Array, capacity: int) -> RouterOutput:
  """Softmax over experts; each expert keeps its `capacity` most probable tokens.

  Args:
    logits: float32[S, E].
    capacity: static integer C >= 1 (C = ceil(ratio * S)); above S means all.
  Returns:
    RouterOutput with gate = the softmax probability at chosen (token, expert)
    pairs and priority = that probability. A token with a NaN or +inf logit
    (see `finite_tokens`) is routed nowhere and ranks below every other token,
    so it never takes a slot; its priority is -1 and no gradient reaches it.
  """
  logits = check_logits(logits)
  capacity = check_int("capacity", capacity, 1)
  finite = finite_tokens(logits)[:, None]
  probs = jax.nn.softmax(jnp.where(finite, logits, 0.0), axis=-1)
  chosen = select_top_tokens(jnp.where(finite, probs, -1.0), capacity) & finite
  probs = jnp.where(finite, probs, jnp.nan)  # left out of aux and metrics
  gates = jnp.where(chosen, jnp.maximum(probs, _TINY), 0.0)
  routing = Routing(gates=gates, priority=jnp.where(finite, probs, -1.0))
  return losses.standard_output(logits, probs, routing)


@register
@dataclasses.dataclass(frozen=True)
class ExpertChoice(RouterMethod):
  """Expert choice: each expert takes ceil(S * k / E) tokens of the group
  (`k` = mean fanout); balanced by construction, not causal."""
  name: ClassVar[str] = "expert_choice"
  token_local: ClassVar[bool] = False
  aux_weights: ClassVar = {"load_balance": 0.0, "z_loss": 1e-3, "entropy": 0.0}

  def capacity(self, num_tokens, num_experts, capacity_factor):
    # Checked, then unused: the routing itself fixes the load.
    check_capacity_args(num_tokens, capacity_factor)
    return min(num_tokens, ceil_div(num_tokens * self.k, num_experts))

  def route(self, logits, state, *, rng, train):
    del state, rng, train
    num_tokens, num_experts = check_logits(logits).shape
    return expert_choice(logits,
                         self.capacity(num_tokens, num_experts, 1.0))
