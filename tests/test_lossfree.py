"""Loss-free balancing: biased top-k, the sign-bias controller, LossFreeTopK."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import control, routing
from moejax.routing import LossFreeTopK, TopK, build
from moejax.models import LMConfig
from moejax.nn import MoE, MoEConfig
from moejax.routing import losses
from moejax.train.step import router_outputs


@pytest.mark.parametrize("normalize", [True, False])
def test_zero_bias_softmax_equals_top_k(normalize):
  logits = jax.random.normal(jax.random.PRNGKey(0), (30, 8))
  a = jax.jit(lambda lg: routing.biased_top_k(lg, 2, jnp.zeros(8),
                                              normalize=normalize))(logits)
  b = jax.jit(lambda lg: routing.top_k(lg, 2, normalize=normalize))(logits)
  np.testing.assert_allclose(np.asarray(a.routing.gates),
                             np.asarray(b.routing.gates), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(a.routing.priority),
                                np.asarray(b.routing.priority))
  np.testing.assert_allclose(float(a.aux["load_balance"]),
                             float(b.aux["load_balance"]), rtol=1e-6)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_bias_moves_selection_not_weights(score_fn):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 6)).astype(np.float32)
  logits[:, 0] += 3.0  # everybody's favourite
  bias = np.array([-5.0, 0, 0, 0, 0.0, 0.3], np.float32)
  out = jax.jit(lambda lg, b: routing.biased_top_k(
      lg, 2, b, score_fn=score_fn))(jnp.asarray(logits), jnp.asarray(bias))
  scores = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            if score_fn == "softmax" else 1 / (1 + np.exp(-logits)))
  idx = np.argsort(-(scores + bias), axis=-1, kind="stable")[:, :2]
  want = np.zeros_like(scores)
  chosen = np.take_along_axis(scores, idx, -1)
  np.put_along_axis(want, idx, chosen / chosen.sum(-1, keepdims=True), -1)
  np.testing.assert_allclose(np.asarray(out.routing.gates), want, rtol=1e-5)
  assert float(out.metrics["expert_load"][0]) == 0.0
  with pytest.raises(ValueError, match="score_fn"):
    routing.biased_top_k(jnp.asarray(logits), 2, score_fn="relu")


def test_sign_bias_update_rule():
  ctrl = control.SignBias(rate=0.01)
  state = ctrl.init(4)
  update = jax.jit(ctrl.update)
  state = update(state, jnp.array([0.4, 0.1, 0.25, 0.25]))
  np.testing.assert_allclose(np.asarray(state["bias"]), [-0.01, 0.01, 0, 0])
  state = update(state, jnp.array([40.0, 10, 10, 40]))  # any scale
  np.testing.assert_allclose(np.asarray(state["bias"]), [-0.02, 0.02, 0.01, -0.01])
  with pytest.raises(ValueError, match="rate"):
    control.SignBias(rate=0.0)


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
def test_sign_bias_balances_a_skewed_router(score_fn):
  """LossFreeTopK's route + update loop on a skewed synthetic router."""
  num_tokens, width, num_experts, steps = 2048, 16, 8, 1000
  method = LossFreeTopK(k=2, score_fn=score_fn)
  w = jax.random.normal(jax.random.PRNGKey(1), (width, num_experts)) * 0.5
  skew = jnp.linspace(1.5, -1.5, num_experts)  # expert 0 popular, 7 starved

  def max_vio(state, key):
    x = jax.random.normal(key, (num_tokens, width))
    out = method.route(x @ w + skew, state, rng=None, train=True)
    return out.metrics["expert_load"], losses.load_stats(
        out.metrics["expert_load"])["max_vio"]

  def step(state, key):
    load, vio = max_vio(state, key)
    new = method.update({("l",): state}, {("l",): {"expert_load": load}}, 0)
    return new[("l",)], vio

  keys = jax.random.split(jax.random.PRNGKey(2), steps)
  final, vios = jax.jit(lambda s: jax.lax.scan(step, s, keys))(
      method.init_state(num_experts))
  vios = np.asarray(vios)
  assert vios[0] > 1.0  # badly skewed without bias
  assert vios[-100:].mean() < 0.15, vios[-100:].mean()
  bias = np.asarray(final["bias"])
  assert bias[0] < 0 < bias[-1]  # popular expert pushed down, starved pulled up
  # Frozen bias, new tokens.
  _, fresh = jax.jit(max_vio)(final, jax.random.PRNGKey(99))
  assert float(fresh) < 0.3  # one batch: noisier than the 100-step mean


