"""FSDP on 8 forced host devices: the `fsdp` mesh axis shards every parameter
and optimizer state along one dimension (the rules and their fallback), the
batch is split over it too, and a few train steps on FSDP meshes composed
with expert and model parallelism equal one device's."""
import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moejax import routing, sharding
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.checkpoint import Checkpointer
from moejax.train.loop import build_state, state_shardings
from moejax.train.state import OptimConfig
from moejax.train.step import make_train_step

# (mesh, expert_parallel, strategy) runs compared against one device: the
# "gather" plans ("auto" on a CPU) data-parallel (fsdp:8) and expert-major,
# the per-group "index" plans, and the shard_map all-to-all.
FSDP_RUNS = (("fsdp:8", "gspmd", "auto"), ("fsdp:4,expert:2", "gspmd", "auto"),
             ("fsdp:4,expert:2", "gspmd", "index"),
             ("fsdp:2,expert:2,model:2", "gspmd", "auto"),
             ("fsdp:2,expert:2,model:2", "shard_map", "auto"))


def tiny_lm(expert_parallel="gspmd", strategy="auto"):
  moe = MoEConfig(num_experts=8, expert_width=16,
                  router=routing.build("top_k", {"k": 2}),
                  capacity_factor=2.0, strategy=strategy,
                  expert_parallel=expert_parallel)
  return LMConfig(num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=16,
                  moe=moe)


def tiny_run(model, mesh=None, num_devices=None):
  return TrainConfig(model=model, batch_size=8, seq_len=16, steps=3,
                     optim=OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                       total_steps=3),
                     mesh=mesh, num_devices=num_devices)


def _lm_batch(batch=8, length=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, 256, (batch, length + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32),
          "mask": np.ones((batch, length), np.float32)}


def _axes(entry):
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def test_fsdp_mesh_and_batch_axes():
  mesh = sharding.make_mesh("fsdp:4,expert:2")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 2, "model": 1}
  assert sharding.mesh_spec(mesh) == "data:1,fsdp:4,expert:2,model:1"
  assert sharding.batch_shards(mesh) == 8
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"))
  # Tokens over data x fsdp x expert; expert buffers' groups over data x fsdp.
  mesh = sharding.make_mesh("data:2,fsdp:2,expert:2")
  assert sharding.logical_spec(sharding.ACT_BLD, (8, 4, 16), mesh) == P(
      ("data", "fsdp", "expert"), None, None)
  assert sharding.logical_spec(sharding.ACT_GECD, (4, 8, 4, 16), mesh) == P(
      ("data", "fsdp"), "expert", None, None)


def test_fsdp_divisibility_errors_are_one_line():
  mesh = sharding.make_mesh("data:2,fsdp:2,expert:2")
  with pytest.raises(ValueError, match=r"^batch_size=4 must be divisible by "
                     r"the data\*fsdp\*expert mesh size 8 \(mesh data:2,"
                     r"fsdp:2,expert:2,model:1\); allowed: multiples of 8$"):
    sharding.check_batch(4, mesh)
  cfg = LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64,
                 moe=MoEConfig(num_experts=5, expert_width=16))
  with pytest.raises(ValueError, match=r"^num_experts=5 must be divisible by "
                     r"the expert mesh axis size 2 .*allowed: multiples of 2$"):
    sharding.check_model(cfg, mesh)
  # fsdp itself needs nothing to divide (odd widths stay replicated).
  sharding.check_model(LMConfig(num_layers=1, d_model=36, num_heads=2,
                                d_ff=60, moe=None),
                       sharding.make_mesh("fsdp:8"))


