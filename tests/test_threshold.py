"""Expert Threshold routing: exact cutoffs, load bounds, EMA, causality, resume."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import control, routing
from moejax.routing import ExpertThreshold, build, threshold
from moejax.models import LMConfig, TransformerLM
from moejax.models.lm import init_variables
from moejax.nn import MoEConfig
from moejax.train.step import router_outputs


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def ref_top(scores, m):
  """bool[N, E]: each expert's m_e highest scores, ties to the lower index."""
  n, e = scores.shape
  m = np.broadcast_to(np.asarray(m), (e,))
  out = np.zeros((n, e), bool)
  for j in range(e):
    order = np.argsort(-scores[:, j], kind="stable")
    out[order[:max(int(m[j]), 0)], j] = True
  return out


def ref_train(logits, thresholds, k, bound, warm):
  low, high = threshold.load_bounds(k, bound)
  n_pass = (logits > thresholds[None, :]).sum(0)
  m = np.full_like(n_pass, k) if warm else np.clip(n_pass, low, high)
  return ref_top(logits, m)


def tied_scores(rng, n, e):
  """Scores with many ties, negatives, +0.0 and -0.0."""
  x = rng.integers(-3, 4, size=(n, e)).astype(np.float32) / 2
  x[rng.random((n, e)) < 0.1] = -0.0
  return x


def test_expert_threshold_gates_and_priority():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(20, 6)).astype(np.float32)
  thr = rng.normal(size=6).astype(np.float32)
  out = jax.jit(routing.expert_threshold)(jnp.asarray(logits), jnp.asarray(thr))
  want = np.where(logits > thr, sigmoid(logits), 0.0)
  np.testing.assert_allclose(np.asarray(out.routing.gates), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.routing.priority), sigmoid(logits),
                             rtol=1e-6)
  np.testing.assert_allclose(float(out.metrics["experts_per_token"]),
                             (logits > thr).sum(1).mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="thresholds"):
    routing.expert_threshold(jnp.asarray(logits), jnp.zeros(5))
  with pytest.raises(ValueError, match="shape"):
    routing.expert_threshold(jnp.zeros((2, 3, 6)), jnp.zeros(6))


@pytest.mark.parametrize("seed", [0, 1])
def test_cutoffs_and_top_per_expert_are_exact_with_ties(seed):
  rng = np.random.default_rng(seed)
  x = tied_scores(rng, 50, 5)
  x[:, 4] = rng.normal(size=50) * 1e-30  # tiny magnitudes near zero
  cut = jax.jit(threshold.expert_cutoffs)
  top = jax.jit(threshold.top_per_expert)
  for k in [1, 2, 7, 25, 50]:
    want = -np.sort(-x, axis=0)[k - 1]
    np.testing.assert_array_equal(np.asarray(cut(x, k)), want)
  m = np.array([0, 1, 13, 49, 50], np.int32)
  np.testing.assert_array_equal(np.asarray(top(x, m)), ref_top(x, m))
  chosen = np.asarray(top(x, jnp.full(5, 17)))
  np.testing.assert_array_equal(chosen.sum(0), 17)
  with pytest.raises(ValueError, match="k=0"):
    threshold.expert_cutoffs(jnp.asarray(x), 0)


def test_load_bounds():
  assert threshold.load_bounds(512, 0.5) == (256, 768)
  assert threshold.load_bounds(5, 0.5) == (3, 7)
  assert threshold.load_bounds(5, 0.0) == (5, 5)
  assert threshold.pool_tokens_per_expert(2048, 2, 8) == 512
  assert threshold.pool_tokens_per_expert(10, 1, 3) == 4
  with pytest.raises(ValueError, match="capacity_bound"):
    threshold.load_bounds(5, 1.5)


@pytest.mark.parametrize("shift", [-10.0, 10.0, 0.0, 0.4])
def test_training_bounds_hold_exactly(shift):
  rng = np.random.default_rng(1)
  n, e, k, bound = 64, 4, 16, 0.5
  logits = rng.normal(size=(n, e)).astype(np.float32)
  logits[:, 0] += 1.5  # a popular expert
  logits[::5, 2] = 0.25  # ties
  thr = np.full(e, shift, np.float32) + rng.normal(size=e).astype(np.float32)
  fn = jax.jit(threshold.expert_threshold_train, static_argnums=(2,),
               static_argnames=("capacity_bound",))
  out = fn(logits, thr, k, capacity_bound=bound)
  chosen = np.asarray(out.routing.routed)
  low, high = threshold.load_bounds(k, bound)
  counts = chosen.sum(0)
  assert np.all((counts >= low) & (counts <= high)), counts
  np.testing.assert_array_equal(chosen, ref_train(logits, thr, k, bound, False))
  n_pass = (logits > thr).sum(0)
  np.testing.assert_allclose(float(out.metrics["et_bound_low"]),
                             np.mean(n_pass < low))
  np.testing.assert_allclose(float(out.metrics["et_bound_high"]),
                             np.mean(n_pass > high))
  within = (n_pass >= low) & (n_pass <= high)  # there: plain thresholding
  np.testing.assert_array_equal(chosen[:, within], (logits > thr)[:, within])
  gates = np.asarray(out.routing.gates)
  np.testing.assert_allclose(gates, np.where(chosen, sigmoid(logits), 0),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.metrics["et_cutoff"]),
                                -np.sort(-logits, axis=0)[k - 1])


