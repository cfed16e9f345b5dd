"""ProbMoE: exact-k and dynamic-k probabilistic routing with exact marginals.

Axis legend:
  S  tokens in one group
  E  experts
  K  subset sizes 0..k_max (K = k_max + 1 rows of the tables)
  J  prefix sizes used by a marginal (0..k_max-1)
  W  width of the size range (k_max - k_min + 1)
  L  rows of the size-reversed suffix table (k_max + W - 1)
  G  groups (sampled_groups only)

The distribution: per token independent inclusions with `p_e = sigmoid(r_e)`,
conditioned on the subset size,
`P(S | |S| = k) = prod_{e in S} p_e prod_{e not in S} (1 - p_e) / Z_k`. Dynamic-k
conditions on `k_min <= |S| <= k_max` instead (normaliser `Z* = sum_k Z_k`).

Computation (all log space, `log_sigmoid` for log p and log q, float32, a finite
`NEG = -1e30` for log 0 so that no inf/NaN ever appears):

- A forward `lax.scan` over experts, vectorised over sizes and tokens (carry
  `[K, S]`), builds the prefix table `P[e, j]` (log-sum over subsets of the
  experts < e of size j); `log Z_j = P[E, j]`.
- A reverse scan builds the suffix table `Q` (experts > e) in a size-reversed
  layout and, fused in the same steps, the marginals in closed form
  `m_e = sum_{j+t+1 in range} exp(P[e, j] + log p_e + Q[e+1, t] - log Z*)`
  (O(E k W) per token, no autodiff) and the exact sample: the backward walk
  from (E, k) includes expert e with probability
  `exp(P[e, j-1] + log p_e - P[e+1, j])`; always exactly k members.
- A custom VJP for the marginals. `m = d log Z* / d r + p`, so its Jacobian is
  the covariance of the subset indicator z: `(J g)_e = E[z_e (z . g)] - m_e (m . g)`.
  The first term is exact with two more scans carrying conditional expectations
  `R[e, j] = E[sum_{f in S} g_f | S within the prefix (suffix), |S| = j]`
  (convex combinations, bounded): the prefix R from the stored prefix table,
  then the suffix table rebuilt with the suffix R and the contraction. Only
  the prefix table is stored between the passes, and training routes all tokens
  of all groups in one pass (`sampled_groups`): memory traffic, not flops,
  bounds these scans.

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
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from moejax.routing import losses
from moejax.routing.base import (Routing, RouterMethod, RouterOutput,
                                 check_int, check_logits, finite_tokens,
                                 guard_tokens, register, scatter_choices,
                                 stats_probs, take_rows)
from moejax.routing.topk import top_k

NEG = -1e30  # finite log(0): NEG + x == NEG for every |x| < 1e22
_TINY = float(jnp.finfo(jnp.float32).tiny)


# ---------------------------------------------------------------------------
# Table machinery (layout: sizes before tokens, [..., K, S]).
# ---------------------------------------------------------------------------

def _lae(a: jax.Array, b: jax.Array) -> jax.Array:
  """logaddexp for finite inputs (NEG acts as log 0).

  `log(1 + x)` rather than `log1p`: XLA:CPU vectorises log but not log1p; the
  absolute error is at most 6e-8 in log space.
  """
  mx = jnp.maximum(a, b)
  return mx + jnp.log(1.0 + jnp.exp(-jnp.abs(a - b)))


def _down(x: jax.Array, fill: float) -> jax.Array:
  """out[j] = x[j-1], out[0] = fill (along the sizes axis, -2)."""
  pad = jnp.full_like(x[..., :1, :], fill)
  return jnp.concatenate([pad, x[..., :-1, :]], axis=-2)


def _up(x: jax.Array, fill: float) -> jax.Array:
  """out[l] = x[l+1], out[-1] = fill (along the sizes axis, -2)."""
  pad = jnp.full_like(x[..., :1, :], fill)
  return jnp.concatenate([x[..., 1:, :], pad], axis=-2)


def _prefix(lp: jax.Array, lq: jax.Array, kmax: int):
  """Forward scan over experts: the prefix table.

  Args:
    lp, lq: float32[E, S] log p and log(1 - p).
    kmax: largest size kept (static); K = kmax + 1.
  Returns:
    before: float32[E, K, S], before[e, j] = log-sum over subsets of the experts
      < e of size j.
    last: float32[K, S], over all experts: last[j] = log Z_j.
  """
  num_tokens = lp.shape[1]
  init = jnp.full((kmax + 1, num_tokens), NEG, jnp.float32).at[0].set(0.0)

  def step(a, x):
    p, q = x
    return _lae(_down(a, NEG) + p, a + q), a

  last, before = jax.lax.scan(step, init, (lp, lq))
  return before, last


def _log_normaliser(last: jax.Array, kmin: int, kmax: int) -> jax.Array:
  """log Z* = logsumexp of log Z_j over j in [kmin, kmax]. float32[S]."""
  sizes = last[kmin:kmax + 1]
  mx = sizes.max(axis=0)
  return mx + jnp.log(jnp.sum(jnp.exp(sizes - mx), axis=0))


def _row(x: jax.Array, j: jax.Array) -> jax.Array:
  """x[j[s], s] for x float32[K, S], j int32[S]; NEG where j is out of range."""
  rows = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
  return jnp.max(jnp.where(rows == j[None, :], x, NEG), axis=0)


def _suffix_init(kmin, kmax, num_tokens):
  """Empty suffix in the U layout: [kmax + W - 1, S], log 1 at size 0."""
  rows = 2 * kmax - kmin
  return jnp.full((rows, num_tokens), NEG, jnp.float32).at[kmax - 1].set(0.0)


def _suffix_add(upper, p, q):
  """Adds one expert to the suffix table (U layout): (take, new) [L, S]."""
  take = _up(upper, NEG) + p
  return take, _lae(take, upper + q)


def _joint(pre, upper, p, log_z, kmin, kmax):
  """W x float32[J, S]: P(e in subset, j before e, size kmax - d)."""
  base = pre[:kmax] + (p - log_z)
  return [jnp.exp(base + upper[d:d + kmax]) for d in range(kmax - kmin + 1)]


def _suffix(lp, lq, before, last, log_z, kmin, kmax, walk=None):
  """Reverse scan over experts: suffix table, marginals and (optionally) the
  exact backward-walk sample, fused; outputs [E, S] only.

  The suffix table is carried in a size-reversed layout U[l] = (log-sum over
  subsets of the experts > e of size kmax - 1 - l), padded with W - 1 rows of
  log 0, so that pairing prefix size j with every suffix size that completes
  a subset in [kmin, kmax] is a plain shift: U[j + d], d = kmax - size.

  Args:
    lp, lq: float32[E, S]; before, last: `_prefix` outputs; log_z: [S].
    walk: None, or (u float32[E, S] uniforms, size int32[S] subset sizes). The
      walk includes expert e with probability
      exp(before[e, j-1] + lp_e - before[e+1, j]), j = members still needed.
  Returns:
    m: float32[E, S] marginals; z: bool[E, S] the sample (None without walk).
  """
  num_tokens = lp.shape[1]
  index = jnp.arange(lp.shape[0], dtype=jnp.int32)
  if walk is None:
    u = jnp.zeros_like(lp)
    size = jnp.zeros((num_tokens,), jnp.int32)
  else:
    u, size = walk

  def step(carry, x):
    upper, j, nxt = carry
    p, q, pre, u_e, e = x
    m = jnp.clip(sum(jnp.sum(w, axis=0) for w in
                     _joint(pre, upper, p, log_z, kmin, kmax)), 0.0, 1.0)
    if walk is None:
      z = jnp.zeros_like(j, bool)
    else:
      p_incl = jnp.exp(_row(pre, j - 1) + p - _row(nxt, j))
      z = (j > 0) & ((j > e) | (u_e < p_incl))  # j > e: all the rest needed
      j = j - z.astype(jnp.int32)
    _, new = _suffix_add(upper, p, q)
    return (new, j, pre), (m, z)

  init = (_suffix_init(kmin, kmax, num_tokens), size, last)
  _, (m, z) = jax.lax.scan(step, init, (lp, lq, before, u, index),
                           reverse=True)
  return m, (z if walk is not None else None)


def _forward(rt, kmin, kmax, rng=None):
  """Everything from transposed logits rt float32[E, S]."""
  lp = jax.nn.log_sigmoid(rt)
  lq = jax.nn.log_sigmoid(-rt)
  before, last = _prefix(lp, lq, kmax)
  log_z = _log_normaliser(last, kmin, kmax)
  walk, size = None, None
  if rng is not None:
    size_key, walk_key = jax.random.split(rng)
    if kmin == kmax:
      size = jnp.full(rt.shape[1:], kmin, jnp.int32)
    else:
      size = kmin + jax.random.categorical(
          size_key, last[kmin:kmax + 1], axis=0).astype(jnp.int32)
    walk = (jax.random.uniform(walk_key, rt.shape, jnp.float32), size)
  m, z = _suffix(lp, lq, before, last, log_z, kmin, kmax, walk)
  # Only the prefix table is kept for the backward pass (which rebuilds the
  # suffix side on the fly): memory traffic, not flops, dominates on CPU.
  residuals = (rt, lp, lq, before, log_z, m)
  return m, log_z, z, size, residuals


def _backward(kmin, kmax, res, g_m, g_z):
  """VJP of (m, log Z*) with respect to the logits, float32[E, S].

  (J g)_e = E[z_e (z . g)] - m_e (m . g), and E[z_e (z . g)] =
  m_e g_e + sum_{j, d} w[e, j, d] (R_pre[e, j] + R_suf[e, j + d]), w the joint
  weights of `_joint`, R the conditional expectations of sum_{f in subset} g_f
  over the prefix (experts < e, size j) and suffix (experts > e, U layout)
  tables. Two scans: the prefix R (forward; inclusion probabilities from the
  stored prefix table), then the suffix table rebuilt with R_suf and the
  contraction (reverse).
  """
  rt, lp, lq, before, log_z, m = res
  g = g_m.astype(jnp.float32)
  num_tokens = rt.shape[1]

  def prefix_step(carry, x):
    r, b_prev, p_prev, g_prev = carry  # R over experts < e - 1, ...
    b, p, gi = x
    rho = jnp.clip(jnp.exp(_down(b_prev[:kmax], NEG) + p_prev - b[:kmax]),
                   0.0, 1.0)  # P(e - 1 in subset | experts <= e - 1 hold j)
    r = r + rho * (_down(r, 0.0) + g_prev - r)
    return (r, b, p, gi), r

  init = (jnp.zeros((kmax, num_tokens)),
          jnp.full((kmax + 1, num_tokens), NEG, jnp.float32),
          jnp.zeros((num_tokens,)), jnp.zeros((num_tokens,)))
  _, r_pre = jax.lax.scan(prefix_step, init, (before, lp, g))  # [E, J, S]

  def suffix_step(carry, x):
    upper, r = carry  # suffix table and R over experts > e (U layout)
    p, q, b, gi, rp = x
    w = _joint(b, upper, p, log_z, kmin, kmax)
    second = sum(jnp.sum(wd * (rp + r[d:d + kmax]), axis=0)
                 for d, wd in enumerate(w))
    take, new = _suffix_add(upper, p, q)
    rho = jnp.clip(jnp.exp(take[:kmax] - new[:kmax]), 0.0, 1.0)
    head = r[:kmax] + rho * (_up(r, 0.0)[:kmax] + gi - r[:kmax])
    return (new, jnp.concatenate([head, r[kmax:]], axis=0)), second

  upper = _suffix_init(kmin, kmax, num_tokens)
  _, second = jax.lax.scan(suffix_step, (upper, jnp.zeros_like(upper)),
                           (lp, lq, before, g, r_pre), reverse=True)
  grad = second + m * g - m * jnp.sum(m * g, axis=0, keepdims=True)
  if g_z is not None:
    grad = grad + g_z[None, :] * (m - jax.nn.sigmoid(rt))
  return grad.astype(rt.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _marginals(rt: jax.Array, kmin: int, kmax: int):
  """(m float32[E, S], log Z* float32[S]) with the exact covariance VJP."""
  m, log_z, _, _, _ = _forward(rt, kmin, kmax)
  return m, log_z


def _marginals_fwd(rt, kmin, kmax):
  m, log_z, _, _, res = _forward(rt, kmin, kmax)
  return (m, log_z), res


def _marginals_bwd(kmin, kmax, res, cotangents):
  g_m, g_z = cotangents
  return (_backward(kmin, kmax, res, g_m, g_z),)


_marginals.defvjp(_marginals_fwd, _marginals_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sampled(rt: jax.Array, rng: jax.Array, kmin: int, kmax: int):
  """One pass for training: (m float32[E, S], z bool[E, S], size int32[S]).

  The tables are built once and serve the marginals, the sample and the
  backward pass; only m carries a gradient (z and size are samples).
  """
  m, _, z, size, _ = _forward(rt, kmin, kmax, rng)
  return m, z, size


def _sampled_fwd(rt, rng, kmin, kmax):
  m, _, z, size, res = _forward(rt, kmin, kmax, rng)
  return (m, z, size), res


def _sampled_bwd(kmin, kmax, res, cotangents):
  return _backward(kmin, kmax, res, cotangents[0], None), None


_sampled.defvjp(_sampled_fwd, _sampled_bwd)


# ---------------------------------------------------------------------------
# Public pure functions.
# ---------------------------------------------------------------------------

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
  return _marginals(logits.T, k, k)[1]


def exact_k_marginals(logits: jax.Array, k: int) -> jax.Array:
  """P(e in subset | exactly k members). float32[S, E], rows sum to k.

  Differentiable (exact covariance VJP).
  """
  logits = check_logits(logits)
  k = check_int("k", k, 1, logits.shape[-1])
  return _marginals(logits.T, k, k)[0].T


def dynamic_k_log_partition(logits: jax.Array, k_min: int,
                            k_max: int) -> jax.Array:
  """log Z* = log sum_{k=k_min..k_max} Z_k. float32[S]."""
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  return _marginals(logits.T, k_min, k_max)[1]


def dynamic_k_marginals(logits: jax.Array, k_min: int, k_max: int) -> jax.Array:
  """P(e in subset | k_min <= size <= k_max). float32[S, E]."""
  logits, k_min, k_max = _check_range(logits, k_min, k_max)
  return _marginals(logits.T, k_min, k_max)[0].T


def size_log_partitions(logits: jax.Array, k_max: int) -> jax.Array:
  """log Z_j for j = 0..k_max. float32[S, k_max + 1] (no gradient)."""
  logits = check_logits(logits)
  k_max = check_int("k_max", k_max, 0, logits.shape[-1])
  rt = jax.lax.stop_gradient(logits).T
  _, last = _prefix(jax.nn.log_sigmoid(rt), jax.nn.log_sigmoid(-rt), k_max)
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
  return _sample(jax.lax.stop_gradient(logits).T, k_min, k_max, rng)[0].T


def _sample(rt, k_min, k_max, rng):
  """(z bool[E, S], size int32[S]) from transposed logits."""
  _, _, z, size, _ = _forward(rt, k_min, k_max, rng)
  return z, size


def _straight_through(logits, k_min, k_max, rng):
  """Sampled gates with marginal gradients. Returns (gates, probs, m, size)."""
  m, z, size = _sampled(logits.T, rng, k_min, k_max)
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
