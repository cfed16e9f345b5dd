"""Every registered router: the MoE layer's forward and gradient on a
data:2,expert:2,model:2 mesh of 8 forced host devices match the unsharded
layer.

Routing runs outside the expert path in both expert-parallel modes (GSPMD
partitions it the same way), so each router is checked in one mode and the
routers alternate between "gspmd" and "shard_map"; both modes of the expert
path are checked for every dispatch layout in test_sharding.py."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing, sharding
from moejax.nn.moe import MoE, MoEConfig

ROUTERS = routing.available()
MODES = {name: ("gspmd", "shard_map")[i % 2] for i, name in enumerate(ROUTERS)}


def _loss_and_grad(layer):
  def f(params, router_state, x, rng):
    variables = {"params": params}
    if router_state:
      variables["router_state"] = router_state
    y, _ = layer.apply(variables, x, train=True, rngs={"router": rng},
                       mutable=["router"])
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * weights), y
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _variables(layer, x, method, num_experts):
  """Params drawn from numpy at the shapes of `init` (no init compile), the
  method's initial controller state."""
  shapes = jax.eval_shape(lambda: layer.init(
      {"params": jax.random.PRNGKey(1), "router": jax.random.PRNGKey(2)}, x,
      train=True))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (np.ones(s.shape, np.float32) if len(s.shape) < 2 else
                 rng.normal(0, 0.3, s.shape).astype(np.float32)),
      nn.meta.unbox(shapes["params"]))
  state = method.init_state(num_experts)
  return params, ({"state": state} if state else {}), shapes["params"]


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_sharded_forward_and_grad_match(router):
  mode = MODES[router]
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 32))
  rng = jax.random.PRNGKey(3)
  mesh = sharding.make_mesh("data:2,expert:2,model:2")
  method = routing.build(router, {"k": 2})
  cfg = MoEConfig(num_experts=8, expert_width=16, router=method,
                  capacity_factor=1.0, expert_parallel=mode)
  layer = MoE(cfg, d_model=32)
  params, router_state, boxed = _variables(layer, x, method, 8)
  step = _loss_and_grad(layer)
  (ref_loss, ref_y), ref_grads = step(params, router_state, x, rng)
  with jax.set_mesh(mesh):
    shards = sharding.param_shardings(boxed, mesh)
    (loss, y), grads = step(jax.device_put(params, shards), router_state,
                            jax.device_put(x, sharding.batch_sharding(mesh)),
                            rng)
  assert y.sharding.spec[0] == ("data", "expert")
  w_in = grads["experts"]["w_in"]
  assert w_in.sharding.spec == jax.sharding.PartitionSpec("expert", None,
                                                          "model")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-4,
                             atol=1e-5, err_msg=mode)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4,
                             atol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(y).sum()) > 0
  assert float(jnp.abs(grads["router"]).sum()) > 0
