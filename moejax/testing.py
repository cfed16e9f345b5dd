"""Conformance checks every registered routing method passes.

Axis legend:
  G  routing groups
  S  tokens in one group
  E  experts
  C  capacity (slots per expert)

`check_router(name)` builds the method from the registry and checks the router
contract of `moejax.routing.base` the way the MoE layer uses it: shapes and
dtypes of `Routing`, `aux` and `metrics`; tokens with non-finite logits
leave every other token's outputs finite (and, for token-local methods in
evaluation, unchanged), through every dispatch strategy; `route` and
`route_groups` run under `jax.jit`, and the default `route_groups` (a vmap
over groups) equals `route` per group; finite, non-zero gradients of the gates and aux losses
with respect to the logits; capacity semantics of the slot strategies (the
same kept set for "einsum", "index" and "gather", at most C per expert,
higher priority kept first); the controller state survives an update and a
serialisation round trip with its structure, shapes and dtypes. A new method
is added to the parametrized conformance test with one line.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from moejax import dispatch, routing

# Options every method accepts (`routing.build` uses those that are fields).
BASE_OPTIONS = {"k": 2}


def _state(method: routing.RouterMethod, num_experts: int) -> dict[str, Any]:
  """The mapping the layer hands to `route`: controller state and router
  params (at their initial values)."""
  state = dict(method.init_state(num_experts))
  state.update({name: jnp.asarray(value, jnp.float32) for name, value in
                method.router_params(num_experts).items()})
  return state


def _check_output(name: str, out: routing.RouterOutput, num_tokens: int,
                  num_experts: int, rows: np.ndarray) -> None:
  """Shapes and dtypes; finite gates, aux and metrics on `rows`."""
  r = out.routing
  for field in ("gates", "priority"):
    value = getattr(r, field)
    assert value.shape == (num_tokens, num_experts), (
        f"{name}: {field} has shape {value.shape}, want "
        f"{(num_tokens, num_experts)}")
    assert value.dtype == jnp.float32, f"{name}: {field} is {value.dtype}"
  gates = np.asarray(r.gates)[rows]
  assert np.isfinite(gates).all(), f"{name}: non-finite gates {gates}"
  assert (gates >= 0).all(), f"{name}: negative gates"
  for key, value in out.aux.items():
    assert jnp.shape(value) == (), f"{name}: aux[{key!r}] is not a scalar"
    assert np.isfinite(float(value)), f"{name}: aux[{key!r}] = {value}"
  metrics = out.metrics
  for key in ("experts_per_token", "expert_load"):
    assert key in metrics, f"{name}: metrics lack {key!r}"
  assert jnp.shape(metrics["experts_per_token"]) == ()
  load = np.asarray(metrics["expert_load"])
  assert load.shape == (num_experts,), f"{name}: expert_load {load.shape}"
  assert np.isfinite(load).all(), f"{name}: expert_load {load}"
  np.testing.assert_allclose(load.sum(), 1.0, atol=1e-5,
                             err_msg=f"{name}: expert_load sums to 1")


BAD_TOKENS = {3: jnp.nan, 5: jnp.inf}  # token -> the value of one of its logits


def check_nonfinite(method: routing.RouterMethod, logits: jax.Array,
                    state: Mapping[str, Any], rng: jax.Array) -> None:
  """Tokens with a NaN or +inf logit leave the other tokens' outputs finite
  (and unchanged in evaluation for token-local methods), and no plan gives
  another token a non-finite output."""
  name = method.name
  num_tokens, num_experts = logits.shape
  others = ~np.isin(np.arange(num_tokens), list(BAD_TOKENS))
  poisoned = logits
  for token, value in BAD_TOKENS.items():
    poisoned = poisoned.at[token, 1].set(value)
  capacity = method.capacity(num_tokens, num_experts, 1.0)
  strategies = dispatch.SLOT_STRATEGIES + ("dropless",)

  @jax.jit
  def run(l, state, rng):
    outs = {}
    for train in (True, False):
      out = method.route(l, state, rng=rng, train=train)
      x = jnp.ones((num_tokens, 4), jnp.float32)
      ys = {s: dispatch.plan(out.routing, capacity, strategy=s,
                             max_fanout=method.max_fanout(num_experts))
            for s in strategies}
      outs[train] = (out, {s: p.combine(p.dispatch(x)) for s, p in ys.items()})
    return outs
  bad, clean = run(poisoned, state, rng), run(logits, state, rng)
  for train in (True, False):
    out, ys = bad[train]
    _check_output(f"{name} (non-finite logits, train={train})", out,
                  num_tokens, num_experts, others)
    if method.token_local and not train:
      np.testing.assert_allclose(
          np.asarray(out.routing.gates)[others],
          np.asarray(clean[train][0].routing.gates)[others], rtol=1e-6,
          atol=1e-7, err_msg=f"{name}: a bad token changed other tokens' gates")
    for strategy, y in ys.items():
      assert np.isfinite(np.asarray(y)[others]).all(), (
          f"{name}: strategy={strategy} gives other tokens non-finite outputs "
          f"when tokens {sorted(BAD_TOKENS)} have non-finite logits")


def check_capacity(method: routing.RouterMethod, out: routing.RouterOutput,
                   capacity_factor: float = 0.5) -> None:
  """The slot strategies keep one set: routed assignments only, at most C per
  expert, an expert's kept assignments of priority >= its dropped ones."""
  name = method.name
  num_tokens, num_experts = out.routing.gates.shape
  capacity = method.capacity(num_tokens, num_experts, capacity_factor)
  assert isinstance(capacity, int) and capacity >= 1, (
      f"{name}: capacity {capacity!r}")
  routed = np.asarray(out.routing.routed)
  priority = np.asarray(out.routing.priority)
  kept_sets = jax.jit(lambda r: {
      s: dispatch.plan(r, capacity, strategy=s,
                       max_fanout=method.max_fanout(num_experts)).kept
      for s in dispatch.SLOT_STRATEGIES})(out.routing)
  for strategy, kept in kept_sets.items():
    kept = np.asarray(kept)
    assert not (kept & ~routed).any(), f"{name}/{strategy}: kept unrouted"
    assert (kept.sum(0) <= capacity).all(), f"{name}/{strategy}: over C"
    for e in range(num_experts):
      dropped = routed[:, e] & ~kept[:, e]
      if dropped.any() and kept[:, e].any():
        assert priority[kept[:, e], e].min() >= priority[dropped, e].max(), (
            f"{name}/{strategy}: expert {e} dropped a higher priority")
  first = np.asarray(kept_sets[dispatch.SLOT_STRATEGIES[0]])
  for strategy, kept in kept_sets.items():
    np.testing.assert_array_equal(np.asarray(kept), first, err_msg=(
        f"{name}: {strategy} keeps another set than "
        f"{dispatch.SLOT_STRATEGIES[0]}"))


