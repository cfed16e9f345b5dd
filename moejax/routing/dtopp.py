"""DTop-p routing (Jin et al., "Sparsity-Controlled Dynamic Top-p MoE", 2025).

Axis legend:
  S  tokens in one group
  E  experts
  K  sorted prefix kept for the threshold (static `max_k`, default E)

Dynamic routing normalisation plus top-p with renormalised weights: each token's
logits are standardised over the experts (zero mean, unit population std), scaled
by the layer's learned scalar gamma (`scale`), passed through a softmax, and the
shortest prefix reaching `p` is kept. `p` comes from a PI controller
(`PIController`) and `scale` from a param of the MoE layer; both may be traced.

`dtop_p` is the router, `DTopP` the method (`--router=dtop_p`). Its state:
controller state `{p, integral}` per layer (`router_state`, never a param) and
the learned scale `gamma` per layer (a param of the MoE layer, declared through
`router_params`). Capacity and the fanout bound are those of top-p
(`moejax.routing.topp`).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from moejax.checks import check_number, check_p
from moejax.routing.base import (Path, RouterMethod, RouterOutput,
                                 check_logits, guard_tokens, mean_metric,
                                 register)
from moejax.routing.topp import check_max_k, resolve_max_k, select_top_p

SCOPES = ("global", "layer")

# Added to the variance inside the square root: keeps the gradient finite when
# all of a token's logits are equal (std = 0) and is well below the 1e-4 the
# method allows.
STD_EPS = 1e-6
# Finite logits are clipped to +-LOGIT_CLIP before standardisation: one outlier
# (say -1e30) would otherwise dominate the mean and std and erase the ranking of
# the other experts. Ordinary logits are far inside and unchanged.
LOGIT_CLIP = 1e4


def standardize(logits: jax.Array, eps: float = STD_EPS) -> jax.Array:
  """float32[S, E] -> float32[S, E]: (r - mean_E r) / sqrt(var_E r + eps).

  Population variance (ddof = 0); invariant to adding a per-token constant and,
  up to eps, to multiplying by a positive one. The mean and variance are over
  the finite logits, clipped to +-`LOGIT_CLIP`; a -inf logit (masked expert)
  stays -inf. Rows of a non-finite token (a NaN or +inf logit,
  `finite_tokens`) give NaN.
  """
  safe, ok = guard_tokens(logits.astype(jnp.float32))
  return jnp.where(ok[..., None], _standardize(safe, eps), jnp.nan)


def _standardize(logits: jax.Array, eps: float) -> jax.Array:
  """`standardize` of finite tokens' logits float32[S, E] (no NaN, no +inf)."""
  masked = logits == -jnp.inf
  clipped = jnp.clip(jnp.where(masked, 0.0, logits), -LOGIT_CLIP, LOGIT_CLIP)
  count = jnp.maximum(jnp.sum(~masked, axis=-1, keepdims=True), 1)
  mean = jnp.where(masked, 0.0, clipped).sum(axis=-1, keepdims=True) / count
  centred = jnp.where(masked, 0.0, clipped - mean)
  var = jnp.sum(centred * centred, axis=-1, keepdims=True) / count
  return jnp.where(masked, -jnp.inf, centred * jax.lax.rsqrt(var + eps))


def dtop_p(logits: jax.Array, p, *, scale=1.0,
           max_k: int | None = None) -> RouterOutput:
  """DTop-p routing of one group.

  Args:
    logits: float32[S, E] raw router logits.
    p: threshold in (0, 1]; Python float (validated) or traced float32[].
    scale: gamma, the layer's learned scale of the standardised logits (float
      or float32[]; gradients flow to it).
    max_k: static cap on the fanout, 1 <= max_k <= E (None = E).
  Returns:
    RouterOutput; gates = the kept probabilities of softmax(scale * r_hat),
    renormalised to sum to 1 per token. `aux` holds `load_balance` and
    `entropy` of those probabilities and `z_loss` of the raw logits.
  """
  logits = check_logits(logits)
  check_p("p", p)
  max_k = resolve_max_k(max_k, logits.shape[-1])
  # Standardised from the guarded logits: a non-finite token (routed nowhere
  # by `select_top_p`) gets a finite gradient row.
  scaled = jnp.asarray(scale, jnp.float32) * _standardize(
      guard_tokens(logits)[0], STD_EPS)
  probs = jax.nn.softmax(scaled, axis=-1)
  return select_top_p(logits, probs, p, max_k, normalize=True)


@flax.struct.dataclass
class PIState:
  """State of a `PIController` (float32 scalars, or [L] for one per layer).

  Attributes:
    p: the current threshold, within [p_min, p_max].
    integral: the running sum of normalised errors (not wound up while p is
      clipped in the direction of the error).
  """
  p: jax.Array
  integral: jax.Array


