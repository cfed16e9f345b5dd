"""Auxiliary losses and routing metrics (unweighted; the layer applies weights).

Axis legend:
  S  tokens in one group
  E  experts

Every loss and metric is a mean over the finite tokens of the group only: a token
whose row of logits (`finite_tokens`), probabilities or gates holds a NaN or inf
is left out, so one bad token cannot make the batch statistics non-finite.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing.base import Routing, RouterOutput, finite_tokens

# |logsumexp| above which the z-loss grows linearly instead of quadratically.
Z_LINEAR_FROM = 1e4


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
  ok = _finite_rows(probs)
  routed = routed & ok[:, None]
  counts = routed.astype(jnp.float32).sum(axis=0)
  f = jax.lax.stop_gradient(counts / jnp.maximum(counts.sum(), 1.0))
  p_bar = _masked_mean(jnp.where(ok[:, None], probs, 0.0), ok)
  return num_experts * jnp.sum(f * p_bar)


def _finite_rows(x: jax.Array) -> jax.Array:
  """bool[S]: rows of float32[S, E] without NaN or inf."""
  return jnp.all(jnp.isfinite(x), axis=-1)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the leading axis of x where bool[S] mask (0 if none)."""
  mask = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(mask, axis=0), 1).astype(jnp.float32)


def finite_mean(x: jax.Array) -> jax.Array:
  """Mean of float32[S] over its finite entries (0 if none)."""
  return _masked_mean(x, jnp.isfinite(x))


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over finite tokens of z(logsumexp(logits)).

  z(l) = l^2 for |l| <= T = `Z_LINEAR_FROM` and 2 T |l| - T^2 beyond (same value
  and slope at T): identical for ordinary logits, finite with a gradient that
  pulls the logits back for logits up to ~1e34 where l^2 would overflow float32.
  float32[].
  """
  ok = finite_tokens(logits)
  lse = jax.nn.logsumexp(jnp.where(ok[:, None], logits, 0.0), axis=-1)
  big = jnp.abs(lse) > Z_LINEAR_FROM
  small = jnp.where(big, 0.0, lse)
  z = jnp.where(big, 2.0 * Z_LINEAR_FROM * jnp.abs(lse) - Z_LINEAR_FROM**2,
                small * small)
  return _masked_mean(z, ok)


def entropy(probs: jax.Array) -> jax.Array:
  """Mean over finite tokens of -sum_e P log P. float32[]."""
  ok = _finite_rows(probs)
  probs = jnp.where(ok[:, None], probs, 0.0)
  return _masked_mean(
      -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1), ok)


def load_stats(load: jax.Array) -> dict[str, jax.Array]:
  """Balance statistics of a load vector float32[E] (counts or fractions)."""
  mean = jnp.maximum(load.mean(), 1e-9)
  return {
      "max_vio": (load.max() - load.mean()) / mean,
      "load_cv": load.std() / mean,
      "dead_experts": jnp.sum(load < 0.01 * load.mean()).astype(jnp.float32),
  }


def routing_metrics(routing: Routing, probs: jax.Array | None = None,
                    logits: jax.Array | None = None,
                    tokens: jax.Array | None = None) -> dict[str, jax.Array]:
  """Metrics every router reports, for one group.

  Args:
    routing: the group's `Routing` (gates float32[S, E]).
    probs: optional float32[S, E] router probabilities (for `router_entropy`).
    logits: optional float32[S, E] logits (for `mean_logsumexp`); tokens with
      a non-finite logit (`finite_tokens`) are left out.
    tokens: optional bool[S], the tokens to count (default all with finite
      gates and logits).
  Returns:
    dict with `experts_per_token` [], `fanout_std` [], `zero_expert_fraction` [],
    `expert_load` [E] (fraction of assignments, sums to 1; uniform if none),
    `max_vio`, `load_cv`, `dead_experts` and, when given inputs allow,
    `router_entropy`, `mean_logsumexp`.
  """
  ok = _finite_rows(routing.gates)
  if logits is not None:
    ok = ok & finite_tokens(logits)
  if tokens is not None:
    ok = ok & tokens
  routed = (routing.routed & ok[:, None]).astype(jnp.float32)
  fanout = routed.sum(axis=-1)
  counts = routed.sum(axis=0)
  total = counts.sum()
  num_experts = counts.shape[0]
  load = jnp.where(total > 0, counts / jnp.maximum(total, 1.0), 1.0 / num_experts)
  mean_fanout = _masked_mean(fanout, ok)
  metrics = {
      "experts_per_token": mean_fanout,
      "fanout_std": jnp.sqrt(_masked_mean((fanout - mean_fanout) ** 2, ok)),
      "zero_expert_fraction": _masked_mean(
          (fanout == 0).astype(jnp.float32), ok),
      "expert_load": load,
      **load_stats(counts),
  }
  if probs is not None:
    metrics["router_entropy"] = entropy(probs)
  if logits is not None:
    metrics["mean_logsumexp"] = _masked_mean(jax.nn.logsumexp(
        jnp.where(ok[:, None], logits, 0.0), axis=-1), ok)
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
