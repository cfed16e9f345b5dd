"""A non-finite or extreme value stays its own token's problem.

Router, layer and dispatch calls run under jit (one compile each instead of
one per primitive); exact comparisons with eager references stay eager.

Axis legend:
  S  tokens in one group
  E  experts
  D  model width
"""
import functools

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


# Expert choice and ET's warm-up: a non-finite token never takes a slot.

@pytest.mark.parametrize("bad", [NAN, -NAN, INF])
def test_expert_choice_nonfinite_token_routed_nowhere(bad):
  from moejax.routing.choice import expert_choice
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  route = jax.jit(expert_choice, static_argnums=1)
  out_clean = route(logits.at[2].set(-30.0), 1)
  out = route(logits.at[2, 1].set(bad), 1)
  gates = np.asarray(out.routing.gates)
  assert np.all(np.isfinite(gates)) and np.all(gates[2] == 0)
  assert gates.astype(bool).sum() == 3  # every expert still takes a token
  np.testing.assert_array_equal(gates.astype(bool),
                                np.asarray(out_clean.routing.gates) > 0)
  for v in list(out.aux.values()) + list(out.metrics.values()):
    assert np.all(np.isfinite(np.asarray(v)))


@pytest.mark.parametrize("bad", [NAN, -NAN, INF])
def test_expert_threshold_nonfinite_token(bad):
  from moejax.routing.threshold import (expert_threshold,
                                        expert_threshold_train)
  logits = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  bad_logits = logits.at[3, 2].set(bad)
  # One program for both ec (a traced bool to the router).
  route_train = jax.jit(expert_threshold_train, static_argnums=2)
  for ec in (True, False):
    out = route_train(bad_logits, jnp.zeros(4), 1, expert_choice=ec)
    gates = np.asarray(out.routing.gates)
    assert np.all(np.isfinite(gates)) and np.all(gates[3] == 0)
    assert np.all(np.isfinite(np.asarray(out.metrics["et_cutoff"])))
    for v in list(out.aux.values()) + list(out.metrics.values()):
      assert np.all(np.isfinite(np.asarray(v)))
  out = jax.jit(expert_threshold)(bad_logits, jnp.full(4, -10.0))
  gates = np.asarray(out.routing.gates)
  assert np.all(gates[3] == 0) and np.all(gates[np.arange(8) != 3] > 0)
  grad = jax.jit(jax.grad(lambda l: expert_threshold(l, jnp.zeros(4))
                          .routing.gates.sum()))(bad_logits)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_aux_losses_and_metrics_over_finite_tokens():
  from moejax.routing import losses
  from moejax.routing.topk import top_k
  logits = jax.random.normal(jax.random.PRNGKey(2), (8, 4))
  route = jax.jit(top_k, static_argnums=1)
  clean = route(logits[1:], 2)
  out = route(logits.at[0, 1].set(NAN), 2)
  for key in ("load_balance", "z_loss", "entropy"):
    np.testing.assert_allclose(out.aux[key], clean.aux[key], rtol=1e-6)
  for key in ("experts_per_token", "expert_load", "router_entropy",
              "mean_logsumexp"):
    np.testing.assert_allclose(out.metrics[key], clean.metrics[key], rtol=1e-6)
  big = jnp.full((2, 4), 1e20)
  value, grad = jax.jit(jax.value_and_grad(losses.z_loss))(big)
  assert np.isfinite(float(value))
  assert float(grad[0, 0]) > 0
  np.testing.assert_allclose(float(losses.z_loss(logits)), float(jnp.mean(
      jax.nn.logsumexp(logits, axis=-1) ** 2)), rtol=1e-7)