@dataclasses.dataclass(frozen=True)
class PIController:
  """Positional PI control of the top-p threshold from the measured fanout.

  With target T, N experts and measured mean fanout a:
    e = (T - a) / N;  I' = I + e;  p = clip(p_init + kp * e + ki * I', p_min, p_max)
  Too few active experts (e > 0) raise p; too many lower it. Anti-windup by
  integrator clamping: while the error pushes p against a bound, the integral
  grows only up to the value that puts p exactly on that bound, so p leaves the
  bound as soon as the error changes sign.

  Stability: the fanout measured at step t comes from the p of step t - 1, and
  the plant gain g = (d fanout / d p) / N grows steeply as p nears 1 (the tail
  of P is spread over many experts). Linearised, the loop is stable for
  g < min(1 / kp, 2 / (2 kp + ki)): the defaults (kp 0.1, ki 0.1, p_init 0.5)
  keep it stable up to g ~ 6.7, kp 0.5, ki 0.2 only up to g ~ 1.7. Their
  settling measured on fixed and trained logits is in
  experiments/reports/bench_router_notes.md.

  Attributes:
    target: T, the target mean experts per token (> 0, <= num_experts).
    num_experts: N (>= 1), normalises the error.
    kp: proportional gain (>= 0).
    ki: integral gain (>= 0).
    p_init: p_0, the output at zero error and zero integral, in [p_min, p_max].
    p_min, p_max: bounds of p, 0 < p_min <= p_max <= 1.
  """
  target: float
  num_experts: int
  kp: float = 0.1
  ki: float = 0.1
  p_init: float = 0.5
  p_min: float = 0.01
  p_max: float = 1.0

  def __post_init__(self):
    if (isinstance(self.num_experts, bool)
        or not isinstance(self.num_experts, numbers.Integral)
        or self.num_experts < 1):
      raise ValueError(f"num_experts={self.num_experts!r} is out of range; "
                       "allowed: integer >= 1")
    check_number("target", self.target, 0.0, float(self.num_experts),
                 low_open=True)
    check_number("kp", self.kp, 0.0)
    check_number("ki", self.ki, 0.0)
    check_number("p_min", self.p_min, 0.0, 1.0, low_open=True)
    check_number("p_max", self.p_max, 0.0, 1.0, low_open=True)
    if self.p_min > self.p_max:
      raise ValueError(f"p_min={self.p_min} is larger than p_max={self.p_max}; "
                       "allowed: p_min <= p_max")
    check_number("p_init", self.p_init, self.p_min, self.p_max)

  def init(self, shape: tuple[int, ...] = ()) -> PIState:
    """The initial state: p = p_init, integral = 0 (float32 of `shape`)."""
    return PIState(p=jnp.full(shape, self.p_init, jnp.float32),
                   integral=jnp.zeros(shape, jnp.float32))

  def error(self, measured) -> jax.Array:
    """float32: the normalised error (T - measured) / N."""
    measured = jnp.asarray(measured, jnp.float32)
    return (self.target - measured) / self.num_experts

  def update(self, state: PIState, measured) -> PIState:
    """One control step; pure and jit-able, elementwise over the state's shape.

    Args:
      state: the current `PIState`.
      measured: mean activated experts per token of the last step (a Python
        float or float32 array broadcastable to the state).
    Returns:
      the new `PIState`; where `measured` is not finite (NaN or inf) the state
      is kept unchanged.
    """
    measured = jnp.asarray(measured, jnp.float32)
    finite = jnp.isfinite(measured)
    e = self.error(jnp.where(finite, measured, self.target))
    integral = state.integral + e
    if self.ki > 0:
      # Anti-windup (integrator clamping): in the direction of the error, the
      # integral grows only up to the value that puts the output on the bound
      # it is pushing against (never past it, never back from where it was).
      proportional = self.p_init + self.kp * e
      upper = (self.p_max - proportional) / self.ki
      lower = (self.p_min - proportional) / self.ki
      integral = jnp.where(
          e > 0, jnp.maximum(state.integral, jnp.minimum(integral, upper)),
          jnp.minimum(state.integral, jnp.maximum(integral, lower)))
    p = jnp.clip(self.p_init + self.kp * e + self.ki * integral, self.p_min,
                 self.p_max)
    p = jnp.where(finite, p, state.p)
    integral = jnp.where(finite, integral, state.integral)
    return PIState(p=p.astype(jnp.float32),
                   integral=integral.astype(jnp.float32))


