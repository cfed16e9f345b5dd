"""Expert-choice routing (Zhou et al. 2022): each expert picks its tokens.

Axis legend:
  S  tokens in one group
  E  experts
  C  capacity (tokens per expert)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing.base import (Routing, RouterOutput, check_int, check_logits)
from moejax.routing.top_k import scatter_rows

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
    pairs and priority = that probability.
  """
  logits = check_logits(logits)
  capacity = check_int("capacity", capacity, 1)
  probs = jax.nn.softmax(logits, axis=-1)
  chosen = select_top_tokens(probs, capacity)
  gates = jnp.where(chosen, jnp.maximum(probs, _TINY), 0.0)
  routing = Routing(gates=gates, priority=probs)
  return RouterOutput(
      routing=routing,
      aux=losses.standard_aux(logits, probs, routing),
      metrics=losses.routing_metrics(routing, probs, logits))
