"""Baseline routers and losses against numpy references and hand-checked cases.

Router and loss calls run under jit (one compile each instead of one per
primitive); the argument checks stay eager.
"""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import Routing, expert_choice, top_k
from moejax.routing import losses


# The routers under jit (they return RouterOutput pytrees).
jit_top_k = jax.jit(top_k, static_argnames=("k", "normalize", "random_second"))
jit_expert_choice = jax.jit(expert_choice, static_argnames="capacity")


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_top_k_matches_numpy(k, normalize):
  logits = np.random.default_rng(k).normal(size=(32, 8)).astype(np.float32)
  out = jit_top_k(jnp.asarray(logits), k, normalize=normalize)
  probs = softmax(logits)
  want = np.zeros_like(probs)
  for s in range(32):
    idx = np.argsort(-probs[s])[:k]
    w = probs[s, idx]
    want[s, idx] = w / w.sum() if normalize else w
  np.testing.assert_allclose(np.asarray(out.routing.gates), want, rtol=1e-5,
                             atol=1e-7)
  assert float(out.metrics["experts_per_token"]) == k
  chex.assert_shape(out.metrics["expert_load"], (8,))
  np.testing.assert_allclose(float(out.metrics["expert_load"].sum()), 1.0,
                             rtol=1e-6)


def test_top_k_priority_first_choices_first():
  logits = jnp.array([[3., 1., 0.], [0., 2., 1.]])
  out = jit_top_k(logits, 2)
  np.testing.assert_array_equal(np.asarray(out.routing.priority),
                                [[2, 1, 0], [0, 2, 1]])


def test_top_k_extreme_logits_still_route_k():
  logits = jnp.array([[100., -100., -100., -100.]])
  out = jit_top_k(logits, 2)
  assert int(out.routing.routed.sum()) == 2


def test_random_second_expert():
  logits = jnp.tile(jnp.array([[2.0, 1.9, -5.0, -5.0]]), (4000, 1))
  out = jit_top_k(logits, 2, rng=jax.random.PRNGKey(0), random_second=True)
  g2 = np.exp(1.9) / (np.exp(2.0) + np.exp(1.9))
  kept_second = float(out.routing.routed[:, 1].mean())
  assert abs(kept_second - min(1.0, 2 * g2)) < 0.03
  logits = jnp.tile(jnp.array([[4.0, 0.0, -5.0, -5.0]]), (4000, 1))
  out = jit_top_k(logits, 2, rng=jax.random.PRNGKey(1), random_second=True)
  g2 = 1 / (np.exp(4.0) + 1)
  assert abs(float(out.routing.routed[:, 1].mean()) - 2 * g2) < 0.02
  with pytest.raises(ValueError, match="rng"):
    top_k(logits, 2, random_second=True)


def test_expert_choice_takes_capacity_tokens_per_expert():
  logits = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  out = jit_expert_choice(jnp.asarray(logits), 5)
  probs = softmax(logits)
  gates = np.asarray(out.routing.gates)
  for e in range(4):
    chosen = np.nonzero(gates[:, e])[0]
    assert len(chosen) == 5
    np.testing.assert_array_equal(np.sort(chosen), np.sort(np.argsort(-probs[:, e])[:5]))
    np.testing.assert_allclose(gates[chosen, e], probs[chosen, e], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.metrics["expert_load"]), 0.25)
  np.testing.assert_allclose(float(out.metrics["experts_per_token"]), 5 * 4 / 16)


def test_load_balance_minimum_one_at_uniform():
  num_tokens, num_experts = 64, 8
  probs = jnp.full((num_tokens, num_experts), 1 / num_experts)
  routed = jnp.zeros((num_tokens, num_experts), bool).at[
      jnp.arange(num_tokens), jnp.arange(num_tokens) % num_experts].set(True)
  load_balance_loss = jax.jit(losses.load_balance_loss)
  np.testing.assert_allclose(float(load_balance_loss(probs, routed)), 1.0,
                             rtol=1e-6)
  # Skewed routing and probabilities together cost more.
  skew_probs = jax.nn.softmax(jnp.tile(jnp.arange(8.0), (64, 1)), axis=-1)
  skew_routed = jnp.zeros_like(routed).at[:, 7].set(True)
  assert float(load_balance_loss(skew_probs, skew_routed)) > 4.0


