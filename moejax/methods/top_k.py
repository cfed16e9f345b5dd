"""Token-choice top-k and expert-choice methods (the classic baselines).

Axis legend:
  S  tokens in one group
  E  experts
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax import control, routing
from moejax.methods.base import RouterMethod, ceil_div, register
from moejax.routing.loss_free import SCORE_FNS, biased_top_k

BALANCES = ("aux", "loss_free", "none")


@register
@dataclasses.dataclass(frozen=True)
class TopK(RouterMethod):
  """Top-k token choice. `normalize` renormalises the kept weights;
  `random_second` is GShard's random second expert (training only).

  Balancing (`balance`): "aux" = the load-balance loss (weight 1e-2 by
  default); "loss_free" = DeepSeek-V3's selection bias, a `control.SignBias`
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
    if self.balance not in BALANCES:
      raise ValueError(f"balance={self.balance!r} is not supported; allowed: "
                       f"{', '.join(BALANCES)}")
    if self.score_fn not in SCORE_FNS:
      raise ValueError(f"score_fn={self.score_fn!r} is not supported; allowed: "
                       f"{', '.join(SCORE_FNS)}")
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
  def controller(self) -> control.SignBias:
    return control.SignBias(rate=self.bias_update_rate)

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
    return routing.top_k(logits, self.k, normalize=self.normalize,
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


@register
@dataclasses.dataclass(frozen=True)
class ExpertChoice(RouterMethod):
  """Expert choice: each expert takes ceil(S * k / E) tokens of the group
  (`k` = mean fanout); balanced by construction, not causal."""
  name: ClassVar[str] = "expert_choice"
  aux_weights: ClassVar = {"load_balance": 0.0, "z_loss": 1e-3, "entropy": 0.0}

  def capacity(self, num_tokens, num_experts, capacity_factor):
    del capacity_factor  # the routing itself fixes the load
    return min(num_tokens, ceil_div(num_tokens * self.k, num_experts))

  def route(self, logits, state, *, rng, train):
    del state, rng, train
    num_tokens, num_experts = logits.shape
    return routing.expert_choice(
        logits, self.capacity(num_tokens, num_experts, 1.0))