@register
@dataclasses.dataclass(frozen=True)
class DTopP(RouterMethod):
  """DTop-p: standardised logits times a learned gamma, top-p with renormalised
  weights, p from a PI controller holding the mean fanout at `k`.

  Attributes:
    k: target mean fanout T (the k of the top-k model it is compared against).
    max_k: static fanout cap (None = E), >= k.
    dtop_p_scope: "global" (one error from the mean fanout over all MoE layers,
      the same p everywhere) or "layer" (one controller per layer).
    pi_kp, pi_ki: PI gains on the error (T - fanout) / E (see
      `PIController` for why 0.1 / 0.1 and not 0.5 / 0.2).
    p_init, p_min, p_max: initial threshold and its bounds.
    gamma_init: initial value of each layer's learned scale gamma.
  Aux losses (paper): load balance 1e-4, entropy 1e-3, z-loss 0.
  """
  name: ClassVar[str] = "dtop_p"
  aux_weights: ClassVar[Mapping[str, float]] = {
      "load_balance": 1e-4, "z_loss": 0.0, "entropy": 1e-3}
  max_k: int | None = None
  dtop_p_scope: str = "global"
  # The controller's options default to `PIController`'s.
  pi_kp: float = PIController.kp
  pi_ki: float = PIController.ki
  p_init: float = PIController.p_init
  p_min: float = PIController.p_min
  p_max: float = PIController.p_max
  gamma_init: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if self.dtop_p_scope not in SCOPES:
      raise ValueError(f"dtop_p_scope={self.dtop_p_scope!r} is not supported; "
                       f"allowed: {', '.join(SCOPES)}")
    check_max_k(self)
    if (isinstance(self.gamma_init, bool)
        or not isinstance(self.gamma_init, numbers.Real)
        or not self.gamma_init > 0):
      raise ValueError(f"gamma_init={self.gamma_init!r} is out of range; "
                       "allowed: > 0")
    self.controller(max(self.k, self.max_k or 1))  # validates gains and bounds

  def controller(self, num_experts: int) -> PIController:
    """The PI controller for a layer of `num_experts` experts."""
    try:
      return PIController(target=float(self.k), num_experts=num_experts,
                          kp=self.pi_kp, ki=self.pi_ki, p_init=self.p_init,
                          p_min=self.p_min, p_max=self.p_max)
    except ValueError as e:  # name the method's field, not the controller's
      msg = str(e)
      for field, flag in (("kp", "pi_kp"), ("ki", "pi_ki")):
        if msg.startswith(field + "="):
          msg = flag + msg[len(field):]
      raise ValueError(msg) from None

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    check_max_k(self, num_experts)
    self.controller(num_experts)

  def max_fanout(self, num_experts: int) -> int:
    return num_experts if self.max_k is None else self.max_k

  def init_state(self, num_experts: int) -> dict[str, Any]:
    state = self.controller(num_experts).init()
    return {"p": state.p, "integral": state.integral}

  def router_params(self, num_experts: int) -> dict[str, Any]:
    del num_experts
    return {"gamma": self.gamma_init}

  def route(self, logits, state, *, rng, train):
    del rng, train  # p is frozen outside training: only `update` changes it
    gamma = state["gamma"]
    out = dtop_p(logits, state["p"], scale=gamma, max_k=self.max_k)
    out.metrics["gamma"] = jnp.asarray(gamma, jnp.float32)
    return out

  def update(self, states: Mapping[Path, Any], metrics: Mapping[Path, Any],
             step) -> dict[Path, Any]:
    del step
    if not states:
      return {}
    num_experts = next(iter(metrics.values()))["expert_load"].shape[-1]
    ctrl = self.controller(num_experts)
    if self.dtop_p_scope == "global":
      # One error from the mean fanout over all layers; every layer holds the
      # same state (the mean keeps that true even if they ever diverge).
      state = PIState(
          p=jnp.mean(jnp.stack([s["p"] for s in states.values()])),
          integral=jnp.mean(jnp.stack([s["integral"]
                                       for s in states.values()])))
      new = ctrl.update(state, mean_metric(metrics, "experts_per_token"))
      return {path: {"p": new.p, "integral": new.integral} for path in states}
    out = {}
    for path, s in states.items():
      new = ctrl.update(PIState(p=s["p"], integral=s["integral"]),
                        metrics[path]["experts_per_token"])
      out[path] = {"p": new.p, "integral": new.integral}
    return out

  def state_metrics(self, states: Mapping[Path, Any]) -> dict[str, Any]:
    if not states:
      return {}
    ps = jnp.stack([jnp.asarray(s["p"]) for s in states.values()])
    integrals = jnp.stack([jnp.asarray(s["integral"]) for s in states.values()])
    return {"p": ps.mean(), "p_layer": ps, "pi_integral": integrals.mean()}
