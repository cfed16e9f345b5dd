"""DTop-p routing (Jin et al., "Sparsity-Controlled Dynamic Top-p MoE", 2025).

Axis legend:
  S  tokens in one group
  E  experts
  K  sorted prefix kept for the threshold (static `max_k`, default E)

Dynamic routing normalisation plus top-p with renormalised weights: each token's
logits are standardised over the experts (zero mean, unit population std), scaled
by the layer's learned scalar gamma (`scale`), passed through a softmax, and the
shortest prefix reaching `p` is kept. `p` comes from a PI controller
(`moejax.control.PIController`) and `scale` from a param of the MoE layer; both
may be traced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing.base import RouterOutput, check_logits, check_p
from moejax.routing.top_p import resolve_max_k, select_top_p

# Added to the variance inside the square root: keeps the gradient finite when
# all of a token's logits are equal (std = 0) and is well below the spec's 1e-4.
STD_EPS = 1e-6


def standardize(logits: jax.Array, eps: float = STD_EPS) -> jax.Array:
  """float32[S, E] -> float32[S, E]: (r - mean_E r) / sqrt(var_E r + eps).

  Population variance (ddof = 0); invariant to adding a per-token constant and,
  up to eps, to multiplying by a positive one.
  """
  logits = logits.astype(jnp.float32)
  mean = logits.mean(axis=-1, keepdims=True)
  centred = logits - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(var + eps)


def dtop_p(logits: jax.Array, p, *, scale=1.0,
           max_k: int | None = None) -> RouterOutput:
  """DTop-p routing of one group.

  Args:
    logits: float32[S, E] raw router logits.
    p: threshold in (0, 1]; Python float (validated) or traced float32[].
    scale: gamma, the layer's learned scale of the standardised logits (float
      or float32[]; gradients flow to it).
    max_k: static cap on the fanout, 1 <= max_k <= E (None = E).
  Returns:
    RouterOutput; gates = the kept probabilities of softmax(scale * r_hat),
    renormalised to sum to 1 per token. `aux` holds `load_balance` and
    `entropy` of those probabilities and `z_loss` of the raw logits.
  """
  logits = check_logits(logits)
  check_p("p", p)
  max_k = resolve_max_k(max_k, logits.shape[-1])
  scaled = jnp.asarray(scale, jnp.float32) * standardize(logits)
  probs = jax.nn.softmax(scaled, axis=-1)
  return select_top_p(logits, probs, p, max_k, normalize=True)
