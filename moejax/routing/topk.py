"""Token-choice top-k routing (Switch k=1, GShard k=2, fine-grained k=8).

Axis legend:
  S  tokens in one group
  E  experts
  K  choices per token (k)

`top_k` is the router; `TopK` the method (`--router=top_k`), balanced by the
load-balance loss or, with `balance="loss_free"`, by the selection bias of
`moejax.routing.lossfree`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.checks import check_choice
from moejax.routing import losses
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 check_int, check_logits, choice_priority,
                                 register, scatter_choices, top_k_rows)
from moejax.routing.lossfree import SCORE_FNS, SignBias, biased_top_k

BALANCES = ("aux", "loss_free", "none")


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
    choice (k - rank), ties broken by the dispatcher toward earlier tokens.
  """
  logits = check_logits(logits)
  num_experts = logits.shape[-1]
  k = check_int("k", k, 1, num_experts)
  probs = jax.nn.softmax(logits, axis=-1)
  top_p, index = top_k_rows(probs, k)  # [S, K]
  weights = top_p
  if normalize:
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  keep = None
  if random_second:
    if rng is None:
      raise ValueError("random_second=True needs rng")
    if k >= 2:
      g2 = top_p[:, 1] / (top_p[:, 0] + top_p[:, 1])
      u = jax.random.uniform(rng, g2.shape)
      keep_second = u < jnp.minimum(1.0, 2.0 * g2)
      keep = jnp.ones(index.shape, bool).at[:, 1].set(keep_second)
  gates = scatter_choices(weights, index, num_experts, keep)
  priority = choice_priority(index, num_experts)
  routing = Routing(gates=gates, priority=priority)
  return losses.standard_output(logits, probs, routing)


@register
@dataclasses.dataclass(frozen=True)
class TopK(RouterMethod):
  """Top-k token choice. `normalize` renormalises the kept weights;
  `random_second` is GShard's random second expert (training only).

  Balancing (`balance`): "aux" = the load-balance loss (weight 1e-2 by
  default); "loss_free" = DeepSeek-V3's selection bias, a `SignBias`
  per layer (state `{"bias": [E]}`, updated after each step from the global
  loads with speed `bias_update_rate`), no balance loss; "none" = neither.
  `score_fn` ("softmax" or "sigmoid") makes the affinity scores.
  """
  name: ClassVar[str] = "top_k"
  normalize: bool = True
  random_second: bool = False
  balance: str = "aux"
  bias_update_rate: float = 1e-3
  score_fn: str = "softmax"

  def __post_init__(self):
    super().__post_init__()
    check_choice("balance", self.balance, BALANCES)
    check_choice("score_fn", self.score_fn, SCORE_FNS)
    if not self.bias_update_rate > 0:
      raise ValueError(f"bias_update_rate={self.bias_update_rate} is out of "
                       "range; allowed: > 0")
    if self.random_second and (self.balance == "loss_free"
                               or self.score_fn != "softmax"):
      raise ValueError("random_second=True is only supported with "
                       "balance in (aux, none) and score_fn='softmax'")

  @property
  def uses_rng(self) -> bool:  # type: ignore[override]
    return self.random_second

  @property
  def aux_weights(self):  # type: ignore[override]
    weights = dict(RouterMethod.aux_weights)
    if self.balance != "aux":
      weights["load_balance"] = 0.0
    return weights

  @property
  def controller(self) -> SignBias:
    return SignBias(rate=self.bias_update_rate)

  def max_fanout(self, num_experts: int) -> int:
    return min(self.k, num_experts)

  def init_state(self, num_experts):
    if self.balance == "loss_free":
      return self.controller.init(num_experts)
    return {}

  def route(self, logits, state, *, rng, train):
    if self.balance == "loss_free" or self.score_fn != "softmax":
      return biased_top_k(logits, self.k, state.get("bias") if state else None,
                          score_fn=self.score_fn, normalize=self.normalize)
    return top_k(logits, self.k, normalize=self.normalize,
                 rng=rng if train else None,
                 random_second=self.random_second and train)

  def update(self, states, metrics, step):
    if self.balance != "loss_free":
      return dict(states)
    ctrl = self.controller
    return {path: ctrl.update(states[path], metrics[path]["expert_load"])
            for path in states}

  def state_metrics(self, states):
    if self.balance != "loss_free" or not states:
      return {}
    biases = jnp.stack([s["bias"] for s in states.values()])  # [L, E]
    return {"bias_spread": jnp.mean(biases.max(-1) - biases.min(-1))}
