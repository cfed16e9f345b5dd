"""top_p / dtop_p routers and the TopP / DTopP methods against numpy references."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routing import DTopP, TopP
from moejax.nn.moe import MoE, MoEConfig, layer_metrics
from moejax.routing import dtop_p, top_p
from moejax.routing.dtopp import standardize


def reference_top_p(probs, p, max_k=None, normalize=False):
  """Loop reference: sort descending (ties: lower expert first), keep the
  shortest prefix whose cumulative sum reaches p. Returns gates and a mask of
  rows whose decision is not within 1e-5 of a boundary (float64 vs float32)."""
  probs = np.asarray(probs, np.float64)
  num_tokens, num_experts = probs.shape
  max_k = num_experts if max_k is None else max_k
  gates = np.zeros_like(probs)
  clear = np.ones(num_tokens, bool)
  for s in range(num_tokens):
    order = np.argsort(-probs[s], kind="stable")[:max_k]
    total = 0.0
    chosen = []
    for e in order:
      chosen.append(e)
      total += probs[s, e]
      if abs(total - p) < 1e-5:
        clear[s] = False
      if total >= p:
        break
    w = probs[s, chosen]
    gates[s, chosen] = w / w.sum() if normalize else w
  return gates, clear


def random_logits(seed, shape, ties=False):
  rng = np.random.default_rng(seed)
  if ties:  # few distinct values: many exactly tied probabilities
    return rng.integers(0, 3, size=shape).astype(np.float32)
  return (rng.normal(size=shape) * 1.5).astype(np.float32)


_jit_top_p = jax.jit(top_p, static_argnames=("max_k", "normalize"))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("max_k", [None, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_top_p_matches_reference(ties, max_k, normalize):
  for p in (0.05, 0.3, 0.55, 0.8, 0.97):
    logits = random_logits(int(p * 100) + 7 * ties, (96, 8), ties)
    out = _jit_top_p(jnp.asarray(logits), jnp.float32(p), max_k=max_k,
                     normalize=normalize)
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    ref, clear = reference_top_p(probs, p, max_k, normalize)
    assert clear.sum() > 48  # the test checks most rows
    gates = np.asarray(out.routing.gates)
    np.testing.assert_allclose(gates[clear], ref[clear], atol=1e-6)
    fanout = (gates != 0).sum(-1)
    assert fanout.min() >= 1
    assert fanout.max() <= (max_k or 8)
    np.testing.assert_allclose(out.metrics["experts_per_token"], fanout.mean(),
                               atol=1e-6)
    np.testing.assert_allclose(out.metrics["expert_load"].sum(), 1.0, atol=1e-5)


def test_top_p_shortest_prefix_hand_case():
  probs = np.array([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25],
                    [0.05, 0.9, 0.03, 0.02]], np.float32)
  out = jax.jit(lambda lg: top_p(lg, 0.6))(jnp.log(jnp.asarray(probs)))
  routed = np.asarray(out.routing.routed)
  # Row 0: 0.5 < 0.6, 0.7 >= 0.6 -> experts 0 and the first of the tied 0.2s.
  np.testing.assert_array_equal(routed[0], [True, True, False, False])
  # Row 1: four ties of 0.25 -> three experts (0.5 < 0.6 <= 0.75), lowest first.
  np.testing.assert_array_equal(routed[1], [True, True, True, False])
  # Row 2: the top expert alone crosses p.
  np.testing.assert_array_equal(routed[2], [False, True, False, False])
  np.testing.assert_allclose(np.asarray(out.routing.gates)[0, :2], [0.5, 0.2],
                             rtol=1e-5)


def test_top_p_priority_first_choices_first():
  logits = random_logits(3, (16, 6))
  out = jax.jit(lambda lg: top_p(lg, 0.7))(jnp.asarray(logits))
  gates, prio = np.asarray(out.routing.gates), np.asarray(out.routing.priority)
  for s in range(16):
    order = np.argsort(-gates[s], kind="stable")
    routed = [e for e in order if gates[s, e] != 0]
    assert [prio[s, e] for e in routed] == list(range(6, 6 - len(routed), -1))


def test_top_p_at_least_one_expert_and_cap_metric():
  logits = random_logits(1, (64, 8))
  tiny, capped, probs = jax.jit(lambda lg: (
      top_p(lg, 1e-6), top_p(lg, 0.99, max_k=2), jax.nn.softmax(lg, -1)))(
          jnp.asarray(logits))
  np.testing.assert_array_equal((np.asarray(tiny.routing.gates) != 0).sum(-1), 1)
  probs = np.asarray(probs)
  top2 = -np.sort(-probs, -1)[:, :2].sum(-1)
  np.testing.assert_allclose(capped.metrics["top_p_capped"],
                             np.mean(top2 < 0.99), atol=1e-6)
  assert (np.asarray(capped.routing.gates) != 0).sum(-1).max() == 2


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_top_p_rejects_bad_p(p):
  logits = jnp.zeros((4, 4))
  with pytest.raises(ValueError, match="p="):
    top_p(logits, p)
  with pytest.raises(ValueError, match="p="):
    dtop_p(logits, p)


@pytest.mark.parametrize("max_k", [0, 5])
def test_top_p_rejects_bad_max_k(max_k):
  with pytest.raises(ValueError, match="max_k="):
    top_p(jnp.zeros((4, 4)), 0.5, max_k=max_k)


def test_traced_p_does_not_retrace():
  logits = jnp.asarray(random_logits(2, (32, 8)))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fanout(p, scale):
    return dtop_p(logits, p, scale=scale).metrics["experts_per_token"]

  values = [float(fanout(jnp.float32(p), jnp.float32(1.5)))
            for p in (0.2, 0.5, 0.9)]
  assert values[0] < values[1] < values[2]


def test_standardize_matches_numpy():
  logits = random_logits(4, (10, 8))
  ref = (logits - logits.mean(-1, keepdims=True)) / logits.std(-1, keepdims=True)
  jit_standardize = jax.jit(standardize)
  np.testing.assert_allclose(jit_standardize(jnp.asarray(logits)), ref,
                             atol=1e-4)
  # Equal logits: finite zeros (eps), finite gradient.
  flat = jnp.ones((2, 4))
  assert np.all(np.asarray(jit_standardize(flat)) == 0)
  grad = jax.jit(jax.grad(lambda x: standardize(x).sum()))(flat)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("shift,mult", [(3.0, 1.0), (-7.5, 1.0), (0.0, 4.0),
                                        (2.0, 0.25)])
def test_dtop_p_invariant_to_shift_and_scale(shift, mult):
  logits = random_logits(5, (64, 8))
  rng = np.random.default_rng(0)
  per_token = rng.normal(size=(64, 1)).astype(np.float32) * shift
  moved = logits * mult + per_token
  route = jax.jit(lambda lg: dtop_p(lg, 0.6, scale=1.7))
  a = route(jnp.asarray(logits))
  b = route(jnp.asarray(moved))
  np.testing.assert_array_equal(np.asarray(a.routing.routed),
                                np.asarray(b.routing.routed))
  np.testing.assert_allclose(a.routing.gates, b.routing.gates, atol=1e-4)


def test_dtop_p_is_renormalised_top_p_of_scaled_standardised_logits():
  logits = jnp.asarray(random_logits(6, (64, 8)))
  out, ref = jax.jit(lambda lg: (
      dtop_p(lg, 0.5, scale=2.5, max_k=4),
      top_p(2.5 * standardize(lg), 0.5, max_k=4, normalize=True)))(logits)
  np.testing.assert_allclose(out.routing.gates, ref.routing.gates, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.routing.gates).sum(-1), 1.0,
                             atol=1e-5)


def test_larger_gamma_needs_fewer_experts():
  logits = jnp.asarray(random_logits(7, (256, 16)))
  fanout = jax.jit(lambda lg, g: dtop_p(lg, 0.6, scale=g).metrics[
      "experts_per_token"])
  fanouts = [float(fanout(logits, jnp.float32(g)))
             for g in (0.25, 0.5, 1.0, 2.0, 4.0)]
  assert all(a >= b for a, b in zip(fanouts, fanouts[1:]))
  assert fanouts[0] > fanouts[-1] + 2


def test_router_gradients_reach_scale_and_logits():
  logits = jnp.asarray(random_logits(8, (32, 8)))
  target = jnp.asarray(np.random.default_rng(1).normal(size=(32, 8)),
                       jnp.float32)

  def loss(scale, lg):
    out = dtop_p(lg, 0.6, scale=scale)
    return jnp.sum(out.routing.gates * target) + out.aux["entropy"]

  g_scale, g_logits = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      jnp.float32(1.0), logits)
  assert np.isfinite(float(g_scale)) and abs(float(g_scale)) > 1e-6
  assert np.all(np.isfinite(np.asarray(g_logits)))
  assert np.abs(np.asarray(g_logits)).sum() > 1e-4


# ----------------------------------------------------------------- methods


def test_methods_registered_and_built_from_flags():
  assert {"top_p", "dtop_p"} <= set(routing.available())
  flags = {"k": 3, "p": 0.3, "max_k": 6, "dtop_p_scope": "layer", "pi_kp": 0.4,
           "pi_ki": None, "p_init": 0.6, "p_min": 0.05, "p_max": 0.95,
           "num_experts": 8, "seed": 1}
  tp = routing.build("top_p", flags)
  assert (tp.p, tp.k, tp.max_k, tp.normalize) == (0.3, 3, 6, False)
  dt = routing.build("dtop_p", flags)
  assert (dt.k, dt.max_k, dt.dtop_p_scope, dt.pi_kp, dt.pi_ki, dt.p_init,
          dt.p_min, dt.p_max) == (3, 6, "layer", 0.4, 0.1, 0.6, 0.05, 0.95)
  assert dt.max_fanout(8) == 6 and DTopP(k=2).max_fanout(8) == 8
  assert dt.capacity(64, 8, 1.0) == TopP(k=3).capacity(64, 8, 1.0) == 24
  assert DTopP.aux_weights == {"load_balance": 1e-4, "z_loss": 0.0,
                               "entropy": 1e-3}
  assert TopP.aux_weights["load_balance"] == 1e-2
  assert TopP.aux_weights["entropy"] == 1e-4


@pytest.mark.parametrize("kwargs,name", [
    (dict(dtop_p_scope="model"), "dtop_p_scope"),
    (dict(k=4, max_k=3), "max_k"),
    (dict(pi_kp=-1.0), "pi_kp"),
    (dict(pi_ki=-0.1), "pi_ki"),
    (dict(p_min=0.0), "p_min"),
    (dict(p_max=1.5), "p_max"),
    (dict(p_init=0.9, p_max=0.8), "p_init"),
    (dict(gamma_init=0.0), "gamma_init"),
])
def test_dtop_p_method_validation(kwargs, name):
  with pytest.raises(ValueError, match=name + "="):
    DTopP(**kwargs)


def test_method_validation_against_layer():
  with pytest.raises(ValueError, match="max_k="):
    MoEConfig(num_experts=4, router=DTopP(k=2, max_k=6))
  with pytest.raises(ValueError, match="p="):
    TopP(p=0.0)


def _layer(method, capacity_factor=1.25):
  """A layer of 8 experts, its initial variables (params and, if the method
  has any, router_state; not the outputs that init sows) and x
  float32[2, 16, 12]."""
  cfg = MoEConfig(num_experts=8, expert_width=16, router=method,
                  capacity_factor=capacity_factor)
  layer = MoE(cfg, d_model=12)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 12))

  def init(x):
    return layer.init({"params": jax.random.PRNGKey(1)}, x, train=False)

  # Two programs: the params' one does not depend on the router's settings or
  # the capacity (compiled once for all the DTopP layers here, through the
  # compilation cache); the router state's has no random init.
  params = jax.jit(lambda x: init(x)["params"])(x)
  state = jax.jit(lambda x: {k: v for k, v in init(x).items()
                             if k == "router_state"})(x)
  return layer, {"params": params, **state}, x


def test_gamma_is_a_param_and_p_is_state():
  layer, variables, _ = _layer(DTopP(k=2))
  assert float(variables["params"]["gamma"]) == 1.0
  state = variables["router_state"]["state"]
  assert set(state) == {"p", "integral"}
  assert "gamma" not in state
  top_vars = jax.eval_shape(lambda: _layer(TopP(k=2))[1])  # structure only
  assert "gamma" not in top_vars["params"] and "router_state" not in top_vars


def test_gradients_reach_gamma_and_router_in_layer():
  layer, variables, x = _layer(DTopP(k=2, p_init=0.6))

  def loss(params):
    y, coll = layer.apply({"params": params,
                           "router_state": variables["router_state"]}, x,
                          train=True, mutable=["router"])
    return jnp.sum(y ** 2) + coll["router"]["aux_loss"][0]

  grads = nn.meta.unbox(jax.jit(jax.grad(loss))(variables["params"]))
  g_gamma, g_router = float(grads["gamma"]), np.asarray(grads["router"])
  assert np.isfinite(g_gamma) and abs(g_gamma) > 1e-8
  assert np.all(np.isfinite(g_router)) and np.abs(g_router).sum() > 1e-6


def test_layer_reports_drops_of_high_fanout_tokens():
  layer, variables, x = _layer(DTopP(k=2, p_init=0.9), capacity_factor=0.5)
  _, coll = jax.jit(lambda v, x: layer.apply(v, x, train=True,
                                             mutable=["router"]))(variables, x)
  m = coll["router"]["metrics"][0]
  assert float(m["experts_per_token"]) > 2  # p = 0.9: over the target
  assert float(m["drop_fraction"]) > 0
  assert float(m["drop_fraction_above_mean"]) >= float(m["drop_fraction"])


def test_layer_metrics_drop_fraction_above_mean_reference():
  gates = np.zeros((1, 4, 3), np.float32)
  gates[0, 0, :] = 1.0          # fanout 3 (above the mean 1.5)
  gates[0, 1, 0] = 1.0          # fanout 1
  gates[0, 2, :2] = 1.0         # fanout 2 (above)
  gates[0, 3, 1] = 0.0          # fanout 0
  kept = gates != 0
  kept[0, 0, 2] = False         # one drop of an above-mean token
  kept[0, 1, 0] = False         # one drop of a below-mean token
  dummy = {"experts_per_token": jnp.zeros((1,))}
  m = jax.jit(layer_metrics)(jnp.asarray(gates), jnp.asarray(kept), dummy)
  np.testing.assert_allclose(m["drop_fraction"], 2 / 6, atol=1e-6)
  np.testing.assert_allclose(m["drop_fraction_above_mean"], 1 / 5, atol=1e-6)
