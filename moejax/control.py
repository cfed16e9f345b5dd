"""Controllers: the non-gradient feedback loops of routing methods.

Axis legend:
  E  experts (N in the control laws: routed experts of a layer)
  L  routed layers (a controller's state may carry a leading L axis)

A controller is a frozen dataclass of hyperparameters with `init() -> State` and a
pure, jit-able `update(state, measured) -> State`; `State` is a small pytree. Its
state is never a param and never touched by the optimizer: it lives in
`TrainState.router_state`, the train step updates it from metrics reduced over
the whole global batch, checkpoints save it, and evaluation and sampling read it
frozen.

Controllers here:
  `PIController`  DTop-p's positional PI law on the threshold p of top-p routing.
  `ThresholdEMA`  Expert Threshold's bias-corrected EMA of per-expert cutoffs.
  `SignBias`      loss-free balancing's per-expert selection bias (sign law).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp


def _check_number(name: str, value, low: float, high: float | None = None,
                  low_open: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}={value!r} must be a real number")
  bad = value <= low if low_open else value < low
  if high is not None:
    bad = bad or value > high
  if bad:
    lo = "(" if low_open else "["
    allowed = f"{lo}{low}, {high}]" if high is not None else (
        f"> {low}" if low_open else f">= {low}")
    raise ValueError(f"{name}={value} is out of range; allowed: {allowed}")


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
  g < min(1 / kp, 2 / (2 kp + ki)). The defaults (kp 0.1, ki 0.1, p_init 0.5)
  keep it stable up to g ~ 6.7 and settle top-p / DTop-p routing of fixed logits
  in about 50 steps; kp 0.5, ki 0.2 (g < 1.7) settle a little faster at
  p ~ 0.5 but oscillate with period 2 once p ~ 0.9 (measured: on fixed DTop-p
  logits in tests/test_control.py, and after ~700 steps of a real `small` run,
  experiments/reports/dtop_p.md); ki <~ 0.005 is too slow.

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
    _check_number("target", self.target, 0.0, float(self.num_experts),
                  low_open=True)
    _check_number("kp", self.kp, 0.0)
    _check_number("ki", self.ki, 0.0)
    _check_number("p_min", self.p_min, 0.0, 1.0, low_open=True)
    _check_number("p_max", self.p_max, 0.0, 1.0, low_open=True)
    if self.p_min > self.p_max:
      raise ValueError(f"p_min={self.p_min} is larger than p_max={self.p_max}; "
                       "allowed: p_min <= p_max")
    _check_number("p_init", self.p_init, self.p_min, self.p_max)

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
      the new `PIState`.
    """
    e = self.error(measured)
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
    return PIState(p=p.astype(jnp.float32),
                   integral=integral.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class ThresholdEMA:
  """Bias-corrected EMA of per-expert score cutoffs (Expert Threshold routing).

  State `{"ema": float32[E], "count": int32[]}`, started at ema = 0, count = 0.
  After each training step with cutoffs x (each expert's k-th largest score
  over the global batch):
    ema' = beta * ema + (1 - beta) * x;  count' = count + 1
  and the thresholds used for routing are the bias-corrected
    c = ema / (1 - beta^count)   (0 while count = 0),
  i.e. the beta-weighted mean of all cutoffs seen so far.

  Attributes:
    beta: EMA decay in [0, 1) (0.999 in the paper).
  """
  beta: float = 0.999

  def __post_init__(self):
    _check_number("beta", self.beta, 0.0, 1.0)
    if self.beta >= 1.0:
      raise ValueError(f"beta={self.beta} is out of range; allowed: [0, 1)")

  def init(self, num_experts: int) -> dict[str, jax.Array]:
    """ema = zeros float32[E], count = 0."""
    return {"ema": jnp.zeros((num_experts,), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}

  def update(self, state, cutoffs) -> dict[str, jax.Array]:
    """One EMA step with this step's cutoffs float32[E]; pure and jit-able."""
    cutoffs = jnp.asarray(cutoffs, jnp.float32)
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


@dataclasses.dataclass(frozen=True)
class SignBias:
  """Loss-free balancing (DeepSeek-V3): a per-expert bias for top-k selection.

  State `{"bias": float32[E]}`, started at 0. After each step, with loads c
  (assignments per expert over the whole global batch; any positive scale):
    b_e' = b_e + rate * sign(mean(c) - c_e)
  Underloaded experts gain bias (chosen more), overloaded ones lose it.

  Attributes:
    rate: update speed u > 0 (1e-3 in the paper; 1e-4 too slow, 1e-2
      oscillates).
  """
  rate: float = 1e-3

  def __post_init__(self):
    _check_number("rate", self.rate, 0.0, low_open=True)

  def init(self, num_experts: int) -> dict[str, jax.Array]:
    """bias = zeros float32[E]."""
    return {"bias": jnp.zeros((num_experts,), jnp.float32)}

  def update(self, state, load) -> dict[str, jax.Array]:
    """One sign step from the loads float32[E]; pure and jit-able."""
    load = jnp.asarray(load, jnp.float32)
    step = self.rate * jnp.sign(jnp.mean(load) - load)
    return {"bias": (state["bias"] + step).astype(jnp.float32)}
