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

`top_p` is the router, `TopP` the method (`--router=top_p`); DTop-p
(`moejax.routing.dtopp`) shares the selection. The fanout varies per token:
capacity comes from the target fanout `k` (the `capacity` formula) and the
dropless bound is `max_k`. Over capacity an expert keeps first choices before
later ones, so high-fanout tokens lose their tail experts first; the layer
reports `drop_fraction` and `drop_fraction_above_mean` (drops among tokens with
more experts than the mean), and the routers report `top_p_capped` (tokens
whose fanout `max_k` cut).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.checks import check_int, check_p
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 check_logits, choice_priority, finite_tokens,
                                 guard_tokens, register, scatter_choices,
                                 stats_probs, top_k_rows)


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
  values, index = top_k_rows(probs, max_k)
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
    logits: float32[S, E] raw router logits (for the z-loss and its metric;
      a token with a NaN or +inf logit is routed nowhere and left out of the
      aux losses and metrics).
    probs: float32[S, E] routing probabilities, computed from the guarded
      logits (`guard_tokens`) so that their gradient is finite.
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
  ok = finite_tokens(logits)
  values, index, keep, capped = top_p_prefix(probs, p, max_k)
  keep = keep & ok[:, None]
  kept_values = jnp.where(keep, values, 0.0)
  mass = kept_values.sum(axis=-1, keepdims=True)
  weights = kept_values / jnp.where(ok[:, None], mass, 1.0) if normalize \
      else values
  gates = scatter_choices(weights, index, num_experts, keep)
  priority = choice_priority(index, num_experts)
  routing = Routing(gates=gates, priority=priority)
  probs = stats_probs(probs, ok)
  metrics = losses.routing_metrics(routing, probs, logits)
  metrics["top_p_capped"] = losses.finite_mean(
      jnp.where(ok, capped.astype(jnp.float32), jnp.nan))
  metrics["selected_mass"] = losses.finite_mean(
      jnp.where(ok, mass[:, 0], jnp.nan))
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
  probs = jax.nn.softmax(guard_tokens(logits)[0], axis=-1)
  return select_top_p(logits, probs, p, max_k, normalize)


def check_max_k(method: RouterMethod, num_experts: int | None = None) -> None:
  max_k = method.max_k
  if max_k is None:
    return
  if isinstance(max_k, bool) or not isinstance(max_k, numbers.Integral):
    raise ValueError(f"max_k={max_k!r} must be an integer or None")
  high = "num_experts" if num_experts is not None else "E"
  if max_k < method.k or (num_experts is not None and max_k > num_experts):
    raise ValueError(f"max_k={max_k} is out of range; allowed: "
                     f"k={method.k} <= max_k <= {high}"
                     + (f"={num_experts}" if num_experts is not None else ""))


@register
@dataclasses.dataclass(frozen=True)
class TopP(RouterMethod):
  """Fixed-threshold top-p (Huang et al. 2024): the naive baseline.

  Attributes:
    k: target mean fanout; sets capacity only (top-p does not control it).
    p: threshold in (0, 1] (0.4 in the original method).
    max_k: static fanout cap (None = E), >= k.
    normalize: renormalise kept weights (False = raw probabilities, original).
  Aux losses (original method): load balance 1e-2, entropy 1e-4, no z-loss.
  """
  name: ClassVar[str] = "top_p"
  aux_weights: ClassVar[Mapping[str, float]] = {
      "load_balance": 1e-2, "z_loss": 0.0, "entropy": 1e-4}
  p: float = 0.4
  max_k: int | None = None
  normalize: bool = False

  def __post_init__(self):
    super().__post_init__()
    if (isinstance(self.p, bool) or not isinstance(self.p, numbers.Real)
        or not 0 < self.p <= 1):
      raise ValueError(f"p={self.p!r} is out of range; allowed: (0, 1]")
    check_max_k(self)

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    check_max_k(self, num_experts)

  def max_fanout(self, num_experts: int) -> int:
    return num_experts if self.max_k is None else self.max_k

  def route(self, logits, state, *, rng, train):
    del state, rng, train
    return top_p(logits, self.p, max_k=self.max_k, normalize=self.normalize)
