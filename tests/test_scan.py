"""The layer scan (`LMConfig.scan_layers`, `moejax.models.scan`): a scanned
model with the unrolled model's variables restacked computes the same
logits, gradients, train steps (params, controller state, metrics) and
cached decoding; it trains on an fsdp x expert mesh."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import decode, routing, sharding
from moejax.models import scan
from moejax.models.lm import LMConfig, TransformerLM, init_cache
from moejax.nn.mod import MoDConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.loop import build_state
from moejax.train.state import OptimConfig
from moejax.train.step import make_train_step, router_states

SGD = optax.sgd(0.5, momentum=0.9)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32, reassociation only


def _lm(router="top_k", mod=False, remat="block", **kw):
  """A dense first block, MoE in every block after it (period 1: block 0
  unrolled, 3 periods); with MoD every other block, 7 blocks (period 2:
  blocks 0-1 unrolled, 2 periods, block 6 unrolled)."""
  options = {"top_k": {"k": 2}, "dtop_p": {}}[router]
  moe = MoEConfig(num_experts=4, expert_width=16,
                  router=routing.build(router, options), capacity_factor=4.0,
                  eval_capacity_factor=4.0)
  return LMConfig(num_layers=7 if mod else 4, d_model=32, num_heads=4,
                  d_ff=64, max_len=16, vocab_size=256, moe=moe,
                  first_dense_layers=1, remat=remat,
                  mod=MoDConfig(capacity=0.5) if mod else None, **kw)


def _scanned(cfg):
  return dataclasses.replace(cfg, scan_layers=True)


def _batch(batch=4, length=16, seed=0):
  tokens = np.random.default_rng(seed).integers(0, 256, (batch, length + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "mask": jnp.ones((batch, length), jnp.float32)}


def _init(cfg, mesh=None):
  run = TrainConfig(model=cfg, batch_size=4, seq_len=16, steps=3,
                    optim=OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                      total_steps=3))
  mesh = mesh or sharding.make_mesh(None, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state = build_state(run, TransformerLM(cfg), mesh)
  return jax.tree.map(jnp.asarray, jax.device_get(state))


def _restack(state, cfg):
  """An unrolled state in the scanned model's layout (fresh momentum)."""
  plan = scan.scan_plan(cfg)
  params = scan.stack_layers(state.params, plan)
  return state.replace(params=params, opt_state=SGD.init(params),
                       router_state=scan.stack_layers(state.router_state,
                                                      plan))


def test_plan_covers_every_pattern():
  assert scan.scan_plan(_lm()) is None  # scan off
  assert scan.scan_plan(_scanned(_lm())) == scan.ScanPlan(1, 1, 3)
  assert scan.scan_plan(_scanned(_lm(mod=True))) == scan.ScanPlan(2, 2, 2)
  # moe every 2nd, MoD every 3rd block: period 6, after 2 dense blocks
  cfg = dataclasses.replace(_lm(mod=True), num_layers=16, moe_every=2,
                            mod_every=3, first_dense_layers=2,
                            scan_layers=True)
  assert scan.scan_plan(cfg) == scan.ScanPlan(6, 6, 1)
  for i in range(16):
    if 6 <= i < 12:  # body block j is built as block 6 + j: same kind
      j = (i - 6) % 6
      assert cfg.is_moe_layer(i) == cfg.is_moe_layer(6 + j)
      assert cfg.is_mod_layer(i) == cfg.is_mod_layer(6 + j)
  # fewer blocks than a period after the prefix: everything unrolled
  assert scan.scan_plan(dataclasses.replace(cfg, num_layers=8)) is None
  with pytest.raises(ValueError, match=r"^scan_layers='yes' is not allowed"):
    LMConfig(scan_layers="yes")


