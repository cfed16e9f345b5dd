"""Expert Threshold (ET) routing: causal, balanced in expectation by cutoffs.

Axis legend:
  G  groups in the layer's batch
  S  tokens in one group
  N  tokens in the pool (G * S: the whole global batch in training)
  E  experts

Inference routes every token by its own scores alone: token t goes to expert e
iff `logits[t, e] > thresholds[e]`, with gate `sigmoid(logits[t, e])`
(`expert_threshold`). The thresholds are an EMA (`ThresholdEMA`) of the cutoffs
expert choice would use on the pool (`expert_cutoffs`: each expert's k-th
largest score over the global batch, k = N f / E with f the target mean fanout).
Training routes by the same thresholds but bounds each expert's load in the pool
to `[(1 - C) k, (1 + C) k]` tokens (`expert_threshold_train`): over the upper
bound the expert keeps its highest scores, under the lower bound it takes its
top `(1 - C) k` anyway. During warm-up the training routing is plain expert
choice over the pool.

The method `ExpertThreshold` (`--router=expert_threshold`) pools every group of
the layer's batch in training: the step is one SPMD program, so a reduction over
the `[G, S, E]` logits is a reduction over the global batch. Each expert's
cutoff is reported as the metric `et_cutoff`, which `update` feeds to the
layer's `ThresholdEMA`. Evaluation and sampling use the frozen thresholds alone
(token-local). One always-on shared expert is part of the method
(`default_num_shared = 1`); no aux loss.

Cutoffs and top-m selections are computed exactly by a 32-step bisection on the
order-preserving unsigned-integer keys of the float32 scores: a few compares and
counts over `[E, N]` per step, no sort (`lax.top_k(x, k)[0][:, -1]` compiles to
a full sort on CPU; `experiments/bench_cutoff.py` compares them).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.checks import check_int, check_number
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 capacity, check_capacity_args, check_logits,
                                 finite_tokens, register)

_TINY = float(jnp.finfo(jnp.float32).tiny)


def _sortable_keys(x: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 values (-0.0 just below +0.0)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _kth_key(keys: jax.Array, m: jax.Array) -> jax.Array:
  """uint32[R]: the m-th largest key of each row of uint32[R, N] (1-based m).

  The largest t with count(keys >= t) >= m, built bit by bit from the top (32
  exact steps). For m = 0 the answer is 2^32 - 1 (callers select nothing then).
  """
  def body(i, t):
    bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    cand = t | bit
    count = jnp.sum(keys >= cand[:, None], axis=-1)
    return jnp.where(count >= m, cand, t)
  # Unrolled: no device-side while loop (a host round trip per step on GPUs).
  return jax.lax.fori_loop(0, 32, body, jnp.zeros(keys.shape[:1], jnp.uint32),
                           unroll=True)


def _as_counts(m, num_experts: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(m, jnp.int32), (num_experts,))


def expert_cutoffs(scores: jax.Array, k) -> jax.Array:
  """float32[E]: each expert's k-th largest score over the pool.

  This is where expert choice with k tokens per expert would cut. Exact (ties
  count with their multiplicity).

  Args:
    scores: float32[N, E]; a NaN or +inf score counts as -inf (below every
      finite score), so the cutoffs are finite while an expert has at least
      k finite scores.
    k: int or int32[E], 1 <= k <= N (may be traced).
  """
  scores = check_logits(scores)
  num_tokens, num_experts = scores.shape
  if isinstance(k, int):
    check_int("k", k, 1, num_tokens)
  scores = jnp.where(jnp.isnan(scores) | (scores == jnp.inf), -jnp.inf, scores)
  x = scores.T  # [E, N]
  keys = _sortable_keys(x)
  kth = _kth_key(keys, jnp.clip(_as_counts(k, num_experts), 1, num_tokens))
  return jnp.max(jnp.where(keys == kth[:, None], x, -jnp.inf), axis=-1)


def top_per_expert(scores: jax.Array, m) -> jax.Array:
  """bool[N, E]: each expert's m_e highest-score tokens, ties to lower index.

  Exactly `min(m_e, N)` tokens per expert (0 where m_e <= 0).

  Args:
    scores: float32[N, E].
    m: int or int32[E] tokens per expert (may be traced).
  """
  scores = check_logits(scores)
  num_tokens, num_experts = scores.shape
  m = jnp.clip(_as_counts(m, num_experts), 0, num_tokens)
  keys = _sortable_keys(scores.T)  # [E, N]
  kth = _kth_key(keys, m)[:, None]
  above = keys > kth
  tie = keys == kth
  need = (m - above.sum(axis=-1))[:, None]
  tie_rank = jnp.cumsum(tie.astype(jnp.int32), axis=-1)
  chosen = above | (tie & (tie_rank <= need))
  return (chosen & (m[:, None] > 0)).T


def load_bounds(tokens_per_expert: int, capacity_bound: float) -> tuple[int, int]:
  """Integer training bounds `(ceil((1 - C) k), floor((1 + C) k))` (static)."""
  if not 0.0 <= capacity_bound <= 1.0:
    raise ValueError(f"capacity_bound={capacity_bound} is out of range; "
                     "allowed: [0, 1]")
  k = tokens_per_expert
  low = math.ceil((1.0 - capacity_bound) * k - 1e-9)
  high = math.floor((1.0 + capacity_bound) * k + 1e-9)
  return max(low, 0), max(high, low)


def pool_tokens_per_expert(num_tokens: int, fanout: float,
                           num_experts: int) -> int:
  """k = ceil(N * f / E), the tokens per expert of the pool (1 <= k <= N)."""
  return min(num_tokens, max(1, math.ceil(num_tokens * fanout / num_experts
                                          - 1e-9)))


def _sigmoid_gates(logits: jax.Array, chosen: jax.Array) -> jax.Array:
  return jnp.where(chosen, jnp.maximum(jax.nn.sigmoid(logits), _TINY), 0.0)


def expert_threshold(logits: jax.Array, thresholds: jax.Array) -> RouterOutput:
  """Causal threshold routing of one group.

  Args:
    logits: float32[S, E] router scores.
    thresholds: float32[E] per-expert cutoffs (may be traced).
  Returns:
    RouterOutput: gate = sigmoid(logit) where `logits[s, e] > thresholds[e]`,
    else 0; priority = sigmoid(logit). Each token's routing depends on that
    token alone; a token with a NaN or +inf logit (`finite_tokens`) is routed
    nowhere. aux holds `z_loss` (unweighted; ET's default weight is 0).
  """
  logits = check_logits(logits)
  finite = finite_tokens(logits)[:, None]
  clean = jnp.where(finite, logits, -jnp.inf)
  thresholds = jnp.asarray(thresholds, jnp.float32)
  if thresholds.shape != logits.shape[-1:]:
    raise ValueError(f"thresholds must have shape [E]={logits.shape[-1:]}, got "
                     f"{thresholds.shape}")
  chosen = clean > thresholds[None, :]
  routing = Routing(gates=_sigmoid_gates(clean, chosen),
                    priority=jax.nn.sigmoid(clean))
  return RouterOutput(routing=routing, aux={"z_loss": losses.z_loss(logits)},
                      metrics=losses.routing_metrics(routing, None, logits))


def expert_threshold_train(logits: jax.Array, thresholds: jax.Array,
                           tokens_per_expert: int, *,
                           capacity_bound: float = 0.5,
                           expert_choice=False) -> RouterOutput:
  """ET training routing over a pool (the global batch), with load bounds.

  Each expert takes the tokens whose logit passes its threshold, bounded to
  `[low, high] = load_bounds(tokens_per_expert, capacity_bound)`: over `high`
  it keeps its `high` highest scores, under `low` it takes its top `low`. With
  `expert_choice` (warm-up) every expert takes exactly its top
  `tokens_per_expert` tokens.

  Args:
    logits: float32[N, E], the whole pool.
    thresholds: float32[E] (traced ok).
    tokens_per_expert: static k (see `pool_tokens_per_expert`).
    capacity_bound: static C in [0, 1].
    expert_choice: bool or bool[] (traced ok): route by expert choice.
  Returns:
    RouterOutput over the pool; metrics add `et_cutoff` float32[E] (the k-th
    largest logit per expert, for the threshold EMA; tokens with a NaN or +inf
    logit are routed nowhere and count as -inf, so they never take a token's
    place and the cutoff is -inf, ignored by the EMA, when fewer than k tokens
    are finite), `et_pass_fraction`
    (passing assignments / (E k)), `et_bound_low` / `et_bound_high` (fraction of
    experts whose lower / upper bound binds) and `et_expert_choice`.
  """
  logits = check_logits(logits)
  num_tokens, num_experts = logits.shape
  k = check_int("tokens_per_expert", tokens_per_expert, 1, num_tokens)
  low, high = load_bounds(k, capacity_bound)
  finite = finite_tokens(logits)[:, None]
  raw, logits = logits, jnp.where(finite, logits, -jnp.inf)
  thresholds = jnp.asarray(thresholds, jnp.float32)
  n_pass = jnp.sum(logits > thresholds[None, :], axis=0)  # [E]
  bounded = jnp.clip(n_pass, low, high)
  expert_choice = jnp.asarray(expert_choice, bool)
  m = jnp.where(expert_choice, k, bounded)
  chosen = top_per_expert(logits, m) & finite
  routing = Routing(gates=_sigmoid_gates(logits, chosen),
                    priority=jax.nn.sigmoid(logits))
  metrics = losses.routing_metrics(routing, None, raw)
  metrics.update(
      et_cutoff=expert_cutoffs(logits, k),
      et_pass_fraction=jnp.sum(n_pass) / float(num_experts * k),
      et_bound_low=jnp.mean(n_pass < low).astype(jnp.float32),
      et_bound_high=jnp.mean(n_pass > high).astype(jnp.float32),
      et_expert_choice=expert_choice.astype(jnp.float32))
  return RouterOutput(routing=routing, aux={"z_loss": losses.z_loss(raw)},
                      metrics=metrics)


@dataclasses.dataclass(frozen=True)
class ThresholdEMA:
  """Bias-corrected EMA of per-expert score cutoffs (Expert Threshold routing).

  State `{"ema": float32[E], "count": int32[]}`, started at ema = 0, count = 0.
  After each training step with cutoffs x (each expert's k-th largest score
  over the global batch):
    ema' = beta * ema + (1 - beta) * x;  count' = count + 1
  and the thresholds used for routing are the bias-corrected
    c = ema / (1 - beta^count)   (0 while count = 0),
  i.e. the beta-weighted mean of all cutoffs seen so far. A non-finite cutoff
  (NaN or +-inf, e.g. from one bad token) is replaced by that expert's current
  threshold c, which leaves c unchanged: bad statistics never enter the state.

  Attributes:
    beta: EMA decay in [0, 1) (0.999 in the paper).
  """
  beta: float = 0.999

  def __post_init__(self):
    check_number("beta", self.beta, 0.0, 1.0)
    if self.beta >= 1.0:
      raise ValueError(f"beta={self.beta} is out of range; allowed: [0, 1)")

  def init(self, num_experts: int) -> dict[str, jax.Array]:
    """ema = zeros float32[E], count = 0."""
    return {"ema": jnp.zeros((num_experts,), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}

  def update(self, state, cutoffs) -> dict[str, jax.Array]:
    """One EMA step with this step's cutoffs float32[E]; pure and jit-able.

    An expert whose cutoff is not finite keeps its threshold (see the class).
    """
    cutoffs = jnp.asarray(cutoffs, jnp.float32)
    cutoffs = jnp.where(jnp.isfinite(cutoffs), cutoffs, self.value(state))
    ema = self.beta * state["ema"] + (1.0 - self.beta) * cutoffs
    return {"ema": ema.astype(jnp.float32),
            "count": (state["count"] + 1).astype(jnp.int32)}

  def value(self, state) -> jax.Array:
    """float32[E]: the bias-corrected thresholds (0 before the first update)."""
    count = state["count"].astype(jnp.float32)
    log_beta = math.log(self.beta) if self.beta > 0 else -math.inf
    correction = -jnp.expm1(count * log_beta)  # 1 - beta^count, accurately
    return jnp.where(state["count"] > 0,
                     state["ema"] / jnp.maximum(correction, 1e-30),
                     state["ema"])


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
  causal_eval: ClassVar[bool] = True
  # `update`: each layer's EMA from its cutoffs (the step is not needed: the
  # state's own count says where warm-up ends).
  controller_metric: ClassVar[str] = "et_cutoff"

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
  def controller(self) -> ThresholdEMA:
    return ThresholdEMA(beta=self.et_beta)

  def capacity(self, num_tokens, num_experts, capacity_factor):
    # The training bounds allow (1 + C) k per expert: slots for that many.
    check_capacity_args(num_tokens, capacity_factor)
    return capacity(num_tokens, self.target_fanout, num_experts,
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
    k = pool_tokens_per_expert(pool.shape[0], self.target_fanout, num_experts)
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

  def state_metrics(self, states):
    if not states:
      return {}
    values = list(states.values())
    return {
        "et_threshold": jnp.mean(jnp.stack(
            [jnp.mean(self.thresholds(s)) for s in values])),
        "et_warmup": self.in_warmup(values[0]).astype(jnp.float32),
    }