def test_param_rules_and_fallback():
  mesh = sharding.make_mesh("fsdp:4,expert:2")
  spec = sharding.param_spec
  fe = ("fsdp", "expert")
  # D (`embed`) over fsdp; E over expert; the activation rules never use fsdp.
  assert spec(("expert", "embed", "mlp"), (8, 32, 16), mesh) == P(
      "expert", "fsdp", None)
  # A weight without an expert dimension: D over fsdp x expert where 8
  # divides it, else over fsdp alone.
  assert spec(("vocab", "embed"), (256, 32), mesh) == P(None, fe)
  assert spec(("vocab", "embed"), (256, 36), mesh) == P(None, "fsdp")
  assert sharding.logical_spec(("vocab", "embed"), (256, 32), mesh) == P(
      None, None)
  # D not divisible by fsdp: the largest other divisible dimension.
  assert spec(("embed", "heads", "kv"), (30, 4, 8), mesh) == P(None, None, fe)
  assert spec(("embed", "heads", "kv"), (30, 4, 12), mesh) == P(
      None, None, "fsdp")
  # No names (an RMSNorm scale, a DiT dense kernel): the largest divisible.
  assert spec(None, (32,), mesh) == P(fe)
  assert spec(None, (12,), mesh) == P("fsdp")
  assert spec(None, (12, 64), mesh) == P(None, fe)
  assert spec(None, (8, 8), mesh) == P(fe, None)  # ties: the first
  # Nothing divisible, or a scalar: replicated.
  assert spec(None, (6, 3), mesh) == P(None, None)
  assert spec(None, (), mesh) == P()
  # Without fsdp the rules are the old ones: replicated over expert.
  mesh = sharding.make_mesh("data:2,expert:2,model:2")
  assert spec(("expert", "embed", "mlp"), (8, 32, 16), mesh) == P(
      "expert", None, "model")
  assert spec(("vocab", "embed"), (256, 32), mesh) == P("model", None)
  assert spec(None, (32,), mesh) == P(None)


def test_every_param_and_moment_is_split_over_fsdp():
  cfg = tiny_run(tiny_lm(), mesh="fsdp:2,expert:2,model:2")
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    state = build_state(cfg, TransformerLM(cfg.model), mesh)
  params = jax.tree_util.tree_leaves_with_path(state.params)
  assert params
  for path, x in params:
    spec = x.sharding.spec
    assert "fsdp" in [a for e in spec for a in _axes(e)], (path, spec)
    # Each device holds 1/2 of it along the fsdp dimension (or less).
    shard = x.addressable_shards[0].data
    assert shard.size * 2 <= x.size, (path, shard.shape, x.shape)
  experts = state.params["layers_0"]["mlp"]["experts"]
  assert experts["w_in"].sharding.spec == P("expert", "fsdp", "model")
  assert experts["w_in"].addressable_shards[0].data.shape == (4, 16, 8)
  # Weights without an expert dimension: over fsdp x expert too, so no
  # device holds more than 1/4 of them (the expert weights: 1/4 by E and D).
  assert state.params["embed"]["embedding"].sharding.spec == P(
      "model", ("fsdp", "expert"))
  for path, x in params:
    shard = x.addressable_shards[0].data
    if x.ndim and x.size >= 4 * 16:  # (big enough to split 4 ways)
      assert shard.size * 4 <= x.size, (path, shard.shape, x.shape)
  # Optimizer moments follow their params; step, rng, data index replicated.
  adam = state.opt_state[1][0]
  for moments in (adam.mu, adam.nu):
    chex.assert_trees_all_equal_structs(moments, state.params)
    for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(state.params)):
      assert m.sharding == p.sharding
  for leaf in (state.step, state.rng, state.data_index):
    assert leaf.sharding.is_fully_replicated


SGD = optax.sgd(0.5, momentum=0.9)


def _place(cfg, mesh, host_state):
  """A host state (SGD-with-momentum optimizer state) on `mesh`: the run's
  state shardings, the momentum sharded like its params."""
  shards = state_shardings(cfg, TransformerLM(cfg.model), mesh)
  state = jax.device_put(host_state.replace(opt_state=()),
                         shards.replace(opt_state=()))
  return state.replace(opt_state=optax.tree_map_params(
      SGD, jax.device_put, host_state.opt_state, shards.params,
      transform_non_params=lambda x: jax.device_put(
          x, sharding.replicated(mesh))))


def _steps(cfg, mesh, state, steps):
  """`steps` train steps of SGD with momentum on a placed state (the
  momentum is an optimizer state sharded like the params; Adam's first steps
  would turn float noise in near-zero gradients into sign flips) ->
  (state, losses, grad norms)."""
  model = TransformerLM(cfg.model)
  with jax.set_mesh(mesh):
    step = make_train_step(model, SGD, cfg.model.moe.router, donate=False,
                           state_sharding=jax.tree.map(lambda x: x.sharding,
                                                       state))
    batch = sharding.put_batch(_lm_batch(), sharding.batch_sharding(mesh))
    losses, norms = [], []
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
      norms.append(float(metrics["grad_norm"]))
  return state, losses, norms