@pytest.mark.parametrize("mod", [False, True])
def test_stack_unstack_round_trip_and_logical_names(mod):
  cfg = _scanned(_lm(mod=mod))
  tokens = _batch()["inputs"]
  boxed, _ = jax.eval_shape(
      lambda: TransformerLM(cfg).init(jax.random.key(0), tokens))["params"], None
  plan = scan.scan_plan(cfg)
  body = boxed[plan.name]["block_0"]["attn"]["query"]["kernel"]
  assert body.names[0] == "layers" and body.value.shape[0] == plan.periods
  state = _init(_lm(mod=mod))
  stacked = scan.stack_layers(state.params, plan)
  assert jax.tree.structure(stacked) == jax.tree.structure(nn.unbox(boxed))
  chex.assert_trees_all_equal(scan.unstack_layers(stacked), state.params)
  assert scan.scan_plan_of(stacked) == plan
  mesh = sharding.make_mesh("fsdp:2,expert:4")
  spec = sharding.param_spec(body.names, body.value.shape, mesh)
  assert spec[0] is None and "fsdp" in str(spec)  # layers never sharded


@pytest.mark.parametrize("mod", [False, True])
def test_scanned_logits_and_gradients_equal_unrolled(mod):
  cfg = _lm(mod=mod)
  state = _init(cfg)
  scanned = _restack(state, _scanned(cfg))
  batch = _batch()

  def loss(params, model, router_state):
    logits = model.apply({"params": params, "router_state": router_state},
                         batch["inputs"], train=True, rngs={"router": jax.random.key(0)},
                         mutable=["router"])[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, ref), ref_grads = jax.value_and_grad(loss, has_aux=True)(
      state.params, TransformerLM(cfg), state.router_state)
  (_, got), grads = jax.value_and_grad(loss, has_aux=True)(
      scanned.params, TransformerLM(_scanned(cfg)), scanned.router_state)
  np.testing.assert_allclose(got, ref, **TOL)
  chex.assert_trees_all_close(scan.unstack_layers(grads), ref_grads, **TOL)


@pytest.mark.parametrize("router, mod", [("top_k", False), ("dtop_p", False),
                                         ("top_k", True)])
def test_scanned_train_steps_equal_unrolled(router, mod):
  """2 SGD steps: the same losses, metrics (per-layer fanout included),
  params and controller state (DTop-p's per-layer PI state)."""
  cfg = _lm(router, mod)
  state = _init(cfg).replace(opt_state=None)
  state = state.replace(opt_state=SGD.init(state.params))
  runs = []
  for model_cfg, start in ((cfg, state),
                           (_scanned(cfg), _restack(state, _scanned(cfg)))):
    step = make_train_step(TransformerLM(model_cfg), SGD,
                           model_cfg.moe.router, donate=False)
    metrics = []
    for i in range(2):
      start, m = step(start, _batch(seed=i))
      metrics.append(jax.device_get(m))
    runs.append((jax.device_get(start), metrics))
  (ref, ref_metrics), (got, got_metrics) = runs
  assert set(got_metrics[0]) == set(ref_metrics[0])
  for a, b in zip(got_metrics, ref_metrics):
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(scan.unstack_layers(got.params), ref.params,
                              rtol=1e-4, atol=1e-5)
  got_states, ref_states = (router_states(got.router_state),
                            router_states(ref.router_state))
  assert got_states.keys() == ref_states.keys()
  chex.assert_trees_all_close(got_states, ref_states, rtol=1e-4, atol=1e-5)
  if router == "dtop_p":  # the controllers moved, per layer
    assert len(ref_states) == 3
    assert not np.allclose(
        jax.tree.leaves(ref_states)[0],
        jax.tree.leaves(router_states(state.router_state))[0])


