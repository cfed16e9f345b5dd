"""Expert Threshold routing as a method: EMA thresholds, warm-up, load bounds.

Axis legend:
  G  groups in the layer's batch
  S  tokens in one group
  N  tokens in the pool (G * S: the whole global batch the layer sees)
  E  experts

Training (`train=True`) pools every group of the layer's batch: the step is one
SPMD program, so a reduction over the `[G, S, E]` logits is a reduction over
the global batch. Each expert's cutoff (its k-th largest logit over the pool,
k = N f / E with f = `k`, the target mean fanout) is reported as the metric
`et_cutoff`; `update` feeds it to the layer's `control.ThresholdEMA`. For the
first `et_warmup_steps` steps the routing is expert choice over the pool; after
that tokens pass by the bias-corrected EMA thresholds, each expert's load
bounded to `[(1 - C) k, (1 + C) k]` (C = `et_capacity_bound`).

Evaluation and sampling (`train=False`) use the frozen thresholds alone: each
token's routing depends on that token's logits only (causal). Gates are
sigmoid(logit); one always-on shared expert is part of the method
(`default_num_shared = 1`, the CLI default for this router); no aux loss.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax import control, dispatch
from moejax.methods.base import RouterMethod, register
from moejax.routing.expert_threshold import (expert_threshold,
                                             expert_threshold_train,
                                             load_bounds,
                                             pool_tokens_per_expert)
from moejax.routing.base import RouterOutput


def _broadcast(tree, num_groups: int):
  return jax.tree.map(
      lambda v: jnp.broadcast_to(v, (num_groups,) + jnp.shape(v)), tree)


@register
@dataclasses.dataclass(frozen=True)
class ExpertThreshold(RouterMethod):
  """Expert Threshold routing (Sun et al. 2026).

  Attributes:
    k: target mean fanout f (routed experts per token, on average).
    et_warmup_steps: training steps routed by expert choice over the pool while
      the EMA already tracks (>= 0; the first step is always expert choice,
      since the EMA is empty then).
    et_beta: EMA decay of the thresholds in [0, 1).
    et_capacity_bound: C in [0, 1]; training loads stay within (1 +- C) k.
  """
  name: ClassVar[str] = "expert_threshold"
  aux_weights: ClassVar = {"load_balance": 0.0, "z_loss": 0.0, "entropy": 0.0}
  default_num_shared: ClassVar[int] = 1

  et_warmup_steps: int = 100
  et_beta: float = 0.999
  et_capacity_bound: float = 0.5

  def __post_init__(self):
    super().__post_init__()
    w = self.et_warmup_steps
    if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 0:
      raise ValueError(f"et_warmup_steps={w!r} is out of range; allowed: "
                       "integer >= 0")
    if not 0.0 <= self.et_beta < 1.0:
      raise ValueError(f"et_beta={self.et_beta} is out of range; allowed: "
                       "[0, 1)")
    if not 0.0 <= self.et_capacity_bound <= 1.0:
      raise ValueError(f"et_capacity_bound={self.et_capacity_bound} is out of "
                       "range; allowed: [0, 1]")

  @property
  def controller(self) -> control.ThresholdEMA:
    return control.ThresholdEMA(beta=self.et_beta)

  def capacity(self, num_tokens, num_experts, capacity_factor):
    # The training bounds allow (1 + C) k per expert: slots for that many.
    return dispatch.capacity(num_tokens, self.target_fanout, num_experts,
                             max(capacity_factor, 1.0 + self.et_capacity_bound))

  def init_state(self, num_experts):
    return self.controller.init(num_experts)

  def thresholds(self, state) -> jax.Array:
    """float32[E]: the routing thresholds (bias-corrected EMA)."""
    return self.controller.value(state)

  def in_warmup(self, state) -> jax.Array:
    """bool[]: route by expert choice (warm-up, or no cutoff seen yet)."""
    count = state["count"]
    return (count < self.et_warmup_steps) | (count == 0)

  def route(self, logits, state, *, rng, train):
    out = self.route_groups(logits[None], state, rng=rng, train=train)
    return jax.tree.map(lambda v: v[0], out)

  def route_groups(self, logits, state, *, rng, train) -> RouterOutput:
    del rng
    num_groups, num_tokens, num_experts = logits.shape
    pool = logits.reshape(num_groups * num_tokens, num_experts)
    k = pool_tokens_per_expert(pool.shape[0], self.target_fanout,
                                  num_experts)
    thresholds = self.thresholds(state)
    if train:
      out = expert_threshold_train(
          pool, thresholds, k, capacity_bound=self.et_capacity_bound,
          expert_choice=self.in_warmup(state))
      routing = jax.tree.map(lambda v: v.reshape(logits.shape), out.routing)
      return RouterOutput(routing=routing,
                          aux=_broadcast(out.aux, num_groups),
                          metrics=_broadcast(out.metrics, num_groups))
    out = jax.vmap(lambda l: expert_threshold(l, thresholds))(logits)
    # Diagnostics only (routing above is per token): would the bounds bind?
    low, high = load_bounds(k, self.et_capacity_bound)
    n_pass = jnp.sum(pool > thresholds[None, :], axis=0)
    extra = {"et_pass_fraction": jnp.sum(n_pass) / float(num_experts * k),
             "et_bound_low": jnp.mean(n_pass < low).astype(jnp.float32),
             "et_bound_high": jnp.mean(n_pass > high).astype(jnp.float32)}
    out.metrics.update(_broadcast(extra, num_groups))
    return out

  def update(self, states, metrics, step):
    del step  # the state's own count says where warm-up ends
    ctrl = self.controller
    return {path: ctrl.update(states[path], metrics[path]["et_cutoff"])
            for path in states}

  def state_metrics(self, states):
    if not states:
      return {}
    values = list(states.values())
    return {
        "et_threshold": jnp.mean(jnp.stack(
            [jnp.mean(self.thresholds(s)) for s in values])),
        "et_warmup": self.in_warmup(values[0]).astype(jnp.float32),
    }
