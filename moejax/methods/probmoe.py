"""ProbMoE methods: exact-k and dynamic-k probabilistic routing.

Axis legend:
  S  tokens in one group
  E  experts

Both sample their subsets in training (the layer draws `make_rng("router")`;
the train step folds the step into the state's key, so runs are reproducible
and resume exactly) and are deterministic in evaluation (exact-k: top-k;
dynamic-k: the MAP subset). No aux loss is part of the method; the layer's usual
aux-loss options (and defaults) apply.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

from moejax import routing
from moejax.methods.base import RouterMethod, register

# The module (the package attribute `routing.exact_k` is the function).
_ek = importlib.import_module("moejax.routing.exact_k")


def _route_groups(method, k_min, k_max, logits, state, rng, train):
  """Training: all groups' tokens in one pass (tokens are independent; a vmap
  over groups batches the scans and is ~2x slower on CPU). Evaluation: the
  default per-group vmap of `route`."""
  if train and rng is not None:
    return _ek.sampled_groups(logits, k_min, k_max, rng)
  return RouterMethod.route_groups(method, logits, state, rng=rng, train=train)


@register
@dataclasses.dataclass(frozen=True)
class ExactK(RouterMethod):
  """ProbMoE exact-k: an exact k-subset from the conditional-Bernoulli
  distribution of sigmoid(logits), straight-through gates with the gradient of
  the exact marginals (training); top-k of softmax, not renormalised (eval)."""
  name: ClassVar[str] = "exact_k"
  uses_rng: ClassVar[bool] = True

  def max_fanout(self, num_experts: int) -> int:
    return min(self.k, num_experts)

  def route(self, logits, state, *, rng, train):
    del state
    return routing.exact_k(logits, self.k, rng=rng if train else None)

  def route_groups(self, logits, state, *, rng, train):
    return _route_groups(self, self.k, self.k, logits, state, rng, train)


@register
@dataclasses.dataclass(frozen=True)
class DynamicK(RouterMethod):
  """ProbMoE dynamic-k: size k in [k_min, k_max] drawn with probability
  Z_k / Z*, then an exact k-subset (training); the MAP subset (eval).

  Attributes:
    k: target mean fanout (sets the capacity), as for every method;
      k_min <= k <= k_max.
    k_min, k_max: the size range, 1 <= k_min <= k_max <= num_experts. Defaults:
      k_max = k, k_min = max(1, k_max - 2) (the paper's [6, 8] at top-8,
      [2, 4] at top-4).
  """
  name: ClassVar[str] = "dynamic_k"
  uses_rng: ClassVar[bool] = True
  k_min: int | None = None
  k_max: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.k_max is None:
      object.__setattr__(self, "k_max", self.k)
    if self.k_min is None:
      object.__setattr__(self, "k_min", max(1, self.k_max - 2))
    for name in ("k_min", "k_max"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is out of range; allowed: "
                         "integer >= 1")
    if self.k_min > self.k_max:
      raise ValueError(f"k_min={self.k_min} is out of range; allowed: "
                       f"1 <= k_min <= k_max={self.k_max}")
    if not self.k_min <= self.k <= self.k_max:
      raise ValueError(f"k={self.k} (the target fanout that sets capacity) is "
                       f"out of range; allowed: k_min={self.k_min} <= k <= "
                       f"k_max={self.k_max}")

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    if self.k_max > num_experts:
      raise ValueError(
          f"k_max={self.k_max} is larger than num_experts={num_experts}; "
          f"allowed: k_min <= k_max <= num_experts")

  def max_fanout(self, num_experts: int) -> int:
    return min(self.k_max, num_experts)

  def route(self, logits, state, *, rng, train):
    del state
    return routing.dynamic_k(logits, self.k_min, self.k_max,
                             rng=rng if train else None)

  def route_groups(self, logits, state, *, rng, train):
    return _route_groups(self, self.k_min, self.k_max, logits, state, rng,
                         train)
