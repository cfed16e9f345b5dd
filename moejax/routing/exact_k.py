"""ProbMoE: exact-k and dynamic-k probabilistic routing with exact marginals.

Axis legend:
  S  tokens in one group
  E  experts
  K  subset sizes 0..k_max (K = k_max + 1 rows of the tables)
  J  prefix sizes used by a marginal (0..k_max-1)
  W  width of the size range (k_max - k_min + 1)

The distribution (specs/probmoe.md): per token independent inclusions with
`p_e = sigmoid(r_e)`, conditioned on the subset size,
`P(S | |S| = k) = prod_{e in S} p_e prod_{e not in S} (1 - p_e) / Z_k`. Dynamic-k
conditions on `k_min <= |S| <= k_max` instead (normaliser `Z* = sum_k Z_k`).

Computation (all log space, `log_sigmoid` for log p and log q, float32, a finite
`NEG = -1e30` for log 0 so that no inf/NaN ever appears):

- ONE forward `lax.scan` over experts, vectorised over sizes and tokens (carry
  `[2, K, S]`), builds the prefix table `P[i, j]` (log-sum over subsets of the
  experts < i of size j) and, in the same steps, the suffix table `Q[i, t]`
  (experts >= i). `log Z_j = P[E, j]`.
- Marginals in closed form: `m_e = sum_{j+t+1 in range} exp(P[e, j] + log p_e +
  Q[e+1, t] - log Z*)` (O(E k W) per token, no autodiff).
- Exact sampling: the backward walk from (E, k) including expert i with
  probability `exp(P[i, j-1] + log p_i - P[i+1, j])`; always exactly k members.
- A custom VJP for the marginals. `m = d log Z* / d r + p`, so its Jacobian is
  the covariance of the subset indicator z: `(J g)_e = E[z_e (z . g)] - m_e (m . g)`.
  The first term is computed exactly with one more scan that carries conditional
  expectations `R[i, j] = E[sum_{f in S} g_f | S in first i experts, |S| = j]`
  (convex combinations: multiply-adds only, bounded, no logs), prefix and suffix
  together, then the same closed-form contraction as the marginals.

Straight-through gates (training): `g = where(z, stop_gradient(z - m) + m, 0)`,
`gates = g * softmax(r)`: exactly 0 off the sampled subset, value = softmax
there, gradient through m and through the softmax.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import losses
from moejax.routing.base import (Routing, RouterOutput, check_int, check_logits)
from moejax.routing.top_k import scatter_choices, top_k

NEG = -1e30  # finite log(0): NEG + x == NEG for every |x| < 1e22
_TINY = float(jnp.finfo(jnp.float32).tiny)


# ---------------------------------------------------------------------------
# Table machinery (layout: sizes before tokens, [..., K, S]).
# ---------------------------------------------------------------------------

def _lae(a: jax.Array, b: jax.Array) -> jax.Array:
  """logaddexp for finite inputs (NEG acts as log 0).

  `log(1 + x)` rather than `log1p`: XLA:CPU vectorises log but not log1p (4x
  faster here); the absolute error is at most 6e-8 in log space.
  """
  mx = jnp.maximum(a, b)
  return mx + jnp.log(1.0 + jnp.exp(-jnp.abs(a - b)))


def _shift(x: jax.Array, fill: float) -> jax.Array:
  """out[..., j, :] = x[..., j-1, :], out[..., 0, :] = fill (sizes axis -2)."""
  pad = jnp.full_like(x[..., :1, :], fill)
  return jnp.concatenate([pad, x[..., :-1, :]], axis=-2)


def _tables(lp: jax.Array, lq: jax.Array, kmax: int):
  """Prefix and suffix log tables in one scan.

  Args:
    lp, lq: float32[E, S] log p and log(1 - p).
    kmax: largest size kept (static).
  Returns:
    P float32[E+1, K, S]: P[i] over the experts < i.
    Q float32[E+1, K, S]: Q[i] over the experts >= i.
  """
  num_tokens = lp.shape[1]
  init = jnp.full((kmax + 1, num_tokens), NEG, jnp.float32).at[0].set(0.0)
  init = jnp.stack([init, init])  # [2, K, S]: prefix, suffix
  lps = jnp.stack([lp, lp[::-1]], axis=1)[:, :, None, :]  # [E, 2, 1, S]
  lqs = jnp.stack([lq, lq[::-1]], axis=1)[:, :, None, :]

  def step(carry, x):
    a, b = x
    new = _lae(_shift(carry, NEG) + a, carry + b)
    return new, carry

  last, seen = jax.lax.scan(step, init, (lps, lqs))  # seen [E, 2, K, S]
  prefix = jnp.concatenate([seen[:, 0], last[None, 0]], axis=0)
  suffix = jnp.concatenate([last[None, 1], seen[::-1, 1]], axis=0)
  return prefix, suffix


def _window(kmin: int, kmax: int):
  """Static gather pattern of suffix sizes t for prefix sizes j and offsets d.

  Returns (index int[J, W], valid bool[J, W]) with t = kmin - 1 - j + d; the
  subset has j + t + 1 members, which lies in [kmin, kmax] where t >= 0.
  """
  j = np.arange(kmax)[:, None]
  d = np.arange(kmax - kmin + 1)[None, :]
  t = kmin - 1 - j + d
  return np.clip(t, 0, kmax), t >= 0


def _gather_suffix(x: jax.Array, kmin: int, kmax: int, fill: float):
  """x float[E, K, S] (indexed by t) -> float[E, J, W, S] at t(j, d)."""
  if kmin == kmax:  # exact k: t = k - 1 - j, a reversed slice
    return x[:, :kmax][:, ::-1][:, :, None, :]
  index, valid = _window(kmin, kmax)
  g = jnp.take(x, jnp.asarray(index.reshape(-1)), axis=1)
  g = g.reshape(x.shape[0], *index.shape, x.shape[-1])
  return jnp.where(jnp.asarray(valid)[None, :, :, None], g, fill)


def _log_normaliser(prefix: jax.Array, kmin: int, kmax: int) -> jax.Array:
  """log Z* = logsumexp of log Z_j over j in [kmin, kmax]. float32[S]."""
  sizes = prefix[-1, kmin:kmax + 1]
  mx = sizes.max(axis=0)
  return mx + jnp.log(jnp.sum(jnp.exp(sizes - mx), axis=0))


def _forward(rt: jax.Array, kmin: int, kmax: int):
  """Everything the router needs. rt float32[E, S] (logits, transposed)."""
  lp = jax.nn.log_sigmoid(rt)
  lq = jax.nn.log_sigmoid(-rt)
  prefix, suffix = _tables(lp, lq, kmax)
  log_z = _log_normaliser(prefix, kmin, kmax)
  # Joint weights of (e in subset, j members before e, t after): [E, J, W, S].
  pre = prefix[:-1, :kmax][:, :, None, :]
  suf = _gather_suffix(suffix[1:], kmin, kmax, NEG)
  w = jnp.exp(pre + suf + (lp - log_z[None, :])[:, None, None, :])
  m = jnp.clip(w.sum(axis=(1, 2)), 0.0, 1.0)
  return lp, prefix, suffix, log_z, w, m


def _inclusion(table_lo: jax.Array, table_hi: jax.Array,
               lp: jax.Array) -> jax.Array:
  """P(expert i in subset | size j) = exp(shift(lo)[j] + lp_i - hi[j]), [E, K, S]."""
  rho = jnp.exp(_shift(table_lo, NEG) + lp[:, None, :] - table_hi)
  return jnp.clip(rho, 0.0, 1.0)


def _backward(kmin, kmax, res, g_m, g_z):
  """VJP of (m, log Z*) with respect to the logits, float32[E, S]."""
  rt, lp, prefix, suffix, w, m, rho_pre = res
  g = g_m.astype(jnp.float32)
  if rho_pre is None:
    rho_pre = _inclusion(prefix[:-1], prefix[1:], lp)  # expert i onto experts < i
  rho_suf = _inclusion(suffix[1:], suffix[:-1], lp)    # expert i onto experts > i
  rhos = jnp.stack([rho_pre, rho_suf[::-1]], axis=1)   # [E, 2, K, S]
  gs = jnp.stack([g, g[::-1]], axis=1)[:, :, None, :]  # [E, 2, 1, S]

  def step(carry, x):
    rho, gi = x
    new = carry + rho * (_shift(carry, 0.0) + gi - carry)
    return new, carry

  init = jnp.zeros((2,) + prefix.shape[1:], jnp.float32)
  _, seen = jax.lax.scan(step, init, (rhos, gs))       # [E, 2, K, S]
  r_pre = seen[:, 0, :kmax][:, :, None, :]             # experts < e
  r_suf = _gather_suffix(seen[::-1, 1], kmin, kmax, 0.0)  # experts > e
  # E[z_e (z . g)] = sum_{j,t} w (g_e + R_pre + R_suf).
  second = jnp.sum(w * (r_pre + r_suf), axis=(1, 2)) + m * g
  grad = second - m * jnp.sum(m * g, axis=0, keepdims=True)
  if g_z is not None:
    grad = grad + g_z[None, :] * (m - jax.nn.sigmoid(rt))
  return grad.astype(rt.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _marginals(rt: jax.Array, kmin: int, kmax: int):
  """(m float32[E, S], log Z* float32[S]) with the exact covariance VJP."""
  _, _, _, log_z, _, m = _forward(rt, kmin, kmax)
  return m, log_z


def _marginals_fwd(rt, kmin, kmax):
  lp, prefix, suffix, log_z, w, m = _forward(rt, kmin, kmax)
  return (m, log_z), (rt, lp, prefix, suffix, w, m, None)


def _marginals_bwd(kmin, kmax, res, cotangents):
  g_m, g_z = cotangents
  return (_backward(kmin, kmax, res, g_m, g_z),)


_marginals.defvjp(_marginals_fwd, _marginals_bwd)


def _walk(rho: jax.Array, size: jax.Array, rng: jax.Array) -> jax.Array:
  """Exact backward-walk sample.

  Args:
    rho: float32[E, K, S] inclusion probabilities (`_inclusion` of the prefix).
    size: int32[S] subset size per token.
    rng: PRNG key.
  Returns:
    bool[E, S] with exactly `size` members per token.
  """
  num_experts, _, num_tokens = rho.shape
  u = jax.random.uniform(rng, (num_experts, num_tokens), jnp.float32)
  rows = jnp.arange(rho.shape[1], dtype=jnp.int32)[:, None]

  def step(j, x):
    rho_i, u_i, i = x
    p_incl = jnp.sum(jnp.where(rows == j[None, :], rho_i, 0.0), axis=0)
    take = (j > 0) & ((j > i) | (u_i < p_incl))  # j > i: all the rest needed
    return j - take.astype(jnp.int32), take

  idx = jnp.arange(num_experts, dtype=jnp.int32)
  _, z = jax.lax.scan(step, size.astype(jnp.int32), (rho, u, idx), reverse=True)
  return z


def _draw(prefix, lp, kmin, kmax, rng):
  """(z bool[E, S], size int32[S], rho float32[E, K, S]) from the tables."""
  size_key, walk_key = jax.random.split(rng)
  if kmin == kmax:
    size = jnp.full(lp.shape[1:], kmin, jnp.int32)
  else:
    size = kmin + jax.random.categorical(
        size_key, prefix[-1, kmin:kmax + 1], axis=0).astype(jnp.int32)
  rho = _inclusion(prefix[:-1], prefix[1:], lp)
  return _walk(rho, size, walk_key), size, rho


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sampled(rt: jax.Array, rng: jax.Array, kmin: int, kmax: int):
  """One pass for training: (m float32[E, S], z bool[E, S], size int32[S]).

  The tables are built once and serve the marginals, the sample and the
  backward pass; only m carries a gradient (z and size are samples).
  """
  lp, prefix, _, _, _, m = _forward(rt, kmin, kmax)
  z, size, _ = _draw(prefix, lp, kmin, kmax, rng)
  return m, z, size


def _sampled_fwd(rt, rng, kmin, kmax):
  lp, prefix, suffix, _, w, m = _forward(rt, kmin, kmax)
  z, size, rho = _draw(prefix, lp, kmin, kmax, rng)
  return (m, z, size), (rt, lp, prefix, suffix, w, m, rho)


def _sampled_bwd(kmin, kmax, res, cotangents):
  g_m = cotangents[0]
  return _backward(kmin, kmax, res, g_m, None), None


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
  prefix, _ = _tables(jax.nn.log_sigmoid(rt), jax.nn.log_sigmoid(-rt), k_max)
  return prefix[-1].T


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
  lp = jax.nn.log_sigmoid(rt)
  prefix, _ = _tables(lp, jax.nn.log_sigmoid(-rt), k_max)
  z, size, _ = _draw(prefix, lp, k_min, k_max, rng)
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
  routed = gates != 0
  priority = jnp.where(routed, jax.lax.stop_gradient(probs), 0.0)
  routing = Routing(gates=gates, priority=priority)
  metrics = losses.routing_metrics(routing, probs, logits)
  metrics.update(extra)
  return RouterOutput(routing=routing,
                      aux=losses.standard_aux(logits, probs, routing),
                      metrics=metrics)


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
  gates, probs, m, _ = _straight_through(logits, k, k, rng)
  return _output(logits, probs, gates,
                 {"marginal_max": jnp.mean(jnp.max(m, axis=-1))})


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
  if rng is None:
    size = dynamic_k_map(logits, k_min, k_max)
    probs = jax.nn.softmax(logits, axis=-1)
    _, index = jax.lax.top_k(logits, k_max)
    weights = jnp.take_along_axis(probs, index, axis=-1)
    keep = jnp.arange(k_max)[None, :] < size[:, None]
    gates = scatter_choices(weights, index, num_experts, keep)
    return _output(logits, probs, gates, {})
  gates, probs, m, _ = _straight_through(logits, k_min, k_max, rng)
  return _output(logits, probs, gates, {
      "expected_k": jnp.mean(jax.lax.stop_gradient(m).sum(axis=-1)),
      "marginal_max": jnp.mean(jnp.max(m, axis=-1))})