def test_loss_free_sigmoid_gates_normalised_for_very_negative_logits():
  from moejax.routing.lossfree import biased_top_k
  logits = jnp.array([[-80.0, -90.0, -100.0], [1.0, -2.0, 0.5]])
  route = functools.partial(biased_top_k, k=2, score_fn="sigmoid")
  out = jax.jit(route)(logits)
  np.testing.assert_allclose(np.asarray(out.routing.gates).sum(-1), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(out.routing.gates[0, :2],
                             jax.nn.softmax(jnp.array([-80.0, -90.0])),
                             rtol=1e-5)
  s = jax.nn.sigmoid(logits[1])
  np.testing.assert_allclose(np.asarray(out.routing.gates)[1, [0, 2]],
                             np.asarray(s)[[0, 2]] / float(s[0] + s[2]), rtol=1e-6)
  grad = jax.jit(jax.grad(lambda l: jnp.sum(
      route(l).routing.gates * jnp.arange(3.0))))(logits)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_dtop_p_masked_expert_and_outlier():
  from moejax.routing.dtopp import dtop_p, standardize
  logits = jnp.array([[1.0, 0.5, -0.3, 2.0]])
  out = jax.jit(functools.partial(dtop_p, p=0.9))(logits.at[0, 2].set(-INF))
  gates = np.asarray(out.routing.gates)
  assert np.all(np.isfinite(gates)) and gates[0, 2] == 0
  np.testing.assert_allclose(gates.sum(), 1.0, rtol=1e-6)
  jit_standardize = jax.jit(standardize)
  np.testing.assert_allclose(
      np.asarray(jit_standardize(logits.at[0, 2].set(-INF)))[0, [0, 1, 3]],
      jit_standardize(logits[:, jnp.array([0, 1, 3])])[0], rtol=1e-6)
  z = np.asarray(jit_standardize(logits.at[0, 2].set(-1e30)))[0]
  assert z[3] > z[0] > z[1] > z[2]  # ranking of the others kept
  np.testing.assert_array_equal(  # ordinary logits: unchanged (eager, exact)
      standardize(logits), (logits - logits.mean()) * jax.lax.rsqrt(
          logits.var() + 1e-6))


# Expert Threshold: causal at evaluation whatever the evaluation capacity.

def test_expert_threshold_eval_never_drops_by_later_tokens():
  import flax.linen as nn
  from moejax.nn import MoE, MoEConfig
  from moejax.routing import ExpertThreshold
  from moejax.train.step import router_outputs
  cfg = MoEConfig(num_experts=4, expert_width=8, eval_capacity_factor=1.0,
                  router=ExpertThreshold(k=1, et_warmup_steps=0), num_shared=0)
  layer = MoE(cfg, d_model=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 8))
  params = jax.jit(lambda x: layer.init({"params": jax.random.PRNGKey(1)}, x,
                                        train=False)["params"])(x)
  state = {"state": {"ema": jnp.full((4,), -10.0),
                     "count": jnp.asarray(5, jnp.int32)}}
  apply = jax.jit(lambda x: layer.apply(
      {"params": nn.meta.unbox(params), "router_state": state},
      x, train=False, mutable=["router"]))
  y, coll = apply(x)
  (metrics,) = [v["metrics"] for v in router_outputs(coll["router"]).values()]
  assert float(metrics["drop_fraction"]) == 0.0  # every token at every expert
  assert float(metrics["nonfinite_tokens"]) == 0.0
  t = 5
  x2 = x.at[:, t + 1:].set(10 * jax.random.normal(jax.random.PRNGKey(2),
                                                  (1, 16 - t - 1, 8)))
  y2, _ = apply(x2)
  np.testing.assert_array_equal(np.asarray(y2[:, :t + 1]),
                                np.asarray(y[:, :t + 1]))
  y3, coll3 = apply(x.at[0, t + 2, 0].set(NAN))
  mask = np.arange(16) != t + 2
  np.testing.assert_allclose(np.asarray(y3[0, mask]), np.asarray(y[0, mask]),
                             rtol=1e-6, atol=1e-6)
  (m3,) = [v["metrics"] for v in router_outputs(coll3["router"]).values()]
  assert float(m3["nonfinite_tokens"]) == 1.0
  for v in jax.tree.leaves(m3):
    assert np.all(np.isfinite(np.asarray(v)))


# Dispatch: every strategy keeps a bad value to its own token.

STRATEGIES = ("einsum", "index", "gather", "sorted", "ragged")


def _dispatch_case(s=12, e=4, d=6, f=5):
  from moejax.routing.topk import top_k
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  x = jax.random.normal(keys[0], (s, d))
  routing = jax.jit(top_k, static_argnums=1)(
      jax.random.normal(keys[1], (s, e)), 2).routing
  weights = {"w_in": jax.random.normal(keys[2], (e, d, f)) * 0.3,
             "w_gate": jax.random.normal(keys[3], (e, d, f)) * 0.3,
             "w_out": jax.random.normal(keys[4], (e, f, d)) * 0.3}
  return x, routing, weights


@functools.partial(jax.jit, static_argnames=("strategy", "capacity"))
def _run(strategy, x, gates, priority, weights, capacity):
  """The expert FFN through one plan.

  Args:
    strategy, capacity: static `dispatch.plan` arguments.
    x: float32[S, D] tokens.
    gates, priority: float32[S, E] routing.
    weights: the expert FFN weights (`_dispatch_case`).
  Returns:
    (y float32[S, D], kept bool[S, E]).
  """
  from moejax import dispatch, experts
  from moejax.routing import Routing
  plan = dispatch.plan(Routing(gates=gates, priority=priority), capacity,
                       strategy=strategy)
  return experts.ffn(plan, x, weights), plan.kept