def test_z_loss_and_entropy():
  logits = jnp.array([[0., 0.], [1., 1.]])
  z, ent = jax.jit(lambda l: (losses.z_loss(l),
                              losses.entropy(jax.nn.softmax(l))))(logits)
  np.testing.assert_allclose(float(z),
                             (np.log(2) ** 2 + (1 + np.log(2)) ** 2) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(float(ent), np.log(2), rtol=1e-6)


def test_routing_metrics_max_vio_and_zero_fanout():
  gates = jnp.array([[1., 0.], [1., 0.], [1., 0.], [0., 0.]])
  m = jax.jit(losses.routing_metrics)(Routing(gates, gates))
  np.testing.assert_allclose(float(m["max_vio"]), 1.0)  # (3 - 1.5) / 1.5
  np.testing.assert_allclose(float(m["zero_expert_fraction"]), 0.25)
  np.testing.assert_allclose(np.asarray(m["expert_load"]), [1., 0.])


@pytest.mark.parametrize("bad_k", [0, 9])
def test_top_k_bad_k(bad_k):
  with pytest.raises(ValueError, match=f"k={bad_k}"):
    top_k(jnp.zeros((4, 8)), bad_k)


def test_expert_choice_bad_capacity():
  with pytest.raises(ValueError, match="capacity=0"):
    expert_choice(jnp.zeros((4, 8)), 0)


def test_routers_jit_and_vmap():
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 8))
  out = jax.jit(jax.vmap(lambda l: top_k(l, 2)))(logits)
  chex.assert_shape(out.routing.gates, (3, 16, 8))
  out = jax.jit(jax.vmap(lambda l: expert_choice(l, 4)))(logits)
  chex.assert_shape(out.routing.gates, (3, 16, 8))


def test_public_names():
  for name in ("Routing", "RouterOutput", "top_k", "expert_choice"):
    assert hasattr(routing, name)


API_FUNCTIONS = ("top_k", "expert_choice", "top_p", "dtop_p",
                 "expert_threshold", "exact_k", "exact_k_log_partition",
                 "exact_k_marginals", "dynamic_k", "biased_top_k",
                 "load_balance_loss", "z_loss", "entropy", "routing_metrics")


@pytest.mark.parametrize("name", API_FUNCTIONS)
def test_router_functions_are_functions_not_modules(name):
  fn = getattr(routing, name)
  assert callable(fn) and not isinstance(fn, types.ModuleType), name


def test_methods_declare_their_capabilities():
  from moejax import control, dispatch
  assert set(routing.available()) == {
      "top_k", "loss_free", "expert_choice", "top_p", "dtop_p",
      "expert_threshold", "exact_k", "dynamic_k"}
  for name in routing.available():
    cls = routing.get(name)
    assert issubclass(cls, routing.RouterMethod) and cls.name == name
    method = routing.build(name, {"k": 2})
    assert isinstance(method.token_local, bool)
    assert isinstance(method.uses_rng, bool)  # a property where options decide
    assert isinstance(method.default_num_shared, int)
  local = {n: routing.get(n).token_local for n in routing.available()}
  assert not local.pop("expert_choice") and all(local.values())
  shared = {n: routing.get(n).default_num_shared for n in routing.available()}
  assert shared.pop("expert_threshold") == 1 and not any(shared.values())
  assert routing.ExactK.uses_rng and routing.DynamicK.uses_rng
  assert routing.build("top_k", {"k": 2, "random_second": True}).uses_rng
  assert not routing.build("top_k", {"k": 2}).uses_rng
  # capacity: one formula, C = ceil(cf * S * k / E) up to a multiple of 4
  assert dispatch.capacity is routing.capacity
  assert routing.TopK(k=2).capacity(100, 8, 1.0) == routing.capacity(
      100, 2, 8, 1.0) == 28
  assert routing.ExpertChoice(k=2).capacity(100, 8, 1.25) == 25
  assert routing.ExpertThreshold(k=1).capacity(64, 4, 1.0) == 24  # (1 + C) k
  assert routing.TopK(k=2).max_fanout(8) == 2
  assert routing.LossFreeTopK(k=2).max_fanout(8) == 2
  assert routing.TopP(k=2, max_k=4).max_fanout(8) == 4
  assert routing.DynamicK(k=2, k_max=3).max_fanout(8) == 3
  assert control.PIController is routing.PIController