def _run_steps(cfg, mesh, host_state, steps=3):
  return _steps(cfg, mesh, _place(cfg, mesh, host_state), steps)


@pytest.fixture(scope="module")
def single_device_run():
  """(initial state, state after 3 steps, losses, grad norms) on one device."""
  single = tiny_run(tiny_lm(), num_devices=1)
  mesh1 = sharding.make_mesh(None, jax.devices()[:1])
  with jax.set_mesh(mesh1):
    init = build_state(single, TransformerLM(single.model), mesh1)
  init = jax.device_get(init)
  init = init.replace(opt_state=SGD.init(init.params))
  ref, losses, norms = _run_steps(single, mesh1, init)
  return init, jax.device_get(ref), losses, norms


@pytest.mark.parametrize("spec, mode, strategy", FSDP_RUNS)
def test_fsdp_steps_match_single_device(single_device_run, spec, mode,
                                        strategy):
  """3 steps on an FSDP mesh (with expert and model parallelism, both
  expert-parallel paths) equal one device's: losses to rtol 1e-5, gradient
  norms to 1e-4, params and the momentum to rtol 1e-4 / atol 1e-5; the
  params and momentum stay split over fsdp."""
  init, ref, ref_losses, ref_norms = single_device_run
  cfg = tiny_run(tiny_lm(expert_parallel=mode, strategy=strategy), mesh=spec)
  state, losses, norms = _run_steps(cfg, sharding.make_mesh(spec), init)
  w_in = state.params["layers_0"]["mlp"]["experts"]["w_in"]
  assert "fsdp" in _axes(w_in.sharding.spec[1]), w_in.sharding
  trace = state.opt_state[0].trace["layers_0"]["mlp"]["experts"]["w_in"]
  assert trace.sharding == w_in.sharding
  state = jax.device_get(state)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
  chex.assert_trees_all_close(state.params, ref.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state.opt_state, ref.opt_state, rtol=1e-4,
                              atol=1e-5)
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("saved_on, restored_on", [
    ("fsdp:4,expert:2", "data:8"), ("data:8", "fsdp:4,expert:2")])
def test_checkpoint_restores_on_another_mesh(single_device_run, tmp_path,
                                             saved_on, restored_on):
  """2 steps on one mesh, a checkpoint, restored onto the other mesh's
  shardings (each array read as the new mesh's shards), 1 more step there:
  equal to 3 uninterrupted steps (the single-device run; same tolerances as
  above)."""
  init, ref, ref_losses, _ = single_device_run
  cfg_a = tiny_run(tiny_lm(), mesh=saved_on)
  mesh_a = sharding.make_mesh(saved_on)
  state, losses, _ = _run_steps(cfg_a, mesh_a, init, steps=2)
  checkpointer = Checkpointer(str(tmp_path / "ckpt"), every=1)
  assert checkpointer.save(state)
  checkpointer.wait()
  saved = jax.device_get(state)

  cfg_b = tiny_run(tiny_lm(), mesh=restored_on)
  mesh_b = sharding.make_mesh(restored_on)
  target = _place(cfg_b, mesh_b, init)
  if saved_on == "data:8":  # the abstract target state restores as well
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding), target)
  restored, step = checkpointer.restore_latest(target)
  checkpointer.close()
  assert step == 2
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  chex.assert_trees_all_equal(jax.device_get(restored), saved)
  w_in = restored.params["layers_0"]["mlp"]["experts"]["w_in"]
  assert ("fsdp" in _axes(w_in.sharding.spec[1])) == ("fsdp" in restored_on)

  state, more, _ = _steps(cfg_b, mesh_b, restored, 1)
  np.testing.assert_allclose(losses + more, ref_losses, rtol=1e-5)
  state = jax.device_get(state)
  assert int(state.step) == 3
  chex.assert_trees_all_close(state.params, ref.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state.opt_state, ref.opt_state, rtol=1e-4,
                              atol=1e-5)