@functools.partial(jax.jit, static_argnames="strategy")
def _others_loss_and_grad(strategy, x, gates, priority, weights, others):
  """((loss, y), dloss/dx) of the capacity-12 FFN, loss = sum of y**2 over
  the tokens `others` (bool[S])."""

  def loss(x):
    y, _ = _run(strategy, x, gates, priority, weights, 12)
    return jnp.sum(jnp.where(others[:, None], y, 0.0) ** 2), y
  return jax.value_and_grad(loss, has_aux=True)(x)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("where", ["x", "gate", "priority"])
def test_dispatch_bad_value_stays_in_its_token(strategy, where):
  x, routing, weights = _dispatch_case()
  bad = 3
  others = np.arange(x.shape[0]) != bad
  gates, priority = routing.gates, routing.priority
  expert = int(np.argmax(np.asarray(gates[bad])))
  if where == "x":
    x_bad, g_bad, p_bad = x.at[bad, 1].set(NAN), gates, priority
  elif where == "gate":
    x_bad, g_bad, p_bad = x, gates.at[bad, expert].set(NAN), priority
  else:
    x_bad, g_bad, p_bad = x, gates, priority.at[bad].set(NAN)

  (_, y0), dx0 = _others_loss_and_grad(strategy, x, gates, priority, weights,
                                       others)
  (_, y1), dx1 = _others_loss_and_grad(strategy, x_bad, g_bad, p_bad, weights,
                                       others)
  np.testing.assert_allclose(np.asarray(y1)[others], np.asarray(y0)[others],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dx1)[others], np.asarray(dx0)[others],
                             rtol=1e-5, atol=1e-6)
  if where == "gate":  # a NaN gate is not routed: the token keeps the other
    _, kept = _run(strategy, x, g_bad, p_bad, weights, 12)
    assert not bool(kept[bad, expert]) and int(kept[bad].sum()) == 1


def test_dispatch_strategies_agree_on_kept_with_bad_priority():
  x, routing, weights = _dispatch_case()
  gates = routing.gates
  priority = routing.priority.at[0].set(NAN).at[1].set(INF)
  priority = priority.at[2].set(-NAN)
  kept = {}
  for strategy in ("einsum", "index", "gather"):
    _, kept[strategy] = _run(strategy, x, gates, priority, weights, 4)
  for strategy in ("index", "gather"):
    np.testing.assert_array_equal(np.asarray(kept[strategy]),
                                  np.asarray(kept["einsum"]))
  routed = np.asarray(gates != 0).sum(0)
  np.testing.assert_array_equal(np.asarray(kept["gather"]).sum(0),
                                np.minimum(routed, 4))
  bad_gates = gates.at[5].set(NAN)
  masks = [np.asarray(_run(s, x, bad_gates, priority, weights, 12)[1])
           for s in STRATEGIES]
  for m in masks[1:]:
    np.testing.assert_array_equal(m, masks[0])


# Every registered method: a NaN / +inf token is routed nowhere, takes no slot,
# stays out of aux losses and metrics, and its own row of the logits' gradient
# is finite (one bad token costs one token, not the step).

def _method_cases():
  from moejax import routing
  cases = []
  for name in routing.available():
    cases.append((name, {}))
  cases.append(("loss_free", {"score_fn": "sigmoid"}))
  cases.append(("top_k", {"score_fn": "sigmoid"}))
  return cases


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name,options", _method_cases(),
                         ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_router_nonfinite_token_routed_nowhere_finite_grad(
    name, options, train):
  from moejax import routing
  method = routing.build(name, {"k": 2, **options})
  num_experts, bad_row = 4, 2
  state = {**method.init_state(num_experts),
           **method.router_params(num_experts)}
  if name == "expert_threshold":
    state = {"ema": jnp.full((num_experts,), -0.5),
             "count": jnp.asarray(1000, jnp.int32)}
  logits = jax.random.normal(jax.random.PRNGKey(4), (1, 8, num_experts))
  rng = jax.random.PRNGKey(5) if method.uses_rng else None

  def route(logits):
    return method.route_groups(logits, state, rng=rng, train=train)

  def objective(logits):
    out = route(logits)
    w = jnp.arange(1.0, num_experts + 1.0)
    return (jnp.sum(out.routing.gates * w)
            + sum(jnp.sum(v) for v in out.aux.values()))

  run = jax.jit(lambda l: (route(l), jax.grad(objective)(l)))
  for bad in (NAN, INF):
    out, grad = run(logits.at[0, bad_row, 1].set(bad))
    gates = np.asarray(out.routing.gates)[0]
    assert np.all(np.isfinite(gates)), (bad, gates)
    assert np.all(gates[bad_row] == 0), (bad, gates[bad_row])
    assert np.all(np.isfinite(np.asarray(grad))), (bad, grad)
    for key, v in list(out.aux.items()) + list(out.metrics.items()):
      assert np.all(np.isfinite(np.asarray(v))), (bad, key, v)