def test_scatter_rows_matches_a_loop_and_its_gradient_is_a_gather():
  from moejax.routing.base import scatter_rows
  rng = np.random.default_rng(3)
  values = rng.normal(size=(6, 3)).astype(np.float32)
  index = rng.integers(0, 5, size=(6, 3)).astype(np.int32)  # repeats add up
  want = np.zeros((6, 5), np.float32)
  for r in range(6):
    for j in range(3):
      want[r, index[r, j]] += values[r, j]
  got = jax.jit(scatter_rows, static_argnums=2)(jnp.asarray(values),
                                                jnp.asarray(index), 5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  cot = rng.normal(size=(6, 5)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(
      scatter_rows(v, jnp.asarray(index), 5) * cot)))(jnp.asarray(values))
  np.testing.assert_allclose(np.asarray(grad),
                             np.take_along_axis(cot, index, axis=1), rtol=1e-6)


@pytest.mark.parametrize("name,options", [
    ("top_k", {"k": 2}),
    ("top_k", {"k": 2, "random_second": True}),
    ("loss_free", {"k": 2}),
    ("top_k", {"k": 2, "score_fn": "sigmoid"}),
    ("top_p", {"p": 0.6, "max_k": 4}),
    ("dtop_p", {"max_k": 4}),
    ("exact_k", {"k": 3}),  # top_k, normalize=False
    ("dynamic_k", {"k_min": 1, "k_max": 3}),
])
def test_tpu_top_k_branch_matches_default(monkeypatch, name, options):
  # On TPU the routers read their top-k values with a select over E
  # (`base.top_k_rows`, `base.take_rows`) instead of differentiating through
  # lax.top_k / take_along_axis (scatter-adds in the backward): the same
  # outputs and gates' gradients bit for bit, ties included. With the aux
  # losses the gradient sums the same terms in another order (XLA folds the
  # default branch's scatter-add into the aux losses' cotangent): equal up to
  # float32 rounding.
  from moejax import backend  # pylint: disable=g-import-not-at-top
  method = routing.build(name, options)
  num_experts = 8
  rng = np.random.default_rng(0)
  # Half-unit steps: many tied logits per row; row 0 all tied.
  logits = np.round(2 * rng.normal(size=(2, 16, num_experts))) / 2
  logits[:, 0] = 0.25
  logits = jnp.asarray(logits, jnp.float32)
  cot = jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
  state = dict(method.init_state(num_experts))
  state.update({key: jnp.float32(value) for key, value in
                method.router_params(num_experts).items()})
  if "bias" in state:
    state["bias"] = jnp.asarray(
        rng.choice([0.0, 0.05], size=num_experts), jnp.float32)
  key = jax.random.PRNGKey(1) if method.uses_rng else None

  def run():
    def route(x):
      return method.route_groups(x, state, rng=key, train=True)

    def gates_loss(x):
      return jnp.vdot(route(x).routing.gates, cot)

    def loss(x):
      aux = sum(jnp.sum(v) for v in jax.tree.leaves(route(x).aux))
      return gates_loss(x) + aux
    fn = lambda x: (route(x), jax.grad(gates_loss)(x), jax.grad(loss)(x))
    return jax.jit(fn)(logits), str(jax.make_jaxpr(fn)(logits))

  monkeypatch.setattr(backend, "current_backend", lambda: "cpu")
  (want_out, want_gates_grad, want_grad), _ = run()
  monkeypatch.setattr(backend, "current_backend", lambda: "tpu")
  (out, gates_grad, grad), jaxpr = run()
  assert "scatter-add" not in jaxpr and "gather" not in jaxpr
  chex.assert_trees_all_equal(out, want_out)
  chex.assert_trees_all_equal(gates_grad, want_gates_grad)
  assert float(jnp.abs(want_gates_grad).max()) > 0
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
