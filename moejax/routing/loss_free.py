"""Top-k with a selection-only bias (DeepSeek-V3 auxiliary-loss-free balancing).

Axis legend:
  S  tokens in one group
  E  experts
  K  choices per token (k)

The per-expert bias `b` (controller state, `moejax.control.SignBias`) shifts the
scores only when choosing the top-k; the combine weights are the unbiased
scores (renormalised over the chosen experts with `normalize`). Scores are the
softmax over experts or, as in DeepSeek-V3, the elementwise sigmoid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing.base import Routing, RouterOutput, check_int, check_logits
from moejax.routing.top_k import choice_priority, scatter_choices

SCORE_FNS = ("softmax", "sigmoid")


def router_scores(logits: jax.Array, score_fn: str = "softmax") -> jax.Array:
  """float32[S, E] affinity scores: softmax over E or elementwise sigmoid."""
  if score_fn == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score_fn == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"score_fn={score_fn!r} is not supported; allowed: "
                   f"{', '.join(SCORE_FNS)}")


def biased_top_k(logits: jax.Array, k: int, bias: jax.Array | None = None, *,
                 score_fn: str = "softmax",
                 normalize: bool = True) -> RouterOutput:
  """Token-choice top-k chosen on `scores + bias`, weighted by `scores`.

  Args:
    logits: float32[S, E] router logits.
    k: static experts per token, 1 <= k <= E.
    bias: float32[E] selection bias (None = zeros; traced ok).
    score_fn: "softmax" or "sigmoid".
    normalize: renormalise the chosen scores to sum to 1 per token.
  Returns:
    RouterOutput; priority puts first choices (by biased score) before second
    choices. aux: the standard losses with `probs` = scores normalised over E
    (for sigmoid scores `s / sum(s)`).
  """
  logits = check_logits(logits)
  num_experts = logits.shape[-1]
  k = check_int("k", k, 1, num_experts)
  scores = router_scores(logits, score_fn)
  biased = scores if bias is None else scores + jnp.asarray(
      bias, jnp.float32)[None, :]
  _, index = jax.lax.top_k(biased, k)  # [S, K]
  chosen = jnp.take_along_axis(scores, index, axis=-1)
  weights = chosen
  if normalize:
    weights = chosen / jnp.maximum(jnp.sum(chosen, axis=-1, keepdims=True),
                                   1e-30)
  gates = scatter_choices(weights, index, num_experts)
  routing = Routing(gates=gates, priority=choice_priority(index, num_experts))
  probs = scores if score_fn == "softmax" else scores / jnp.sum(
      scores, axis=-1, keepdims=True)
  return RouterOutput(
      routing=routing,
      aux=losses.standard_aux(logits, probs, routing),
      metrics=losses.routing_metrics(routing, probs, logits))
