"""A non-finite or extreme value stays its own token's problem.

Axis legend:
  S  tokens in one group
  E  experts
  D  model width
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routing.dtopp import PIController, PIState
from moejax.routing.lossfree import SignBias
from moejax.routing.threshold import ThresholdEMA

NAN = float("nan")
INF = float("inf")


# Controllers ignore non-finite statistics, per expert.

def test_threshold_ema_keeps_threshold_of_nonfinite_expert():
  ema = ThresholdEMA(beta=0.9)
  state = ema.update(ema.init(3), jnp.array([1.0, 2.0, 3.0]))
  state = ema.update(state, jnp.array([1.5, 2.5, 3.5]))
  before = np.asarray(ema.value(state))
  for bad in (NAN, INF, -INF):
    bad_state = ema.update(state, jnp.array([bad, 2.0, -NAN]))
    after = np.asarray(ema.value(bad_state))
    assert np.all(np.isfinite(after))
    np.testing.assert_allclose(after[[0, 2]], before[[0, 2]], rtol=1e-6)
    clean = np.asarray(ema.value(ema.update(state, jnp.array([0.0, 2.0, 0.0]))))
    assert after[1] == clean[1]
  # Later clean steps move it as usual.
  state = ema.update(ema.update(state, jnp.array([NAN, NAN, NAN])),
                     jnp.array([1.0, 2.0, 3.0]))
  assert np.all(np.isfinite(np.asarray(ema.value(state))))


def test_pi_controller_keeps_state_on_nonfinite_fanout():
  ctrl = PIController(target=2.0, num_experts=8)
  state = ctrl.update(ctrl.init(), 3.0)
  for bad in (NAN, INF, -INF):
    new = ctrl.update(state, bad)
    assert float(new.p) == float(state.p)
    assert float(new.integral) == float(state.integral)
  layered = ctrl.update(ctrl.init((2,)), jnp.array([NAN, 1.0]))
  assert float(layered.p[0]) == 0.5 and float(layered.p[1]) > 0.5


def test_sign_bias_keeps_bias_of_nonfinite_expert():
  ctrl = SignBias(rate=0.1)
  state = ctrl.update(ctrl.init(4), jnp.array([1.0, NAN, 3.0, INF]))
  np.testing.assert_allclose(np.asarray(state["bias"]), [0.1, 0.0, -0.1, 0.0])
  clean = ctrl.update(ctrl.init(3), jnp.array([1.0, 2.0, 4.0]))
  np.testing.assert_allclose(np.asarray(clean["bias"]), [0.1, 0.1, -0.1])
