"""Every registered routing method passes the public conformance suite
(`moejax.testing.check_router`); the suite catches a method that breaks the
contract."""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import pytest

from moejax import routing, testing
from moejax.routing import losses


@pytest.mark.parametrize("name", routing.available())
def test_registered_router_conforms(name):
  testing.check_router(name)


@dataclasses.dataclass(frozen=True)
class _GroupNormalised(routing.RouterMethod):
  """Top-1 whose gates are normalised over the group's tokens: one token's
  NaN logit spreads to every token (not registered)."""
  name: ClassVar[str] = "group_normalised"

  def route(self, logits, state, *, rng, train):
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.argmax(logits, axis=-1)
    gates = jax.nn.one_hot(top, logits.shape[-1]) * probs
    gates = gates / jnp.sum(gates)  # over the whole group
    routing_ = routing.Routing(gates=gates, priority=gates)
    return losses.standard_output(logits, probs, routing_)


def test_suite_catches_a_router_that_spreads_nan():
  with pytest.raises(AssertionError, match="non-finite"):
    testing.check_method(_GroupNormalised(k=1), num_groups=1)