def test_warmup_is_expert_choice_over_the_pool():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(40, 5)).astype(np.float32)
  out = jax.jit(lambda lg, thr: threshold.expert_threshold_train(
      lg, thr, 8, expert_choice=True))(jnp.asarray(logits), jnp.full(5, 99.0))
  chosen = np.asarray(out.routing.routed)
  np.testing.assert_array_equal(chosen.sum(0), 8)
  np.testing.assert_array_equal(chosen, ref_top(logits, 8))


@pytest.mark.parametrize("beta", [0.999, 0.9, 0.0])
def test_threshold_ema_matches_closed_form(beta):
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(40, 3)).astype(np.float64) + 2.0
  ctrl = control.ThresholdEMA(beta=beta)
  state = ctrl.init(3)
  np.testing.assert_array_equal(np.asarray(ctrl.value(state)), 0.0)
  update = jax.jit(ctrl.update)
  for t in range(1, len(xs) + 1):
    state = update(state, xs[t - 1].astype(np.float32))
    w = (1 - beta) * beta ** (t - np.arange(1, t + 1))  # weights of x_1..x_t
    closed = (w[:, None] * xs[:t]).sum(0) / (1 - beta ** t)
    np.testing.assert_allclose(np.asarray(ctrl.value(state)), closed,
                               rtol=2e-5, atol=2e-6)
  assert int(state["count"]) == len(xs)
  # A constant sequence is tracked exactly from the first step (no 0 bias).
  s = ctrl.init(2)
  for _ in range(3):
    s = ctrl.update(s, jnp.array([1.5, -2.0]))
  np.testing.assert_allclose(np.asarray(ctrl.value(s)), [1.5, -2.0], rtol=1e-5)
  with pytest.raises(ValueError, match="beta"):
    control.ThresholdEMA(beta=1.0)


def test_method_validation_and_build():
  m = build("expert_threshold", {"k": 1, "et_warmup_steps": 5, "et_beta": 0.99,
                                 "et_capacity_bound": 0.25, "p": 0.3})
  assert (m.k, m.et_warmup_steps, m.et_beta, m.et_capacity_bound) == (
      1, 5, 0.99, 0.25)
  assert m.default_num_shared == 1 and m.aux_weights["load_balance"] == 0
  for field, bad in [("et_warmup_steps", -1), ("et_beta", 1.0),
                     ("et_capacity_bound", 1.5), ("k", 0)]:
    with pytest.raises(ValueError, match=field):
      ExpertThreshold(**{field: bad})


def test_method_pools_all_groups_and_updates_the_ema():
  rng = np.random.default_rng(4)
  g, s, e = 4, 16, 4
  logits = jnp.asarray(rng.normal(size=(g, s, e)).astype(np.float32))
  method = ExpertThreshold(k=1, et_warmup_steps=0)
  state = method.init_state(e)
  # Step 0: the EMA is empty -> expert choice over the whole pool of 64 tokens.
  route = jax.jit(lambda l, st: method.route_groups(l, st, rng=None,
                                                    train=True))
  out = route(logits, state)
  routed = np.asarray(out.routing.routed)
  assert routed.shape == (g, s, e)
  np.testing.assert_array_equal(routed.sum((0, 1)), 16)
  np.testing.assert_array_equal(
      routed.reshape(-1, e), ref_top(np.asarray(logits).reshape(-1, e), 16))
  cutoff = np.asarray(out.metrics["et_cutoff"])[0]
  new = jax.jit(lambda st, c: method.update(
      {("l",): st}, {("l",): {"et_cutoff": c}}, 0))(state, cutoff)
  np.testing.assert_allclose(
      np.asarray(jax.jit(method.thresholds)(new[("l",)])), cutoff, rtol=1e-5)
  # Step 1: thresholds route; bounds hold over the pool, not per group.
  out = route(logits + 0.3, new[("l",)])
  counts = np.asarray(out.routing.routed).sum((0, 1))
  low, high = threshold.load_bounds(16, 0.5)
  assert np.all((counts >= low) & (counts <= high))
  np.testing.assert_array_equal(
      np.asarray(out.routing.routed).reshape(-1, e),
      ref_train(np.asarray(logits + 0.3).reshape(-1, e), cutoff, 16, 0.5, False))
  assert float(out.metrics["et_expert_choice"][0]) == 0.0
  sm = jax.jit(method.state_metrics)(new)
  assert float(sm["et_warmup"]) == 0.0