def check_controller(method: routing.RouterMethod, state: Mapping[str, Any],
                     metrics: Mapping[str, Any]) -> None:
  """`update` keeps each layer's state structure, shapes and dtypes (also
  under jit); the state survives a serialisation round trip and
  `state_metrics` gives finite scalars."""
  name = method.name
  num_experts = np.shape(metrics["expert_load"])[0]
  init = method.init_state(num_experts)
  paths = [("layer_0",), ("layer_1",)]
  states = {p: init for p in paths}
  layer_metrics = {p: metrics for p in paths}
  new = jax.jit(method.update)(states, layer_metrics, jnp.int32(0))
  assert set(new) == set(paths), f"{name}: update changed the layer paths"
  for path in paths:
    assert (jax.tree.structure(new[path]) == jax.tree.structure(init)), (
        f"{name}: update changed the state's structure")
    for a, b in zip(jax.tree.leaves(new[path]), jax.tree.leaves(init)):
      assert (jnp.shape(a), jnp.result_type(a)) == (
          jnp.shape(b), jnp.result_type(b)), f"{name}: state leaf changed"
      assert np.isfinite(np.asarray(a)).all(), f"{name}: non-finite state"
  restored = flax.serialization.from_state_dict(
      states, flax.serialization.to_state_dict(
          jax.tree.map(np.asarray, new)))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key, value in method.state_metrics(new).items():
    assert np.isfinite(np.asarray(value)).all(), (
        f"{name}: state_metrics[{key!r}] = {value}")
  del state


def check_router(name: str, options: Mapping[str, Any] | None = None,
                 **kwargs) -> None:
  """Runs every check of this module on the method registered as `name`,
  built with `BASE_OPTIONS` and `options` (`check_method`); raises
  AssertionError naming the method and the check that failed."""
  check_method(routing.build(name, {**BASE_OPTIONS, **(options or {})}),
               **kwargs)


def check_method(method: routing.RouterMethod, *, num_tokens: int = 16,
                 num_experts: int = 8, num_groups: int = 2,
                 seed: int = 0) -> None:
  """`check_router` on a method object (registered or not)."""
  name = method.name or type(method).__name__
  method.validate(num_experts)
  key = jax.random.PRNGKey(seed)
  logits = jax.random.normal(key, (num_groups, num_tokens, num_experts),
                             jnp.float32) * 2.0
  state = _state(method, num_experts)
  rng = jax.random.PRNGKey(seed + 1)
  all_rows = np.ones(num_tokens, bool)

  route = jax.jit(method.route, static_argnames="train")
  route_groups = jax.jit(method.route_groups, static_argnames="train")
  outs = {}
  for train in (True, False):
    out = outs[train] = route(logits[0], state, rng=rng, train=train)
    _check_output(f"{name} (train={train})", out, num_tokens, num_experts,
                  all_rows)
    groups = route_groups(logits, state, rng=rng, train=train)
    assert groups.routing.gates.shape == logits.shape, (
        f"{name}: route_groups gates {groups.routing.gates.shape}")
    if type(method).route_groups is routing.RouterMethod.route_groups and (
        not (train and method.uses_rng)):
      # The default route_groups is a vmap of route: the same per group.
      for g in range(num_groups):
        one = route(logits[g], state, rng=None, train=train)
        np.testing.assert_allclose(
            np.asarray(groups.routing.gates[g]), np.asarray(one.routing.gates),
            rtol=1e-6, atol=1e-7, err_msg=f"{name}: route_groups != route")

  cot = jnp.cos(jnp.arange(num_tokens * num_experts, dtype=jnp.float32)
                ).reshape(num_tokens, num_experts)

  def loss(l):
    out = method.route(l, state, rng=rng, train=True)
    aux = sum(out.aux.values()) if out.aux else 0.0
    return jnp.sum(out.routing.gates * cot) + aux
  grad = np.asarray(jax.jit(jax.grad(loss))(logits[0]))
  assert np.isfinite(grad).all(), f"{name}: non-finite logits gradient"
  assert np.abs(grad).max() > 0, f"{name}: zero logits gradient"

  check_nonfinite(method, logits[0], state, rng)
  check_capacity(method, outs[True])
  check_controller(method, state, outs[True].metrics)
