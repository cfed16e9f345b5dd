"""Every registered router: the MoE layer's forward and gradient on a
data:2,expert:2,model:2 mesh of 8 forced host devices, with GSPMD constraints
and with the shard_map all-to-all, match the unsharded layer."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import methods, sharding
from moejax.nn.moe import MoE, MoEConfig


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


@pytest.mark.parametrize("router", methods.available())
def test_every_router_sharded_forward_and_grad_match(router):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 32))
  rng = jax.random.PRNGKey(3)
  mesh = sharding.make_mesh("data:2,expert:2,model:2")
  ref = variables = None
  for mode in ("gspmd", "shard_map"):
    cfg = MoEConfig(num_experts=8, expert_width=16,
                    router=methods.build(router, {"k": 2}),
                    capacity_factor=1.0, expert_parallel=mode)
    layer = MoE(cfg, d_model=32)
    if variables is None:  # the same params for both modes
      variables = jax.jit(lambda r: layer.init(
          {"params": r, "router": rng}, x, train=True))(jax.random.PRNGKey(1))
      params = nn.meta.unbox(variables["params"])
      router_state = variables.get("router_state", {})
    step = _loss_and_grad(layer)
    if ref is None:  # without a mesh both modes are the same local program
      ref = step(params, router_state, x, rng)
    with jax.set_mesh(mesh):
      shards = sharding.param_shardings(variables["params"], mesh)
      (loss, y), grads = step(jax.device_put(params, shards), router_state,
                              jax.device_put(x, sharding.batch_sharding(mesh)),
                              rng)
    (ref_loss, ref_y), ref_grads = ref
    assert y.sharding.spec[0] == ("data", "expert")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-4,
                               atol=1e-5, err_msg=mode)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4,
                               atol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(y).sum()) > 0