def test_inference_routing_is_causal():
  """A token's ET routing never changes when any other token changes."""
  rng = np.random.default_rng(5)
  g, s, e = 3, 12, 6
  method = ExpertThreshold(k=2, et_warmup_steps=0)
  state = {"ema": jnp.asarray(rng.normal(size=e).astype(np.float32)),
           "count": jnp.asarray(7, jnp.int32)}
  route = jax.jit(lambda l, tr: method.route_groups(l, state, rng=None,
                                                    train=tr),
                  static_argnums=1)
  logits = rng.normal(size=(g, s, e)).astype(np.float32)
  base = route(logits, False).routing
  train_changed = False
  for trial in range(5):
    gi, si = rng.integers(g), rng.integers(s)
    other = rng.normal(size=(g, s, e)).astype(np.float32) * 3
    other[gi, si] = logits[gi, si]
    out = route(other, False).routing
    np.testing.assert_array_equal(np.asarray(out.gates)[gi, si],
                                  np.asarray(base.gates)[gi, si])
    # Training routing (bounded over the pool) is not causal: it can change.
    a = np.asarray(route(logits, True).routing.routed)[gi, si]
    b = np.asarray(route(other, True).routing.routed)[gi, si]
    train_changed |= bool(np.any(a != b))
  assert train_changed


def tiny_lm(router, num_shared=1, eval_capacity_factor=4.0):
  moe = MoEConfig(num_experts=4, expert_width=16, router=router,
                  num_shared=num_shared, eval_capacity_factor=eval_capacity_factor)
  return LMConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=16,
                  moe=moe)


@pytest.mark.parametrize("eval_capacity_factor", [4.0, 0.25])
def test_model_evaluation_is_causal(eval_capacity_factor):
  """Outputs and fanout at position t ignore later tokens and other rows,
  whatever the evaluation capacity factor (ET evaluates with a slot per token)."""
  cfg = tiny_lm(ExpertThreshold(k=2, et_warmup_steps=0),
                eval_capacity_factor=eval_capacity_factor)
  model = TransformerLM(cfg)
  rng = np.random.default_rng(6)
  tokens = rng.integers(0, 256, size=(3, 16)).astype(np.int32)
  params, router_state = init_variables(model, jax.random.PRNGKey(0),
                                        jnp.asarray(tokens))
  # Non-trivial frozen thresholds in every layer.
  router_state = jax.tree.map(
      lambda v: (jnp.full_like(v, 5) if v.dtype == jnp.int32 else
                 jnp.asarray(rng.normal(size=v.shape) * 0.05, v.dtype)),
      router_state)
  apply = jax.jit(lambda t: model.apply(
      {"params": params, "router_state": router_state}, t,
      train=False, mutable=["router"]))

  def fanouts(coll):
    return np.stack([np.asarray(v["fanout"]) for v in
                     router_outputs(coll["router"]).values()])

  logits, coll = apply(tokens)
  assert 0 < fanouts(coll).mean() < 4
  t = 6
  changed = tokens.copy()
  changed[0, t + 1:] = rng.integers(0, 256, size=16 - t - 1)
  changed[1:] = rng.integers(0, 256, size=(2, 16))
  logits2, coll2 = apply(changed)
  np.testing.assert_allclose(np.asarray(logits2[0, :t + 1]),
                             np.asarray(logits[0, :t + 1]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(fanouts(coll2)[:, 0, :t + 1],
                                fanouts(coll)[:, 0, :t + 1])


def test_train_resume_keeps_controller_state(train_and_resume):
  ref, summary = train_and_resume(dataclasses.replace(
      tiny_lm(ExpertThreshold(k=1, et_warmup_steps=2)), num_layers=1))
  rs = ref.router_state
  counts = [int(v) for v in jax.tree.leaves(
      jax.tree.map(lambda x: x if x.dtype == jnp.int32 else None, rs))]
  assert counts and all(c == 4 for c in counts)
  assert all(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(rs)
             if v.dtype == jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, summary["state"].router_state, rs)
  jax.tree.map(np.testing.assert_array_equal, summary["state"].params,
               ref.params)


def test_cli_defaults_to_one_shared_expert():
  from moejax.cli.lm_flags import build_train_config
  values = {"config": "tiny", "router": "expert_threshold", "et_warmup_steps": 7,
            "et_beta": 0.99, "num_shared": None}
  cfg = build_train_config(values)
  assert cfg.model.moe.num_shared == 1
  assert cfg.model.moe.router.et_warmup_steps == 7
  assert cfg.model.moe.router.et_beta == 0.99
  values.update(num_shared=0)
  assert build_train_config(values).model.moe.num_shared == 0
  values.update(router="top_k", num_shared=None)
  assert build_train_config(values).model.moe.num_shared == 0
  cfg = dataclasses.replace(cfg)  # frozen configs stay hashable/copyable
