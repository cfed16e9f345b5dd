"""ProbMoE's subset tables: the dynamic programme over experts behind the exact
marginals, their covariance VJP and the exact samples of `routing/probmoe.py`.

Axis legend:
  S  tokens in one group
  E  experts
  K  subset sizes 0..k_max (K = k_max + 1 rows of the tables)
  J  prefix sizes used by a marginal (0..k_max-1)
  W  width of the size range (k_max - k_min + 1)
  L  rows of the size-reversed suffix table (k_max + W - 1)

The distribution (see `probmoe.py`): per token independent inclusions with
`p_e = sigmoid(r_e)`, conditioned on `kmin <= |S| <= kmax`; `Z_j` the
normaliser of size j, `Z* = sum_{j in range} Z_j`. Tables are laid out with
sizes before tokens, `[..., K, S]`, and take transposed logits `rt [E, S]`.

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
  of all groups in one pass (`probmoe.sampled_groups`): memory traffic, not flops,
  bounds these scans.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # finite log(0): NEG + x == NEG for every |x| < 1e22


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


def prefix_table(lp: jax.Array, lq: jax.Array, kmax: int):
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
  before, last = prefix_table(lp, lq, kmax)
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
def marginals(rt: jax.Array, kmin: int, kmax: int):
  """(m float32[E, S], log Z* float32[S]) with the exact covariance VJP."""
  m, log_z, _, _, _ = _forward(rt, kmin, kmax)
  return m, log_z


def _marginals_fwd(rt, kmin, kmax):
  m, log_z, _, _, res = _forward(rt, kmin, kmax)
  return (m, log_z), res


def _marginals_bwd(kmin, kmax, res, cotangents):
  g_m, g_z = cotangents
  return (_backward(kmin, kmax, res, g_m, g_z),)


marginals.defvjp(_marginals_fwd, _marginals_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def sampled(rt: jax.Array, rng: jax.Array, kmin: int, kmax: int):
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


sampled.defvjp(_sampled_fwd, _sampled_bwd)


def sample(rt: jax.Array, kmin: int, kmax: int, rng: jax.Array):
  """(z bool[E, S], size int32[S]) from transposed logits, no gradient."""
  _, _, z, size, _ = _forward(rt, kmin, kmax, rng)
  return z, size
