"""Fixed-threshold top-p routing ("Harder Tasks Need More Experts", Huang et al. 2024).

Axis legend:
  S  tokens in one group
  E  experts
  K  sorted prefix kept for the threshold (static `max_k`, default E)

Each token keeps the shortest prefix of its experts, sorted by probability
descending, whose cumulative probability reaches `p`; the expert that crosses `p`
is kept, so every token gets at least one expert. Shapes stay static: the router
takes the top `max_k` experts, sums them cumulatively and zeroes the gates past
the threshold. `p` may be a traced scalar (a controller changes it every step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing.base import (Routing, RouterOutput, check_int, check_logits,
                                 check_p)
from moejax.routing.top_k import choice_priority, scatter_choices


def resolve_max_k(max_k: int | None, num_experts: int) -> int:
  """The static prefix length: `max_k` checked against E (None = E)."""
  if max_k is None:
    return num_experts
  return check_int("max_k", max_k, 1, num_experts)


def top_p_prefix(probs: jax.Array, p, max_k: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The kept prefix of each token's sorted probabilities.

  Args:
    probs: float32[S, E] probabilities (rows sum to 1).
    p: threshold in (0, 1], Python float or float32[] (may be traced).
    max_k: static K, 1 <= K <= E.
  Returns:
    values: float32[S, K] the K largest probabilities, descending (ties: lower
      expert index first).
    index: int32[S, K] their experts.
    keep: bool[S, K]; position j is kept iff j == 0 or the cumulative sum of
      positions < j is still below p.
    capped: bool[S]; the K-prefix ended before reaching p (the fanout was cut
      by `max_k`; always False when K = E up to rounding).
  """
  values, index = jax.lax.top_k(probs, max_k)
  cum = jnp.cumsum(values, axis=-1)
  before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
  p = jnp.asarray(p, jnp.float32)
  keep = before < p
  keep = keep.at[:, 0].set(True)
  capped = cum[:, -1] < p
  return values, index, keep, capped


def select_top_p(logits: jax.Array, probs: jax.Array, p, max_k: int,
                 normalize: bool) -> RouterOutput:
  """Top-p selection of given probabilities (shared by `top_p` and `dtop_p`).

  Args:
    logits: float32[S, E] raw router logits (for the z-loss and its metric).
    probs: float32[S, E] routing probabilities.
    p: threshold in (0, 1] (may be traced).
    max_k: static K.
    normalize: renormalise the kept weights to sum to 1 per token.
  Returns:
    RouterOutput. Priority = K - rank (every first choice before every second
    choice), so over capacity the tail experts of high-fanout tokens go first.
    Metrics add `top_p_capped` (fraction of tokens whose fanout `max_k` cut) and
    `selected_mass` (mean kept probability per token).
  """
  num_experts = probs.shape[-1]
  values, index, keep, capped = top_p_prefix(probs, p, max_k)
  kept_values = jnp.where(keep, values, 0.0)
  mass = kept_values.sum(axis=-1, keepdims=True)
  weights = kept_values / mass if normalize else values
  gates = scatter_choices(weights, index, num_experts, keep)
  priority = choice_priority(index, num_experts)
  routing = Routing(gates=gates, priority=priority)
  metrics = losses.routing_metrics(routing, probs, logits)
  metrics["top_p_capped"] = capped.mean().astype(jnp.float32)
  metrics["selected_mass"] = mass.mean()
  return RouterOutput(routing=routing,
                      aux=losses.standard_aux(logits, probs, routing),
                      metrics=metrics)


def top_p(logits: jax.Array, p, *, max_k: int | None = None,
          normalize: bool = False) -> RouterOutput:
  """Softmax over experts, keep the shortest prefix reaching p.

  Args:
    logits: float32[S, E] router logits.
    p: threshold in (0, 1]; a Python float (validated) or a traced float32[].
    max_k: static cap on the fanout, 1 <= max_k <= E (None = E).
    normalize: renormalise the kept weights (False = the raw probabilities, as
      in the original method).
  Returns:
    RouterOutput with a variable fanout per token (at least 1, at most max_k).
  """
  logits = check_logits(logits)
  check_p("p", p)
  max_k = resolve_max_k(max_k, logits.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)
  return select_top_p(logits, probs, p, max_k, normalize)
