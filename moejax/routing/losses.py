"""Auxiliary losses and routing metrics (unweighted; the layer applies weights).

Axis legend:
  S  tokens in one group
  E  experts
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing.base import Routing, RouterOutput


def load_balance_loss(probs: jax.Array, routed: jax.Array) -> jax.Array:
  """Switch/GShard load-balance loss `E * sum_e f_e * Pbar_e`; minimum 1 at uniform.

  Args:
    probs: float32[S, E] router probabilities.
    routed: bool[S, E] assignments; `f_e` = fraction of all assignments at e (no
      gradient), so with top-k the k choices count, divided by their total.
  Returns:
    float32[] scalar.
  """
  num_experts = probs.shape[-1]
  counts = routed.astype(jnp.float32).sum(axis=0)
  f = jax.lax.stop_gradient(counts / jnp.maximum(counts.sum(), 1.0))
  p_bar = probs.mean(axis=0)
  return num_experts * jnp.sum(f * p_bar)


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. float32[]."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def entropy(probs: jax.Array) -> jax.Array:
  """Mean over tokens of -sum_e P log P. float32[]."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def load_stats(load: jax.Array) -> dict[str, jax.Array]:
  """Balance statistics of a load vector float32[E] (counts or fractions)."""
  mean = jnp.maximum(load.mean(), 1e-9)
  return {
      "max_vio": (load.max() - load.mean()) / mean,
      "load_cv": load.std() / mean,
      "dead_experts": jnp.sum(load < 0.01 * load.mean()).astype(jnp.float32),
  }


def routing_metrics(routing: Routing, probs: jax.Array | None = None,
                    logits: jax.Array | None = None) -> dict[str, jax.Array]:
  """Metrics every router reports, for one group.

  Args:
    routing: the group's `Routing` (gates float32[S, E]).
    probs: optional float32[S, E] router probabilities (for `router_entropy`).
    logits: optional float32[S, E] logits (for `mean_logsumexp`).
  Returns:
    dict with `experts_per_token` [], `fanout_std` [], `zero_expert_fraction` [],
    `expert_load` [E] (fraction of assignments, sums to 1; uniform if none),
    `max_vio`, `load_cv`, `dead_experts` and, when given inputs allow,
    `router_entropy`, `mean_logsumexp`.
  """
  routed = routing.routed.astype(jnp.float32)
  fanout = routed.sum(axis=-1)
  counts = routed.sum(axis=0)
  total = counts.sum()
  num_experts = counts.shape[0]
  load = jnp.where(total > 0, counts / jnp.maximum(total, 1.0), 1.0 / num_experts)
  metrics = {
      "experts_per_token": fanout.mean(),
      "fanout_std": fanout.std(),
      "zero_expert_fraction": jnp.mean(fanout == 0).astype(jnp.float32),
      "expert_load": load,
      **load_stats(counts),
  }
  if probs is not None:
    metrics["router_entropy"] = entropy(probs)
  if logits is not None:
    metrics["mean_logsumexp"] = jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  return metrics


def standard_aux(logits: jax.Array, probs: jax.Array,
                 routing: Routing) -> dict[str, jax.Array]:
  """The three unweighted aux losses for a softmax router. float32[] each."""
  return {
      "load_balance": load_balance_loss(probs, routing.routed),
      "z_loss": z_loss(logits),
      "entropy": entropy(probs),
  }


def standard_output(logits: jax.Array, probs: jax.Array,
                    routing: Routing) -> RouterOutput:
  """A softmax router's output: `routing`, `standard_aux` and `routing_metrics`.

  logits, probs: float32[S, E].
  """
  return RouterOutput(routing=routing,
                      aux=standard_aux(logits, probs, routing),
                      metrics=routing_metrics(routing, probs, logits))
