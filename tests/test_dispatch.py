"""Dispatchers against a per-expert Python loop reference.

Library calls run under jit (`run_plan`, `jit_plan`, `jit_top_k`): one compile
per shape and static arguments instead of one per primitive of eager code.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dispatch
from moejax.routing import Routing, expert_choice, top_k

STRATEGIES = ("einsum", "index", "dropless")


def reference_kept(gates, priority, capacity):
  """bool[S, E]: each expert keeps routed tokens by priority desc, index asc."""
  gates, priority = np.asarray(gates), np.asarray(priority)
  num_tokens, num_experts = gates.shape
  kept = np.zeros(gates.shape, bool)
  for e in range(num_experts):
    routed = [s for s in range(num_tokens) if gates[s, e] != 0]
    routed.sort(key=lambda s: (-priority[s, e], s))
    for s in routed[:capacity]:
      kept[s, e] = True
  return kept


def reference_moe(x, gates, kept, w1, w2):
  """Per-expert loop: out[s] = sum_e kept * gate * relu(x W1_e) W2_e."""
  out = np.zeros_like(x)
  for e in range(gates.shape[1]):
    for s in range(x.shape[0]):
      if kept[s, e]:
        out[s] += gates[s, e] * (np.maximum(x[s] @ w1[e], 0) @ w2[e])
  return out


# `top_k` and `dispatch.plan` under jit (they return pytrees).
jit_top_k = jax.jit(top_k, static_argnames=("k", "normalize", "random_second"))
jit_plan = jax.jit(dispatch.plan, static_argnames=(
    "capacity", "strategy", "max_fanout", "block_size", "num_groups"))


@functools.partial(jax.jit, static_argnames=(
    "capacity", "strategy", "max_fanout", "block_size"))
def run_plan(routing, capacity, strategy, x, w1, w2, max_fanout=None,
             block_size=None):
  """A ReLU expert MLP through one plan.

  Args:
    routing: `Routing` with gates/priority float32[S, E].
    capacity, strategy, max_fanout, block_size: static `dispatch.plan`
      arguments.
    x: float[S, D] tokens.
    w1: float[E, D, F] first expert weights.
    w2: float[E, F, D] second expert weights.
  Returns:
    (out float[S, D], kept bool[S, E]).
  """
  plan = dispatch.plan(routing, capacity, strategy=strategy,
                       max_fanout=max_fanout, block_size=block_size)
  h = jax.nn.relu(plan.matmul(plan.dispatch(x), w1))
  return plan.combine(plan.matmul(h, w2)), plan.kept


def make_case(seed=0, s=24, e=4, d=6, f=5, k=2):
  """A top-k routing of S tokens to E experts and the MLP inputs.

  The random draws stay eager: each shape's sampler compiles once per session
  (a jitted sampler is slow to compile on CPU and would compile again in
  every program that inlines it).

  Returns:
    (routing with gates float32[S, E], x float32[S, D], w1 float32[E, D, F],
    w2 float32[E, F, D]).
  """
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  logits = jax.random.normal(keys[0], (s, e)) * 2
  x = jax.random.normal(keys[1], (s, d))
  w1 = jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d)
  w2 = jax.random.normal(keys[3], (e, f, d)) / np.sqrt(f)
  return jit_top_k(logits, k).routing, x, w1, w2


def test_capacity_formula():
  assert dispatch.capacity(4096, 2, 8, 1.25) == 1280
  assert dispatch.capacity(100, 2, 8, 1.0) == 28  # ceil(25) -> multiple of 4
  assert dispatch.capacity(3, 1, 64, 1.0) == 4
  with pytest.raises(ValueError, match="capacity_factor"):
    dispatch.capacity(10, 2, 8, 0.0)


@pytest.mark.parametrize("strategy", ["einsum", "index"])
@pytest.mark.parametrize("capacity", [3, 8, 24, 40])
def test_slot_strategies_match_loop(strategy, capacity):
  routing, x, w1, w2 = make_case()
  out, kept = run_plan(routing, capacity, strategy, x, w1, w2)
  want_kept = reference_kept(routing.gates, routing.priority, capacity)
  np.testing.assert_array_equal(np.asarray(kept), want_kept)
  want = reference_moe(np.asarray(x), np.asarray(routing.gates), want_kept,
                       np.asarray(w1), np.asarray(w2))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_dropless_keeps_everything():
  routing, x, w1, w2 = make_case(seed=1)
  out, kept = run_plan(routing, 1, "dropless", x, w1, w2, max_fanout=2)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(routing.routed))
  want = reference_moe(np.asarray(x), np.asarray(routing.gates),
                       np.asarray(routing.routed), np.asarray(w1), np.asarray(w2))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_hand_checked_over_capacity():
  # 4 tokens, 2 experts, top-2: all tokens route to both experts.
  # Expert 0 is the first choice of tokens 0, 2; expert 1 of tokens 1, 3.
  gates = jnp.array([[.6, .4], [.3, .7], [.9, .1], [.2, .8]])
  priority = jnp.array([[2., 1.], [1., 2.], [2., 1.], [1., 2.]])
  routing = Routing(gates, priority)
  for strategy in ("einsum", "index"):
    plan = jit_plan(routing, 3, strategy=strategy)
    # Capacity 3: first choices (0, 2 | 1, 3) then the earliest second choice.
    np.testing.assert_array_equal(
        np.asarray(plan.kept),
        [[True, True], [True, True], [True, False], [False, True]])


def test_priority_ties_go_to_lower_index():
  gates = jnp.ones((5, 1))
  routing = Routing(gates, jnp.zeros((5, 1)))
  plan = jit_plan(routing, 2, strategy="index")
  np.testing.assert_array_equal(np.asarray(plan.kept[:, 0]),
                                [True, True, False, False, False])
  # Higher priority wins over index.
  routing = Routing(gates, jnp.array([[0.], [0.], [0.], [5.], [0.]]))
  plan = jit_plan(routing, 2, strategy="index")
  np.testing.assert_array_equal(np.asarray(plan.kept[:, 0]),
                                [True, False, False, True, False])


def test_unrouted_tokens_never_kept_and_empty_slots_zero():
  gates = jnp.array([[1., 0.], [0., 0.], [0., 1.]])
  routing = Routing(gates, gates)

  @jax.jit
  def run(routing, x):
    plan = dispatch.plan(routing, 4, strategy="index")
    h = plan.dispatch(x)
    return plan.kept, h, plan.combine(h)

  kept, h, out = run(routing, jnp.arange(6.).reshape(3, 2) + 1)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(gates) != 0)
  chex.assert_shape(h, (2, 4, 2))
  np.testing.assert_array_equal(np.asarray(h[0, 1:]), 0)
  np.testing.assert_allclose(np.asarray(out), [[1, 2], [0, 0], [5, 6]])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradients_match_reference(strategy):
  _, x, w1, w2 = make_case(seed=2, s=16)
  logits = jax.random.normal(jax.random.PRNGKey(5), (16, 4))

  def loss(logits, x, w1, w2, strategy):
    routing = top_k(logits, 2).routing
    out, _ = run_plan(routing, 16, strategy, x, w1, w2, max_fanout=2)
    return jnp.sum(out * jnp.cos(out))

  def ref_loss(logits, x, w1, w2):
    gates = top_k(logits, 2).routing.gates
    h = jax.nn.relu(jnp.einsum("sd,edf->esf", x, w1))
    y = jnp.einsum("esf,efd->esd", h, w2)
    out = jnp.einsum("se,esd->sd", gates, y)
    return jnp.sum(out * jnp.cos(out))

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(
      logits, x, w1, w2, strategy)
  want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3)))(logits, x, w1, w2)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4,
                               atol=2e-5)


def test_strategies_agree_when_nothing_drops_expert_choice():
  logits = jax.random.normal(jax.random.PRNGKey(3), (32, 8))
  routing = jax.jit(expert_choice, static_argnums=1)(logits, 8).routing
  _, x, w1, w2 = make_case(seed=3, s=32, e=8)
  outs = [run_plan(routing, 8, s, x, w1, w2)[0] for s in STRATEGIES]
  for o in outs[1:]:
    np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), rtol=1e-5,
                               atol=1e-5)


def test_jit_static_shapes_and_no_retrace():
  routing, x, w1, w2 = make_case()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(gates, priority, x):
    return run_plan(Routing(gates, priority), 8, "index", x, w1, w2)[0]

  for seed in range(3):
    r, xx, _, _ = make_case(seed=seed)
    f(r.gates, r.priority, xx)


def test_bad_arguments():
  routing, *_ = make_case()
  with pytest.raises(ValueError, match="capacity=0"):
    dispatch.plan(routing, 0)
  with pytest.raises(ValueError, match="strategy='bogus'"):
    dispatch.plan(routing, 4, strategy="bogus")
  with pytest.raises(ValueError, match="max_fanout=9"):
    dispatch.plan(routing, 4, strategy="dropless", max_fanout=9)
