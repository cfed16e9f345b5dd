"""Controller statistics are reduced over the whole mesh: 8-way data parallel
keeps one identical controller state on every replica, equal to the
single-device run. And the pure routers + dispatchers run under `jax.pmap`."""
import chex
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import dispatch, routing, sharding
from moejax.experts import ffn as expert_ffn
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.state import TrainState
from moejax.train.step import make_train_step, router_states

OPTIMIZER = optax.sgd(0.3)

# Controller-bearing methods registered today (others may join the registry).
CONTROLLED = [("dtop_p", {}), ("expert_threshold", {"et_warmup_steps": 1}),
              ("loss_free", {"bias_update_rate": 0.05})]
CONTROLLED = [(n, o) for n, o in CONTROLLED if n in routing.available()]


def _config(router, options):
  method = routing.build(router, {"k": 2, **options})
  moe = MoEConfig(num_experts=8, expert_width=16, router=method,
                  capacity_factor=2.0)
  model = LMConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=16,
                   moe=moe)
  return TrainConfig(model=model, batch_size=16, seq_len=16, steps=3)


def _batches(n=2, batch=16, length=16):
  rng = np.random.default_rng(1)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 64, (batch, length + 1))
    out.append({"inputs": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "mask": np.ones((batch, length), np.float32)})
  return out


def _initial_state(cfg):
  """A TrainState for plain SGD with params drawn by numpy at `init`'s shapes
  and every layer's initial controller state (no init compile), plus the
  boxed param shapes (for their shardings)."""
  model = TransformerLM(cfg.model)
  tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "router": jax.random.PRNGKey(0)},
      tokens, train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (np.ones(s.shape, np.float32) if len(s.shape) < 2 else
                 rng.normal(0, 0.1, s.shape).astype(np.float32)),
      nn.meta.unbox(shapes["params"]))
  method = cfg.model.moe.router
  paths = router_states(shapes.get("router_state", {}))
  router_state = flax.traverse_util.unflatten_dict(
      {path + ("state",): method.init_state(cfg.model.moe.num_experts)
       for path in paths})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=OPTIMIZER.init(params),
                     router_state=router_state, rng=jax.random.PRNGKey(0),
                     data_index=jnp.zeros((), jnp.int32))
  return state, shapes["params"]


def _train(cfg, mesh, init_state, boxed, batches):
  model = TransformerLM(cfg.model)
  with jax.set_mesh(mesh):
    shards = jax.tree.map(lambda _: sharding.replicated(mesh), init_state)
    shards = shards.replace(params=sharding.param_shardings(boxed, mesh))
    state = jax.device_put(init_state, shards)
    step = make_train_step(model, OPTIMIZER, cfg.model.moe.router,
                           donate=False)
    history = []
    for batch in batches:
      state, _ = step(state, sharding.put_batch(batch,
                                                sharding.batch_sharding(mesh)))
      history.append(state.router_state)
  return history


@pytest.mark.parametrize("router, options", CONTROLLED,
                         ids=[n for n, _ in CONTROLLED])
def test_data_parallel_controller_state_identical_and_matches_one_device(
    router, options):
  cfg = _config(router, options)
  init, boxed = _initial_state(cfg)
  assert init.router_state, f"{router} keeps no controller state"
  batches = _batches()
  single = _train(cfg, sharding.make_mesh(None, jax.devices()[:1]), init,
                  boxed, batches)
  multi = _train(cfg, sharding.make_mesh("data:8"), init, boxed, batches)
  moved = False
  for step, (one, eight) in enumerate(zip(single, multi)):
    for leaf in jax.tree.leaves(eight):
      assert len(leaf.addressable_shards) == 8
      first = np.asarray(leaf.addressable_shards[0].data)
      for shard in leaf.addressable_shards[1:]:  # one state on every replica
        np.testing.assert_array_equal(np.asarray(shard.data), first)
    chex.assert_trees_all_close(jax.device_get(eight), jax.device_get(one),
                                rtol=1e-5, atol=1e-6)
    moved |= any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(one)),
        jax.tree.leaves(jax.device_get(init.router_state))))
  assert moved, "the controller state never changed; the test is vacuous"
  assert router_states(jax.device_get(multi[-1]))


def test_router_and_dispatch_under_pmap_match_unmapped():
  """top_k + index dispatch + experts, one group per device under pmap."""
  n, s, e, d, f = jax.device_count(), 8, 4, 8, 6
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = jax.random.normal(k0, (n, s, e))
  x = jax.random.normal(k1, (n, s, d))
  w = jax.random.normal(k2, (3, e, d, f)) * 0.3
  weights = {"w_in": w[0], "w_gate": w[1], "w_out": w[2].transpose(0, 2, 1)}

  def one_group(logits, x, weights):
    out = routing.top_k(logits, 2)
    results = {}
    for strategy in dispatch.STRATEGIES:
      plan = dispatch.plan(out.routing, 4, strategy=strategy, max_fanout=2)
      results[strategy] = (expert_ffn(plan, x, weights), plan.kept)
    return out.routing.gates, out.metrics["expert_load"], results

  mapped = jax.pmap(one_group, in_axes=(0, 0, None))(logits, x, weights)
  unmapped_fn = jax.jit(one_group)
  unmapped = [unmapped_fn(logits[i], x[i], weights) for i in range(n)]
  ref = jax.tree.map(lambda *xs: np.stack(xs), *unmapped)
  chex.assert_trees_all_close(jax.device_get(mapped), ref, rtol=1e-5,
                              atol=1e-6)
  assert (np.asarray(mapped[2]["dropless"][1]).sum(axis=(1, 2)) == 2 * s).all()
  np.testing.assert_array_equal(np.asarray(mapped[2]["index"][1]),
                                np.asarray(mapped[2]["einsum"][1]))