def test_dtop_p_inf_token_takes_no_slot():
  from moejax import dispatch
  from moejax.routing.dtopp import dtop_p, standardize
  logits = jnp.array([[INF, 0.0], [3.0, 0.0], [2.0, 0.0]])
  out = jax.jit(functools.partial(dtop_p, p=0.5))(logits)
  gates = np.asarray(out.routing.gates)
  assert np.all(gates[0] == 0) and gates[1, 0] > 0 and gates[2, 0] > 0
  kept = dispatch.plan(out.routing, 1, strategy="index").kept
  assert bool(kept[1, 0]) and not bool(kept[0].any())
  assert np.all(np.isnan(np.asarray(standardize(logits))[0]))


def test_biased_top_k_sigmoid_nonfinite_token():
  from moejax.routing.lossfree import biased_top_k
  for bad in (NAN, INF):
    out = biased_top_k(jnp.array([[0.5, bad, -0.3, 1.0], [0.5, 0.2, -0.3, 1.0]]),
                       2, score_fn="sigmoid")
    gates = np.asarray(out.routing.gates)
    assert np.all(gates[0] == 0) and np.count_nonzero(gates[1]) == 2


@pytest.mark.parametrize("router", ["exact_k", "dynamic_k"])
def test_probmoe_metrics_over_finite_tokens(router):
  from moejax import routing
  method = routing.build(router, {"k": 2})
  logits = jax.random.normal(jax.random.PRNGKey(6), (1, 6, 4))
  route = jax.jit(lambda l: method.route_groups(
      l, {}, rng=jax.random.PRNGKey(7), train=True).metrics)
  metrics = route(logits.at[0, 0, 2].set(NAN))
  keys = ["marginal_max"] + (["expected_k"] if router == "dynamic_k" else [])
  from moejax.routing import probmoe
  m = (probmoe.exact_k_marginals(logits[0, 1:], 2) if router == "exact_k"
       else probmoe.dynamic_k_marginals(logits[0, 1:], method.k_min,
                                        method.k_max))
  want = {"marginal_max": float(jnp.mean(m.max(-1))),
          "expected_k": float(jnp.mean(m.sum(-1)))}
  for key in keys:
    np.testing.assert_allclose(float(metrics[key][0]), want[key], rtol=1e-5)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_mod_top_c_skips_nonfinite_token(bad):
  from moejax.nn.mod import top_c_mask
  mask = np.asarray(jax.jit(top_c_mask, static_argnums=1)(
      jnp.array([[bad, 3.0, 2.0, 1.0]]), 2))
  np.testing.assert_array_equal(mask, [[False, True, True, False]])


def test_expert_cutoffs_nonfinite_scores():
  from moejax.routing.threshold import expert_cutoffs
  scores = jax.random.normal(jax.random.PRNGKey(8), (64, 4))
  bad = scores.at[3, 0].set(NAN).at[5, 1].set(INF).at[7, 2].set(-NAN)
  cut = np.asarray(jax.jit(expert_cutoffs, static_argnums=1)(bad, 8))
  want = np.asarray(expert_cutoffs(
      scores.at[3, 0].set(-INF).at[5, 1].set(-INF).at[7, 2].set(-INF), 8))
  assert np.all(np.isfinite(cut)), cut
  np.testing.assert_array_equal(cut, want)


