"""Top-p methods: fixed-threshold top-p and DTop-p (PI-controlled threshold).

Axis legend:
  G  groups in the layer's batch
  S  tokens in one group
  E  experts
  L  routed layers

Both have a variable fanout per token: capacity comes from the target fanout
`k` (DESIGN.md formula) and the dropless bound is `max_k`. Over capacity an
expert keeps first choices before later ones, so high-fanout tokens lose their
tail experts first; the layer reports `drop_fraction` and
`drop_fraction_above_mean` (drops among tokens with more experts than the mean),
and the routers report `top_p_capped` (tokens whose fanout `max_k` cut).

DTop-p state: controller state `{p, integral}` per layer (`router_state`, never a
param) and the learned scale `gamma` per layer (a param of the MoE layer,
declared through `router_params`).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

from moejax import routing
from moejax.control import PIController, PIState
from moejax.methods.base import Path, RouterMethod, mean_metric, register

SCOPES = ("global", "layer")


def _check_max_k(method: RouterMethod, num_experts: int | None = None) -> None:
  max_k = method.max_k
  if max_k is None:
    return
  if isinstance(max_k, bool) or not isinstance(max_k, numbers.Integral):
    raise ValueError(f"max_k={max_k!r} must be an integer or None")
  high = "num_experts" if num_experts is not None else "E"
  if max_k < method.k or (num_experts is not None and max_k > num_experts):
    raise ValueError(f"max_k={max_k} is out of range; allowed: "
                     f"k={method.k} <= max_k <= {high}"
                     + (f"={num_experts}" if num_experts is not None else ""))


@register
@dataclasses.dataclass(frozen=True)
class TopP(RouterMethod):
  """Fixed-threshold top-p (Huang et al. 2024): the naive baseline.

  Attributes:
    k: target mean fanout; sets capacity only (top-p does not control it).
    p: threshold in (0, 1] (0.4 in the original method).
    max_k: static fanout cap (None = E), >= k.
    normalize: renormalise kept weights (False = raw probabilities, original).
  Aux losses (original method): load balance 1e-2, entropy 1e-4, no z-loss.
  """
  name: ClassVar[str] = "top_p"
  aux_weights: ClassVar[Mapping[str, float]] = {
      "load_balance": 1e-2, "z_loss": 0.0, "entropy": 1e-4}
  p: float = 0.4
  max_k: int | None = None
  normalize: bool = False

  def __post_init__(self):
    super().__post_init__()
    if (isinstance(self.p, bool) or not isinstance(self.p, numbers.Real)
        or not 0 < self.p <= 1):
      raise ValueError(f"p={self.p!r} is out of range; allowed: (0, 1]")
    _check_max_k(self)

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    _check_max_k(self, num_experts)

  def max_fanout(self, num_experts: int) -> int:
    return num_experts if self.max_k is None else self.max_k

  def route(self, logits, state, *, rng, train):
    del state, rng, train
    return routing.top_p(logits, self.p, max_k=self.max_k,
                         normalize=self.normalize)


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
      `moejax.control.PIController` for why 0.1 / 0.1 and not 0.5 / 0.2).
    p_init, p_min, p_max: initial threshold and its bounds.
    gamma_init: initial value of each layer's learned scale gamma.
  Aux losses (spec): load balance 1e-4, entropy 1e-3, z-loss 0.
  """
  name: ClassVar[str] = "dtop_p"
  aux_weights: ClassVar[Mapping[str, float]] = {
      "load_balance": 1e-4, "z_loss": 0.0, "entropy": 1e-3}
  max_k: int | None = None
  dtop_p_scope: str = "global"
  pi_kp: float = 0.1
  pi_ki: float = 0.1
  p_init: float = 0.5
  p_min: float = 0.01
  p_max: float = 1.0
  gamma_init: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if self.dtop_p_scope not in SCOPES:
      raise ValueError(f"dtop_p_scope={self.dtop_p_scope!r} is not supported; "
                       f"allowed: {', '.join(SCOPES)}")
    _check_max_k(self)
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
    _check_max_k(self, num_experts)
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
    out = routing.dtop_p(logits, state["p"], scale=gamma, max_k=self.max_k)
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