@pytest.mark.parametrize("mod", [False, True])
def test_scanned_cached_decoding_equals_unrolled(mod):
  cfg = _lm(mod=mod, remat="none")
  state = _init(cfg)
  scanned = _restack(state, _scanned(cfg))
  cache = init_cache(_scanned(cfg), 2, 12)
  assert scan.scan_plan(_scanned(cfg)).name in cache
  prompt = _batch(batch=2)["inputs"][:, :4]
  ref = decode.generate(cfg, state.params, state.router_state, prompt, 6)
  got = decode.generate(_scanned(cfg), scanned.params, scanned.router_state,
                        prompt, 6)
  np.testing.assert_array_equal(got, ref)
  # and the decisions of the routed blocks, in block order
  outs = [TransformerLM(c).apply(
      {"params": p}, prompt, jnp.int32(0), init_cache(c, 2, 12),
      method=TransformerLM.decode) for c, p in
      ((cfg, state.params), (_scanned(cfg), scanned.params))]
  np.testing.assert_allclose(outs[1][0], outs[0][0], **TOL)
  np.testing.assert_array_equal(outs[1][2], outs[0][2])
  if mod:  # the routed blocks' predictor calibration, layer by layer
    ref = decode.calibrate_predictor(TransformerLM(cfg), state.params, prompt,
                                     0.5)
    got = decode.calibrate_predictor(TransformerLM(_scanned(cfg)),
                                     scanned.params, prompt, 0.5)
    chex.assert_trees_all_close(scan.unstack_layers(got), ref, **TOL)


def test_scanned_model_trains_on_fsdp_expert_mesh():
  """3 steps on fsdp:2,expert:4 equal one device's; the stacked expert
  weights stay split E over expert, D over fsdp, the layers axis whole."""
  cfg = _scanned(_lm())
  mesh = sharding.make_mesh("fsdp:2,expert:4")
  host = _init(cfg)
  host = host.replace(opt_state=SGD.init(host.params))
  results = []
  for m in (sharding.make_mesh(None, jax.devices()[:1]), mesh):
    run = TrainConfig(model=cfg, batch_size=8, seq_len=16, steps=3, mesh=None)
    from moejax.train.loop import state_shardings
    shards = state_shardings(run, TransformerLM(cfg), m)
    state = jax.device_put(host.replace(opt_state=()),
                           shards.replace(opt_state=()))
    state = state.replace(opt_state=optax.tree_map_params(
        SGD, jax.device_put, host.opt_state, shards.params,
        transform_non_params=lambda x, m=m: jax.device_put(
            x, sharding.replicated(m))))
    with jax.set_mesh(m):
      step = make_train_step(TransformerLM(cfg), SGD, cfg.moe.router,
                             donate=False, state_sharding=jax.tree.map(
                                 lambda x: x.sharding, state))
      losses = []
      for i in range(3):
        batch = sharding.put_batch(
            jax.device_get(_batch(batch=8)),
            sharding.batch_sharding(m))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    results.append((state, losses))
  (ref, ref_losses), (got, losses) = results
  w_in = got.params["scan_1_1"]["block_0"]["mlp"]["experts"]["w_in"]
  assert w_in.sharding.spec[:3] == (None, "expert", "fsdp"), w_in.sharding
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(got.params),
                              jax.device_get(ref.params), rtol=1e-4, atol=1e-5)
  assert losses[-1] < losses[0]


def test_run_flipping_scan_layers_on_resume_is_one_clear_error(tmp_path):
  """A scanned run trains, evaluates and samples through the loop; resuming
  its workdir unrolled (a checkpoint of the other layout) is one line
  naming the field, and the checkpoints stay put."""
  from test_train import tiny_config

  from moejax.train import loop
  from moejax.train.checkpoint import Checkpointer
  cfg = tiny_config(steps=2, checkpoint_every=2, eval_every=2, sample_tokens=4)
  cfg = dataclasses.replace(cfg, model=_scanned(cfg.model))
  loop.train(cfg, str(tmp_path))
  unrolled = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, scan_layers=False))
  with pytest.raises(ValueError, match=(
      r"^workdir='.*' holds a run of another configuration \(stored -> new: "
      r"model\.scan_layers: true -> false\); its checkpoints do not fit")):
    loop.train(unrolled, str(tmp_path))
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]