@pytest.mark.parametrize("router", ["top_k", "dtop_p"])
def test_moe_layer_bad_token_costs_one_token(router):
  """A NaN in one token's input: the layer's metrics count the other tokens,
  and the gradient of the other tokens' outputs is finite for every param
  (the router kernel included), so the step need not be skipped."""
  import flax.linen as nn
  from moejax import routing
  from moejax.nn import MoE, MoEConfig
  from moejax.train.step import router_outputs
  cfg = MoEConfig(num_experts=4, expert_width=8, num_shared=0,
                  router=routing.build(router, {"k": 2}))
  layer = MoE(cfg, d_model=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8))
  variables = jax.jit(lambda x: layer.init(jax.random.PRNGKey(1), x,
                                           train=True))(x)
  params = nn.meta.unbox(variables["params"])
  others = np.arange(8) != 3

  @jax.jit
  def run(params, x):
    def loss(params):
      y, coll = layer.apply({**variables, "params": params}, x, train=True,
                            mutable=["router"])
      (m,) = [v["metrics"] for v in router_outputs(coll["router"]).values()]
      return jnp.sum(jnp.where(others[None, :, None], y, 0.0) ** 2), m
    return jax.grad(loss, has_aux=True)(params)

  grads, metrics = run(params, x.at[0, 3, 2].set(NAN))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path
  assert float(metrics["nonfinite_tokens"]) == 1.0
  _, clean = run(params, x)
  if router == "top_k":
    assert float(metrics["experts_per_token"]) == 2.0
  for key in ("experts_per_token", "fanout_std", "zero_expert_fraction"):
    assert np.isfinite(float(metrics[key])), key


@pytest.mark.parametrize("score", ["raw", "sigmoid"])
def test_mod_block_nonfinite_token(score):
  """A NaN token skips a MoD block (the top-C go to clean tokens); the BCE
  losses and metrics stay finite, and so do the gradients of the other
  tokens' outputs."""
  import flax.linen as nn
  from moejax.nn.mod import MoDBlock, MoDConfig
  from moejax.train.step import router_outputs
  block = MoDBlock(MoDConfig(capacity=0.5, score=score), 2, 16)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8))
  pos = jnp.arange(8)[None]
  params = nn.meta.unbox(jax.jit(lambda x: block.init(
      jax.random.PRNGKey(1), x, pos, train=True))(x)["params"])
  others = np.arange(8) != 2

  @jax.jit
  def run(params, x):
    def loss(params):
      (y, chosen), coll = block.apply({"params": params}, x, pos, train=True,
                                      mutable=["router"])
      (layer,) = router_outputs(coll["router"]).values()
      objective = jnp.sum(jnp.where(others[None, :, None], y, 0.0) ** 2)
      return objective + layer["aux_loss"], (chosen, layer)
    return jax.grad(loss, has_aux=True)(params)

  grads, (chosen, layer) = run(params, x.at[0, 2, 1].set(NAN))
  assert not bool(chosen[0, 2]) and int(chosen.sum()) == 4
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path
  for key, v in list(layer["aux"].items()) + list(layer["metrics"].items()):
    assert np.isfinite(float(v)), key


# Zero tokens: one clear ValueError naming what is empty.

@pytest.mark.parametrize("strategy", STRATEGIES + ("dropless",))
def test_plan_with_zero_tokens_is_a_clear_error(strategy):
  from moejax import dispatch
  from moejax.routing import Routing
  empty = Routing(gates=jnp.zeros((0, 4)), priority=jnp.zeros((0, 4)))
  with pytest.raises(ValueError, match=r"^routing has S=0 tokens; allowed: "
                     r"S >= 1"):
    dispatch.plan(empty, 4, strategy=strategy)


@pytest.mark.parametrize("name", ["top_k", "expert_choice", "expert_threshold",
                                  "dtop_p", "exact_k"])
def test_router_with_zero_tokens_is_a_clear_error(name):
  from moejax import routing
  method = routing.build(name, {"k": 2})
  state = {**method.init_state(4), **method.router_params(4)}
  with pytest.raises(ValueError, match=r"^logits have S=0 tokens; allowed: "
                     r"S >= 1"):
    method.route(jnp.zeros((0, 4)), state, rng=None, train=False)


def test_moe_layer_with_zero_length_is_a_clear_error():
  from moejax.nn import MoE, MoEConfig
  layer = MoE(MoEConfig(num_experts=4, expert_width=8), d_model=8)
  with pytest.raises(ValueError, match=r"^x has L=0 tokens per sequence; "
                     r"allowed: L >= 1"):
    layer.init(jax.random.PRNGKey(0), jnp.zeros((2, 0, 8)), train=False)


@pytest.mark.parametrize("name", ["expert_choice", "expert_threshold",
                                  "top_k"])
@pytest.mark.parametrize("factor", [0.0, -1.0, NAN])
def test_capacity_factor_checked_by_every_method(name, factor):
  from moejax import routing
  method = routing.build(name, {"k": 2})
  with pytest.raises(ValueError, match=r"^capacity_factor=.* is out of "
                     r"range; allowed: > 0"):
    method.capacity(16, 4, factor)
  with pytest.raises(ValueError, match=r"^num_tokens=0 is out of range; "
                     r"allowed: >= 1"):
    method.capacity(0, 4, 1.0)
