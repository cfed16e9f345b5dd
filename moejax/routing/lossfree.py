"""Auxiliary-loss-free balancing (DeepSeek-V3): top-k with a selection-only bias.

Axis legend:
  S  tokens in one group
  E  experts
  K  choices per token (k)

The per-expert bias `b` (controller state, `SignBias`) shifts the scores only when
choosing the top-k; the combine weights are the unbiased scores (renormalised over
the chosen experts with `normalize`). Scores are the softmax over experts or, as
in DeepSeek-V3, the elementwise sigmoid. The method is `LossFreeTopK`
(`--router=loss_free`; `--router=top_k --balance=loss_free` is an alias of it),
which routes with `biased_top_k` and updates each layer's `SignBias` after every
training step.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal, Mapping

import jax
import jax.numpy as jnp

from moejax.checks import check_choice, check_int, check_number
from moejax.routing import losses
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 check_logits, choice_priority, guard_tokens,
                                 register, scatter_choices, stats_probs,
                                 take_rows)

ScoreFn = Literal["softmax", "sigmoid"]
SCORE_FNS: tuple[str, ...] = typing.get_args(ScoreFn)


def router_scores(logits: jax.Array, score_fn: ScoreFn = "softmax") -> jax.Array:
  """float32[S, E] affinity scores: softmax over E or elementwise sigmoid."""
  if score_fn == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score_fn == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"score_fn={score_fn!r} is not supported; allowed: "
                   f"{', '.join(SCORE_FNS)}")


def biased_top_k(logits: jax.Array, k: int, bias: jax.Array | None = None, *,
                 score_fn: ScoreFn = "softmax",
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
    (for sigmoid scores `s / sum(s)`). A token with a NaN or +inf logit is
    routed nowhere and left out of aux and metrics (`guard_tokens`).
  """
  logits = check_logits(logits)
  num_experts = logits.shape[-1]
  k = check_int("k", k, 1, num_experts)
  raw = logits
  logits, ok = guard_tokens(logits)
  scores = router_scores(logits, score_fn)
  biased = scores if bias is None else scores + jnp.asarray(
      bias, jnp.float32)[None, :]
  _, index = jax.lax.top_k(biased, k)  # [S, K]
  chosen = take_rows(scores, index)
  weights = chosen
  if normalize and score_fn == "sigmoid":
    # In log space: sigmoid scores of very negative logits underflow (all
    # chosen logits below about -69 would sum to ~1e-38), their log does not.
    weights = jax.nn.softmax(jax.nn.log_sigmoid(
        take_rows(logits, index)), axis=-1)
  elif normalize:
    weights = chosen / jnp.maximum(jnp.sum(chosen, axis=-1, keepdims=True),
                                   1e-30)
  gates = scatter_choices(weights, index, num_experts,
                          jnp.broadcast_to(ok[:, None], index.shape))
  routing = Routing(gates=gates, priority=choice_priority(index, num_experts))
  probs = scores if score_fn == "softmax" else jax.nn.softmax(
      jax.nn.log_sigmoid(logits), axis=-1)
  return losses.standard_output(raw, stats_probs(probs, ok), routing)


@dataclasses.dataclass(frozen=True)
class SignBias:
  """Loss-free balancing's controller: a per-expert bias for top-k selection.

  State `{"bias": float32[E]}`, started at 0. After each step, with loads c
  (assignments per expert over the whole global batch; any positive scale):
    b_e' = b_e + rate * sign(mean(c) - c_e)
  Underloaded experts gain bias (chosen more), overloaded ones lose it. An
  expert whose load is not finite keeps its bias; the mean is over finite loads.

  Attributes:
    rate: update speed u > 0 (1e-3 in the paper; 1e-4 too slow, 1e-2
      oscillates).
  """
  rate: float = 1e-3

  def __post_init__(self):
    check_number("rate", self.rate, 0.0, low_open=True)

  def init(self, num_experts: int) -> dict[str, jax.Array]:
    """bias = zeros float32[E]."""
    return {"bias": jnp.zeros((num_experts,), jnp.float32)}

  def update(self, state, load) -> dict[str, jax.Array]:
    """One sign step from the loads float32[E]; pure and jit-able."""
    load = jnp.asarray(load, jnp.float32)
    finite = jnp.isfinite(load)
    clean = jnp.where(finite, load, 0.0)
    mean = clean.sum() / jnp.maximum(finite.sum(), 1)
    step = jnp.where(finite, self.rate * jnp.sign(mean - clean), 0.0)
    return {"bias": (state["bias"] + step).astype(jnp.float32)}


@register
@dataclasses.dataclass(frozen=True)
class LossFreeTopK(RouterMethod):
  """Top-k token choice balanced by DeepSeek-V3's selection bias, no balance
  loss: a `SignBias` per layer (state `{"bias": [E]}`, updated after each step
  from the global loads with speed `bias_update_rate`). `score_fn` ("softmax"
  or "sigmoid") makes the affinity scores; `normalize` renormalises the
  chosen scores. `--router=top_k --balance=loss_free` builds this method
  (`aliases`).
  """
  name: ClassVar[str] = "loss_free"
  aliases: ClassVar[tuple[tuple[str, str, str], ...]] = (
      ("top_k", "balance", "loss_free"),)
  aux_weights: ClassVar[Mapping[str, float]] = {
      "load_balance": 0.0, "z_loss": 1e-3, "entropy": 0.0}
  controller_metric: ClassVar[str] = "expert_load"  # `update`: a sign step
  normalize: bool = True
  bias_update_rate: float = 1e-3
  score_fn: ScoreFn = "softmax"

  def __post_init__(self):
    super().__post_init__()
    check_choice("score_fn", self.score_fn, SCORE_FNS)
    check_number("bias_update_rate", self.bias_update_rate, 0.0,
                 low_open=True)

  @property
  def controller(self) -> SignBias:
    return SignBias(rate=self.bias_update_rate)

  def max_fanout(self, num_experts: int) -> int:
    return min(self.k, num_experts)

  def init_state(self, num_experts):
    return self.controller.init(num_experts)

  def route(self, logits, state, *, rng, train):
    del rng, train
    return biased_top_k(logits, self.k, state.get("bias") if state else None,
                        score_fn=self.score_fn, normalize=self.normalize)

  def state_metrics(self, states):
    if not states:
      return {}
    biases = jnp.stack([s["bias"] for s in states.values()])  # [L, E]
    return {"bias_spread": jnp.mean(biases.max(-1) - biases.min(-1))}