def test_loss_free_options_alias_and_validation():
  m = build("top_k", {"k": 2, "balance": "loss_free", "bias_update_rate": 1e-2,
                      "score_fn": "sigmoid", "et_beta": 0.5})
  assert m == build("loss_free", {"k": 2, "bias_update_rate": 1e-2,
                                  "score_fn": "sigmoid", "balance": "aux"})
  assert (type(m), m.bias_update_rate, m.score_fn) == (
      LossFreeTopK, 1e-2, "sigmoid")
  assert m.aux_weights["load_balance"] == 0.0
  assert TopK().aux_weights["load_balance"] == 1e-2
  assert TopK(balance="none").aux_weights["load_balance"] == 0.0
  assert set(m.init_state(4)) == {"bias"} and TopK().init_state(4) == {}
  for cls, kwargs, field in [
      (TopK, {"balance": "sometimes"}, "balance"),
      (TopK, {"balance": "loss_free"}, "LossFreeTopK"),
      (TopK, {"score_fn": "tanh"}, "score_fn"),
      (TopK, {"score_fn": "sigmoid", "random_second": True}, "random_second"),
      (LossFreeTopK, {"score_fn": "tanh"}, "score_fn"),
      (LossFreeTopK, {"bias_update_rate": 0.0}, "bias_update_rate")]:
    with pytest.raises(ValueError, match=field):
      cls(**kwargs)
  states = {("a",): {"bias": jnp.array([0.1, -0.1])},
            ("b",): {"bias": jnp.array([0.0, 0.2])}}
  np.testing.assert_allclose(
      float(jax.jit(m.state_metrics)(states)["bias_spread"]), 0.2)


def test_layer_uses_bias_for_selection_only():
  cfg = MoEConfig(num_experts=4, expert_width=8,
                  router=LossFreeTopK(k=1, normalize=False),
                  capacity_factor=4.0)
  layer = MoE(cfg, d_model=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))

  def init(x):
    return layer.init({"params": jax.random.PRNGKey(1)}, x, train=True)

  # Two programs, neither with the forward pass (only the sown outputs need it).
  v = {"params": jax.jit(lambda x: init(x)["params"])(x),
       "router_state": jax.jit(lambda x: init(x)["router_state"])(x)}
  assert set(v["router_state"]["state"]) == {"bias"}
  bias = {"state": {"bias": jnp.array([-10.0, 0, 0, 0])}}
  _, coll = jax.jit(lambda p, rs, x: layer.apply(
      {"params": p, "router_state": rs}, x, train=True, mutable=["router"]))(
          v["params"], bias, x)
  (out,) = router_outputs(coll["router"]).values()
  assert float(out["metrics"]["expert_load"][0]) == 0.0
  assert float(out["aux"]["load_balance"]) > 0  # reported, weight 0
  np.testing.assert_allclose(float(out["aux_loss"]),
                             1e-3 * float(out["aux"]["z_loss"]), rtol=1e-6)


def test_cli_builds_loss_free_top_k():
  from moejax.cli.lm_flags import build_train_config
  cfg = build_train_config({"config": "tiny", "router": "top_k",
                            "balance": "loss_free", "score_fn": "sigmoid",
                            "bias_update_rate": 2e-3})
  r = cfg.model.moe.router
  assert r == LossFreeTopK(k=r.k, score_fn="sigmoid", bias_update_rate=2e-3)
  with pytest.raises(ValueError, match="balance"):
    build_train_config({"config": "tiny", "router": "top_k", "balance": "x"})


def test_cli_top1_without_normalisation_keeps_the_probability_gate():
  import jax
  import numpy as np

  from moejax.cli.lm_flags import build_train_config
  cfg = build_train_config({"config": "tiny", "router": "top_k", "k": 1,
                            "normalize": False})
  r = cfg.model.moe.router
  assert (r.k, r.normalize) == (1, False)
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  gates = np.asarray(r.route(logits, {}, rng=None, train=True).routing.gates)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  # Switch-style top-1: the gate is the chosen probability, not 1.
  np.testing.assert_allclose(gates.max(-1), probs.max(-1), rtol=1e-6)
  assert (gates.max(-1) < 1).all() and ((gates > 0).sum(-1) == 1).all()


def test_loss_free_state_survives_resume(train_and_resume):
  moe = MoEConfig(num_experts=4, expert_width=16,
                  router=LossFreeTopK(k=1, bias_update_rate=1e-2))
  model = LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=16,
                   moe=moe)
  ref, summary = train_and_resume(model)
  (bias,) = jax.tree.leaves(ref.router_state)
  bias = np.asarray(bias)
  # Four sign steps of 1e-2 each: every entry is a multiple of 1e-2, not all 0.
  np.testing.assert_allclose(bias * 100, np.round(bias * 100), atol=1e-4)
  assert np.abs(bias).max() > 0
  jax.tree.map(np.testing.assert_array_equal, summary["state"].router_state,
               ref.router_state)
