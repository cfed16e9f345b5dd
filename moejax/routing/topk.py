"""Token-choice top-k routing (Switch k=1, GShard k=2, fine-grained k=8).

Axis legend:
  S  tokens in one group
  E  experts
  K  choices per token (k)

`top_k` is the router; `TopK` the method (`--router=top_k`), balanced by the
load-balance loss (or not at all). Loss-free balancing, by a selection bias, is
its own method in `moejax.routing.lossfree`.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from moejax.checks import check_choice, check_int
from moejax.routing import losses
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 check_logits, choice_priority, guard_tokens,
                                 register, scatter_choices, stats_probs,
                                 top_k_rows)
from moejax.routing.lossfree import SCORE_FNS, ScoreFn, biased_top_k

Balance = Literal["aux", "none"]
BALANCES: tuple[str, ...] = typing.get_args(Balance)
# The load-balance loss weight of each `balance`.
BALANCE_WEIGHTS = {"aux": RouterMethod.aux_weights["load_balance"],
                   "none": 0.0}


def top_k(logits: jax.Array, k: int, *, normalize: bool = True,
          rng: jax.Array | None = None,
          random_second: bool = False) -> RouterOutput:
  """Softmax over experts, keep the k largest per token.

  Args:
    logits: float32[S, E] router logits.
    k: static number of experts per token, 1 <= k <= E.
    normalize: renormalise the kept probabilities to sum to 1 per token.
    rng: PRNG key, used only with `random_second`.
    random_second: GShard's random second expert: keep the second choice with
      probability min(1, 2 * g2), g2 its weight renormalised over the top two.
  Returns:
    RouterOutput; `routing.priority` puts every first choice before every second
    choice (k - rank), ties broken by the dispatcher toward earlier tokens. A
    token with a NaN or +inf logit (`finite_tokens`) is routed nowhere, with a
    gradient row of 0 (`guard_tokens`).
  """
  logits = check_logits(logits)
  num_experts = logits.shape[-1]
  k = check_int("k", k, 1, num_experts)
  safe, ok = guard_tokens(logits)
  probs = jax.nn.softmax(safe, axis=-1)
  top_p, index = top_k_rows(probs, k)  # [S, K]
  weights = top_p
  if normalize:
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  keep = jnp.broadcast_to(ok[:, None], index.shape)
  if random_second:
    if rng is None:
      raise ValueError("random_second=True needs rng")
    if k >= 2:
      g2 = top_p[:, 1] / (top_p[:, 0] + top_p[:, 1])
      u = jax.random.uniform(rng, g2.shape)
      keep_second = u < jnp.minimum(1.0, 2.0 * g2)
      keep = keep.at[:, 1].set(keep[:, 1] & keep_second)
  gates = scatter_choices(weights, index, num_experts, keep)
  priority = choice_priority(index, num_experts)
  routing = Routing(gates=gates, priority=priority)
  return losses.standard_output(logits, stats_probs(probs, ok), routing)


@register
@dataclasses.dataclass(frozen=True)
class TopK(RouterMethod):
  """Top-k token choice. `normalize` renormalises the kept weights;
  `random_second` is GShard's random second expert (training only).

  `balance`: "aux" = the load-balance loss (weight 1e-2 by default), "none" =
  no balance loss. Loss-free balancing is its own method, `LossFreeTopK`
  (`moejax.routing.lossfree`; `balance="loss_free"` in `routing.build` and
  on the command line builds it). `score_fn` ("softmax" or "sigmoid") makes
  the affinity scores.
  """
  name: ClassVar[str] = "top_k"
  normalize: bool = True
  random_second: bool = False
  balance: Balance = "aux"
  score_fn: ScoreFn = "softmax"

  def __post_init__(self):
    super().__post_init__()
    if self.balance == "loss_free":
      raise ValueError("balance='loss_free' is not an option of TopK; allowed: "
                       "aux, none (loss-free top-k is LossFreeTopK, "
                       "router 'loss_free')")
    check_choice("balance", self.balance, BALANCES)
    check_choice("score_fn", self.score_fn, SCORE_FNS)
    if self.random_second and self.score_fn != "softmax":
      raise ValueError("random_second=True is only supported with "
                       "score_fn='softmax'")

  @property
  def uses_rng(self) -> bool:  # type: ignore[override]
    return self.random_second

  @property
  def aux_weights(self):  # type: ignore[override]
    return {**RouterMethod.aux_weights,
            "load_balance": BALANCE_WEIGHTS[self.balance]}

  def max_fanout(self, num_experts: int) -> int:
    return min(self.k, num_experts)

  def route(self, logits, state, *, rng, train):
    if self.score_fn != "softmax":
      return biased_top_k(logits, self.k, None, score_fn=self.score_fn,
                          normalize=self.normalize)
    return top_k(logits, self.k, normalize=self.normalize,
                 rng=rng if train else None,
                 random_second=self.random_second and train)
