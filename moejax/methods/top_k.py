"""Token-choice top-k and expert-choice methods (the classic baselines).

Axis legend:
  S  tokens in one group
  E  experts
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from moejax import routing
from moejax.methods.base import RouterMethod, ceil_div, register


@register
@dataclasses.dataclass(frozen=True)
class TopK(RouterMethod):
  """Top-k token choice. `normalize` renormalises the kept weights;
  `random_second` is GShard's random second expert (training only)."""
  name: ClassVar[str] = "top_k"
  normalize: bool = True
  random_second: bool = False

  @property
  def uses_rng(self) -> bool:  # type: ignore[override]
    return self.random_second

  def max_fanout(self, num_experts: int) -> int:
    return min(self.k, num_experts)

  def route(self, logits, state, *, rng, train):
    del state
    return routing.top_k(logits, self.k, normalize=self.normalize,
                         rng=rng if train else None,
                         random_second=self.random_second and train)


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
