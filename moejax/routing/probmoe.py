"""ProbMoE: exact-k and dynamic-k probabilistic routing with exact marginals.

Axis legend (the tables' own axes: `subsets.py`):
  S  tokens in one group        E  experts
  G  groups (sampled_groups only)

The distribution: per token independent inclusions with `p_e = sigmoid(r_e)`,
conditioned on the subset size,
`P(S | |S| = k) = prod_{e in S} p_e prod_{e not in S} (1 - p_e) / Z_k`. Dynamic-k
conditions on `k_min <= |S| <= k_max` instead (normaliser `Z* = sum_k Z_k`).

The tables behind the exact marginals and samples (a dynamic programme over
experts in log space, with the marginals' exact covariance VJP):
`moejax/routing/subsets.py`.

Straight-through gates (training): `g = where(z, stop_gradient(z - m) + m, 0)`,
`gates = g * softmax(r)`: exactly 0 off the sampled subset, value = softmax
there, gradient through m and through the softmax.

The methods `ExactK` and `DynamicK` (`--router=exact_k`, `--router=dynamic_k`)
sample their subsets in training (the layer draws `make_rng("router")`; the
train step folds the step into the state's key, so runs are reproducible and
resume exactly) and are deterministic in evaluation (exact-k: top-k; dynamic-k:
the MAP subset). No aux loss is part of the method; the layer's usual aux-loss
options (and defaults) apply.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.checks import check_int
from moejax.routing import losses
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 check_logits, finite_tokens, guard_tokens,
                                 register, scatter_choices, stats_probs,
                                 take_rows)
from moejax.routing.subsets import NEG, marginals, prefix_table, sample, sampled
from moejax.routing.topk import top_k

__all__ = ["NEG", "ExactK", "DynamicK", "exact_k", "dynamic_k",
           "exact_k_log_partition", "exact_k_marginals",
           "dynamic_k_log_partition", "dynamic_k_marginals",
           "size_log_partitions", "sample_subsets", "sampled_groups",
           "dynamic_k_map"]

_TINY = float(jnp.finfo(jnp.float32).tiny)


def _check_range(logits, k_min, k_max):
  logits = check_logits(logits)
  num_experts = logits.shape[-1]
  k_min = check_int("k_min", k_min, 1, num_experts)
  k_max = check_int("k_max", k_max, k_min, num_experts)
  return logits, k_min, k_max


def exact_k_log_partition(logits: jax.Array, k: int) -> jax.Array:
  """log Z_k per token.

  Args:
    logits: float32[S, E]; p = sigmoid(logits).
    k: static subset size, 1 <= k <= E.
  Returns:
    float32[S]: log of the sum over all k-subsets of prod p (in) * prod (1-p)
    (out). Its gradient with respect to the logits is `m - p` (custom VJP).
  """
  logits = check_logits(logits)
  k = check_int("k", k, 1, logits.shape[-1])
  return marginals(logits.T, k, k)[1]


def exact_k_marginals(logits: jax.Array, k: int) -> jax.Array:
  """P(e in subset | exactly k members). float32[S, E], rows sum to k.

  Differentiable (exact covariance VJP).
  """
  logits = check_logits(logits)
  k = check_int("k", k, 1, logits.shape[-1])
  return marginals(logits.T, k, k)[0].T


def dynamic_k_log_partition(logits: jax.Array, k_min: int,
                            k_max: int) -> jax.Array:
  """log Z* = log sum_{k=k_min..k_max} Z_k. float32[S]."""
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  return marginals(logits.T, k_min, k_max)[1]


def dynamic_k_marginals(logits: jax.Array, k_min: int, k_max: int) -> jax.Array:
  """P(e in subset | k_min <= size <= k_max). float32[S, E]."""
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  return marginals(logits.T, k_min, k_max)[0].T


def size_log_partitions(logits: jax.Array, k_max: int) -> jax.Array:
  """log Z_j for j = 0..k_max. float32[S, k_max + 1] (no gradient)."""
  logits = check_logits(logits)
  k_max = check_int("k_max", k_max, 0, logits.shape[-1])
  rt = jax.lax.stop_gradient(logits).T
  _, last = prefix_table(jax.nn.log_sigmoid(rt), jax.nn.log_sigmoid(-rt), k_max)
  return last.T


def sample_subsets(logits: jax.Array, k_min: int, k_max: int,
                   rng: jax.Array) -> jax.Array:
  """Exact samples of the (dynamic-)k distribution, no gradient.

  Args:
    logits: float32[S, E].
    k_min, k_max: static size range (k_min == k_max: exact k).
    rng: PRNG key.
  Returns:
    bool[S, E]; with k_min == k_max every row has exactly k members; otherwise
    the size is drawn with probability Z_k / Z*.
  """
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  return sample(jax.lax.stop_gradient(logits).T, k_min, k_max, rng)[0].T


def _straight_through(logits, k_min, k_max, rng):
  """Sampled gates with marginal gradients. Returns (gates, probs, m, size)."""
  m, z, size = sampled(logits.T, rng, k_min, k_max)
  m, z = m.T, z.T
  probs = jax.nn.softmax(logits, axis=-1)
  zf = z.astype(jnp.float32)
  g = jnp.where(z, jax.lax.stop_gradient(zf - m) + m, 0.0)
  gates = jnp.where(z, jnp.maximum(g * probs, _TINY), 0.0)
  return gates, probs, m, size


def _output(logits, probs, gates, extra) -> RouterOutput:
  """RouterOutput from the raw logits float32[S, E] and the probs and gates
  computed from the guarded ones: a non-finite token is routed nowhere and left
  out of aux and metrics."""
  ok = finite_tokens(logits)
  gates = jnp.where(ok[:, None], gates, 0.0)
  routed = gates != 0
  priority = jnp.where(routed, jax.lax.stop_gradient(probs), 0.0)
  routing = Routing(gates=gates, priority=priority)
  probs = stats_probs(probs, ok)
  metrics = losses.routing_metrics(routing, probs, logits)
  metrics.update(extra)
  return RouterOutput(routing=routing,
                      aux=losses.standard_aux(logits, probs, routing),
                      metrics=metrics)


def _extra_metrics(m, k_min, k_max, ok):
  """Marginal statistics (float32[]) over the finite tokens bool[S] `ok`."""
  nan = jnp.full(ok.shape, jnp.nan)
  extra = {"marginal_max": losses.finite_mean(
      jnp.where(ok, jnp.max(m, axis=-1), nan))}
  if k_min != k_max:
    extra["expected_k"] = losses.finite_mean(
        jnp.where(ok, jax.lax.stop_gradient(m).sum(axis=-1), nan))
  return extra


def sampled_groups(logits: jax.Array, k_min: int, k_max: int,
                   rng: jax.Array) -> RouterOutput:
  """Training routing of all groups in one pass (tokens are independent).

  Args:
    logits: float32[G, S, E].
    k_min, k_max: static size range (equal: exact k).
    rng: PRNG key (one draw over all G * S tokens).
  Returns:
    RouterOutput with a leading G axis, as `jax.vmap` of `exact_k` /
    `dynamic_k` with rng would give (other draws). One pass over the G * S
    tokens: vmapping the scans batches them and transposes their outputs,
    which is slower on CPU.
  """
  if logits.ndim != 3:
    raise ValueError(f"logits must have shape [G, S, E]; got {logits.shape}")
  logits = logits.astype(jnp.float32)
  groups, tokens, num_experts = logits.shape
  k_min = check_int("k_min", k_min, 1, num_experts)
  k_max = check_int("k_max", k_max, k_min, num_experts)
  flat, ok = guard_tokens(logits.reshape(groups * tokens, num_experts))
  gates, probs, m, _ = _straight_through(flat, k_min, k_max, rng)
  shape = logits.shape
  return jax.vmap(lambda l, p, g, mm, o: _output(
      l, p, g, _extra_metrics(mm, k_min, k_max, o)))(
          logits, probs.reshape(shape), gates.reshape(shape), m.reshape(shape),
          ok.reshape(shape[:2]))


def exact_k(logits: jax.Array, k: int, *,
            rng: jax.Array | None = None) -> RouterOutput:
  """ProbMoE exact-k routing.

  Args:
    logits: float32[S, E] router logits; p = sigmoid(logits).
    k: static subset size, 1 <= k <= E.
    rng: PRNG key. With it (training): one exact k-subset per token from the
      conditional-Bernoulli distribution; gates = (sample, with the gradient of
      the exact marginals) * softmax(logits), not renormalised. Without
      (inference): deterministic top-k, gates = softmax at the top-k, not
      renormalised.
  Returns:
    RouterOutput; priority = softmax probability at routed experts (an expert
    over capacity keeps its strongest tokens first). Training metrics add
    `marginal_max` (mean over tokens of max_e m_e).
  """
  logits = check_logits(logits)
  k = check_int("k", k, 1, logits.shape[-1])
  if rng is None:
    return top_k(logits, k, normalize=False)
  safe, ok = guard_tokens(logits)
  gates, probs, m, _ = _straight_through(safe, k, k, rng)
  return _output(logits, probs, gates, _extra_metrics(m, k, k, ok))


def dynamic_k_map(logits: jax.Array, k_min: int, k_max: int) -> jax.Array:
  """MAP subset size per token: the k in [k_min, k_max] maximising the sum of
  the top-k logits (first maximum). int32[S]."""
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  values, _ = jax.lax.top_k(logits, k_max)
  score = jnp.cumsum(values, axis=-1)[:, k_min - 1:]
  return (k_min + jnp.argmax(score, axis=-1)).astype(jnp.int32)


def dynamic_k(logits: jax.Array, k_min: int, k_max: int, *,
              rng: jax.Array | None = None) -> RouterOutput:
  """ProbMoE dynamic-k routing.

  Args:
    logits: float32[S, E]; p = sigmoid(logits).
    k_min, k_max: static size range, 1 <= k_min <= k_max <= E.
    rng: PRNG key. With it (training): size k drawn with probability
      Z_k / sum_{k'} Z_k', then an exact k-subset; gates as for `exact_k` with
      the marginals of the range distribution. Without (inference): the MAP
      subset, the top-k logits with k in range maximising their sum (keep adding
      experts while their logit is positive); gates = softmax there, not
      renormalised.
  Returns:
    RouterOutput; metrics add `expected_k` (mean expected size under the
    distribution, training) and `marginal_max`.
  """
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  num_experts = logits.shape[-1]
  safe, ok = guard_tokens(logits)
  if rng is None:
    size = dynamic_k_map(safe, k_min, k_max)
    probs = jax.nn.softmax(safe, axis=-1)
    _, index = jax.lax.top_k(safe, k_max)
    weights = take_rows(probs, index)
    keep = jnp.arange(k_max)[None, :] < size[:, None]
    gates = scatter_choices(weights, index, num_experts, keep)
    return _output(logits, probs, gates, {})
  gates, probs, m, _ = _straight_through(safe, k_min, k_max, rng)
  return _output(logits, probs, gates, _extra_metrics(m, k_min, k_max, ok))


def _route_groups(method, k_min, k_max, logits, state, rng, train):
  """Training: all groups' tokens in one pass (tokens are independent; a vmap
  over groups batches the scans and is slower on CPU). Evaluation: the default
  per-group vmap of `route`."""
  if train and rng is not None:
    return sampled_groups(logits, k_min, k_max, rng)
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
    return exact_k(logits, self.k, rng=rng if train else None)

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
    return dynamic_k(logits, self.k_min, self.k_max,
                     rng=rng if train else None)

  def route_groups(self, logits, state, *, rng, train):
    return _route_groups(self, self.k_min, self.k_max, logits, state, rng,
                         train)
