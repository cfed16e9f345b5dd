"""Sharding on 8 forced host devices: meshes and their errors, sharded init,
the shard_map all-to-all path, and the sharded train step of each mesh layout
against the single-device one (every router: test_sharding_routers.py)."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moejax import routing, sharding
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn.expert_parallel import routed_experts
from moejax.nn.moe import MoEConfig
from moejax.routing.base import Routing
from moejax.tasks.lm import TrainConfig
from moejax.train.loop import build_state, state_shardings
from moejax.train.state import OptimConfig
from moejax.train.step import make_train_step

LAYOUTS = ("data:8", "data:2,expert:4", "data:2,expert:2,model:2")


def test_eight_forced_devices():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize("spec, message", [
    ("data:2,pipeline:4", "unknown; allowed: data, fsdp, expert, model"),
    ("data:two", "is not an integer"),
    ("data:0,expert:8", "out of range; allowed: >= 1"),
    ("data:2,expert:2", "uses 4 devices but 8 are available"),
    ("data:2,data:4", "appears twice"),
    ("data", "has no size"),
])
def test_bad_mesh_specs_are_clear_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(spec)


def test_mesh_layout_and_default():
  assert sharding.parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "expert": 1,
                                         "model": 1}
  mesh = sharding.make_mesh("data:2,expert:2,model:2")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "model": 2}
  assert sharding.mesh_spec(mesh) == "data:2,expert:2,model:2"
  # Devices stay in jax.devices() order (process-major) along the flat mesh.
  assert [d.id for d in mesh.devices.reshape(-1)] == [d.id for d in jax.devices()]


def test_batch_and_model_divisibility_errors():
  mesh = sharding.make_mesh("data:2,expert:4")
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by "
                     "the data\\*expert mesh size 8"):
    sharding.check_batch(6, mesh)
  cfg = LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64,
                 moe=MoEConfig(num_experts=6, expert_width=16))
  with pytest.raises(ValueError, match="num_experts=6 must be divisible by "
                     "the expert mesh axis size 4"):
    sharding.check_model(cfg, mesh)
  with pytest.raises(ValueError, match="expert_parallel='pipes'"):
    MoEConfig(expert_parallel="pipes")


def test_logical_spec_and_constrain_outside_mesh():
  mesh = sharding.make_mesh("data:2,expert:2,model:2")
  assert sharding.logical_spec(sharding.ACT_GECD, (4, 8, 4, 16), mesh) == P(
      "data", "expert", None, None)
  assert sharding.logical_spec(sharding.ACT_BLD, (8, 4, 16), mesh) == P(
      ("data", "expert"), None, None)
  # A dimension the mesh does not divide stays unsharded.
  assert sharding.logical_spec(sharding.ACT_BLD, (3, 4, 16), mesh) == P(
      None, None, None)
  x = jnp.ones((4, 4))
  assert sharding.constrain(x, ("batch", "embed")) is x  # no mesh: no-op


def tiny_lm(router="top_k", expert_parallel="gspmd", num_layers=2,
            **router_kw):
  method = routing.build(router, {"k": 2, **router_kw})
  moe = MoEConfig(num_experts=8, expert_width=16, router=method,
                  capacity_factor=2.0, expert_parallel=expert_parallel)
  return LMConfig(num_layers=num_layers, d_model=32, num_heads=4, d_ff=64,
                  max_len=16, moe=moe)


def tiny_train_config(model, num_devices=None, mesh=None):
  return TrainConfig(model=model, batch_size=8, seq_len=16, steps=2,
                     optim=OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                       total_steps=2),
                     num_devices=num_devices, mesh=mesh)


def test_build_state_creates_params_sharded():
  cfg = tiny_train_config(tiny_lm())
  mesh = sharding.make_mesh("data:2,expert:2,model:2")
  with jax.set_mesh(mesh):
    state = build_state(cfg, TransformerLM(cfg.model), mesh)
  experts = state.params["layers_0"]["mlp"]["experts"]
  assert experts["w_in"].sharding.spec == P("expert", None, "model")
  assert experts["w_out"].sharding.spec == P("expert", "model", None)
  # Each device holds only its shard (created there, never gathered).
  shard = experts["w_in"].addressable_shards[0].data
  assert shard.shape == (4, 32, 8)
  assert state.params["embed"]["embedding"].sharding.spec == P("model", None)
  mu = state.opt_state[1][0].mu["layers_0"]["mlp"]["experts"]["w_in"]
  assert mu.sharding.spec == P("expert", None, "model")
  assert state.step.sharding.is_fully_replicated


def test_shard_map_all_to_all_and_dropless_bound():
  """The shard_map path sends each expert's slots over `expert` and back;
  'dropless' keeps everything with the static bound C = S."""
  g, s, e, d, f = 8, 8, 8, 8, 4
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = jax.random.normal(k0, (g, s, e))
  gates = jnp.where(logits > 0.5, jax.nn.sigmoid(logits), 0.0)
  routing = Routing(gates=gates, priority=gates)
  x = jax.random.normal(k1, (g, s, d))
  w = jax.random.normal(k2, (3, e, d, f)) * 0.3
  weights = {"w_in": w[0], "w_gate": w[1], "w_out": w[2].transpose(0, 2, 1)}
  # Reference: a loop over tokens and experts, nothing dropped.
  ref = np.zeros((g, s, d), np.float32)
  xn, gn = np.asarray(x), np.asarray(gates)
  wn = {k: np.asarray(v) for k, v in weights.items()}
  for gi in range(g):
    for si in range(s):
      for ei in range(e):
        if gn[gi, si, ei]:
          h = xn[gi, si] @ wn["w_in"][ei]
          gate = xn[gi, si] @ wn["w_gate"][ei]
          h = h * gate / (1 + np.exp(-gate))
          ref[gi, si] += gn[gi, si, ei] * (h @ wn["w_out"][ei])
  mesh = sharding.make_mesh("data:2,expert:4")
  fn = jax.jit(lambda r, x, w: routed_experts(
      r, x, w, capacity=4, strategy="dropless", mode="shard_map"))
  with jax.set_mesh(mesh):
    y, kept = fn(routing, x, weights)
    hlo = fn.lower(routing, x, weights).as_text()
  assert "all_to_all" in hlo or "all-to-all" in hlo
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(kept), gn > 0)


def _run_steps(cfg, mesh, state, batch, steps=2):
  """`steps` train steps (plain SGD: Adam's first steps amplify float noise in
  near-zero gradients into sign flips) -> (state, losses, grad norms)."""
  model = TransformerLM(cfg.model)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_shardings(cfg, model, mesh))
    train_step = make_train_step(model, optax.sgd(0.5), cfg.model.moe.router,
                                 donate=False)
    batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    losses, norms = [], []
    for _ in range(steps):
      state, metrics = train_step(state, batch)
      losses.append(float(metrics["loss"]))
      norms.append(float(metrics["grad_norm"]))
  return jax.device_get(state), losses, norms


def _lm_batch(batch=8, length=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, 256, (batch, length + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32),
          "mask": np.ones((batch, length), np.float32)}


def test_sharded_train_step_of_each_layout_matches_single_device():
  """TrainConfig(num_devices=1) against 8 devices in each layout (and the
  shard_map expert path): same losses, gradient norms and params."""
  batch = _lm_batch()
  model = tiny_lm(num_layers=1)
  single = tiny_train_config(model, num_devices=1)
  mesh1 = sharding.make_mesh(None, jax.devices()[:1])
  with jax.set_mesh(mesh1):
    init = build_state(single, TransformerLM(model), mesh1)
  ref_state, ref_losses, ref_norms = _run_steps(single, mesh1, init, batch)
  runs = [(spec, "gspmd") for spec in LAYOUTS]
  runs.append(("data:2,expert:2,model:2", "shard_map"))
  for spec, mode in runs:
    cfg = tiny_train_config(tiny_lm(num_layers=1, expert_parallel=mode),
                            mesh=spec)
    state, losses, norms = _run_steps(cfg, sharding.make_mesh(spec), init,
                                      batch)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                               err_msg=f"{spec} {mode}")
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4,
                               err_msg=f"{spec} {mode}")
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-4,
                                atol=1e-5)
    assert losses[1] < losses[0]


def _expert_case(num_groups: int, seed: int):
  """(gates float32[G, 16, 8] with zeros, x float32[G, 16, 8], SwiGLU expert
  weights of E 8, D 8, F 4) for the expert-path tests."""
  s, e, d, f = 16, 8, 8, 4
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 3)
  logits = jax.random.normal(k0, (num_groups, s, e))
  gates = jnp.where(logits > 0.3, jax.nn.sigmoid(logits), 0.0)
  x = jax.random.normal(k1, (num_groups, s, d))
  w = jax.random.normal(k2, (3, e, d, f)) * 0.3
  return gates, x, {"w_in": w[0], "w_gate": w[1],
                    "w_out": w[2].transpose(0, 2, 1)}


def _expert_grad(strategy: str):
  """jit of (gates, x, weights, mode) -> ((loss, (y, kept)), gradients) of
  the expert path with capacity 4."""
  def loss(gates, x, weights, mode):
    y, kept = routed_experts(Routing(gates=gates, priority=gates), x, weights,
                             capacity=4, strategy=strategy, mode=mode)
    return jnp.sum(y * jnp.cos(y)), (y, kept)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                 static_argnums=3)


def _assert_same_path(got, want):
  """Same outputs, kept set and gradients (`_expert_grad` results)."""
  (_, (y, kept)), grads = got
  (_, (ref_y, ref_kept)), ref_grads = want
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(ref_kept))
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy, mode, spec", [
    (strategy, mode, "data:2,expert:4") for strategy in
    ("gather", "index", "sorted") for mode in ("gspmd", "shard_map")] + [
        ("gather", "gspmd", "data:8")])
def test_expert_path_on_mesh_matches_one_device(strategy, mode, spec):
  """Each device plans its own groups at once (capacity per group): the
  expert path on a mesh gives the single-device output, kept set and
  gradients."""
  gates, x, weights = _expert_case(8, seed=1)
  fn = _expert_grad(strategy)
  want = fn(gates, x, weights, mode)
  with jax.set_mesh(sharding.make_mesh(spec)):
    got = fn(gates, x, weights, mode)
  _assert_same_path(got, want)
  kept = got[0][1][1]
  if strategy != "sorted" or mode == "gspmd":  # shard_map: "sorted" keeps all
    assert not np.asarray(kept).all()


@pytest.mark.parametrize("strategy", ["gather", "index"])
def test_shard_map_layout_matches_the_single_device_path(strategy):
  """The shard_map path's expert-major [E, G, C, D] buffers (what it runs
  per device, here without a mesh) give the single-device path's output,
  kept set and gradients."""
  gates, x, weights = _expert_case(4, seed=2)
  fn = _expert_grad(strategy)
  got = fn(gates, x, weights, "shard_map")
  _assert_same_path(got, fn(gates, x, weights, "gspmd"))
  assert not np.asarray(got[0][1][1]).all()
