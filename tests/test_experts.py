"""The expert MLP and `experts.ffn` on every dispatch path.

Axis legend:
  S  tokens in one group
  E  experts
  D  model width
  F  expert width

`ffn` takes the fused CPU block loop for the "gather" and "sorted" plans and
dispatch -> `mlp` -> combine for the others; both must agree with the one-hot
"einsum" reference. `DenseFFN` is the same `mlp` on unbatched kernels: one
expert that every token routes to with gate 1.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dispatch, experts
from moejax.routing import Routing, top_k
from test_dispatch_fast import assert_close


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_expert_ffn_matches_einsum(activation):
  # experts.ffn takes the plans' fused CPU block loop (`row_blocks`): values and
  # gradients against the one-hot "einsum" plan, with drops (C = 12 < 16
  # assignments per expert on average), blocks not dividing C (padded
  # slots), remat, and the dropless "sorted" path against "ragged".
  s, d, f, e, k = 32, 6, 5, 4, 2
  keys = jax.random.split(jax.random.PRNGKey(8), 5)
  logits = jax.random.normal(keys[0], (s, e)) * 2
  x = jax.random.normal(keys[1], (s, d))
  w = {"w_in": jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d),
       "w_gate": jax.random.normal(keys[3], (e, d, f)) / np.sqrt(d),
       "w_out": jax.random.normal(keys[4], (e, f, d)) / np.sqrt(f)}

  def loss(logits, x, w, strategy, capacity, remat=False, block_size=None):
    routing = top_k(logits, k).routing
    p = dispatch.plan(routing, capacity, strategy=strategy, max_fanout=k,
                      block_size=block_size)
    y = experts.ffn(p, x, w, activation, remat=remat)
    return jnp.sum(y * jnp.cos(y))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                 static_argnums=(3, 4, 5, 6))
  cases = [("gather", 12, "einsum", {"block_size": 8, "remat": True}),
           ("sorted", 1, "ragged", {"block_size": 3})]
  if activation == "swiglu":
    cases += [("gather", 12, "einsum", {}),  # one block of 16 per expert
              ("gather", 40, "einsum", {"block_size": 16}),
              ("sorted", 1, "ragged", {"block_size": 8, "remat": True})]
  for strategy, capacity, reference, kwargs in cases:
    p = jax.eval_shape(lambda lg: dispatch.plan(  # block_loop is static
        top_k(lg, k).routing, capacity, strategy=strategy, max_fanout=k,
        block_size=kwargs.get("block_size")), logits)
    assert p.block_loop  # the fused path runs on CPU
    got = grad(logits, x, w, strategy, capacity, kwargs.get("remat", False),
               kwargs.get("block_size"))
    want = grad(logits, x, w, reference, capacity, False, None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(a, b, rtol=2e-4, atol=2e-5)
  # Two groups of 16 tokens, capacity 6 per group and expert.
  def grouped(logits, x, w, strategy):
    routing = top_k(logits, k).routing
    if strategy == "gather":
      p = dispatch.plan(routing, 6, strategy=strategy, max_fanout=k,
                        num_groups=2, block_size=4)
      y = experts.ffn(p, x, w, activation)
    else:
      halves = lambda a: a.reshape(2, s // 2, *a.shape[1:])  # noqa: E731
      y = jax.vmap(lambda r, xg: experts.ffn(
          dispatch.plan(r, 6, strategy=strategy), xg, w, activation))(
              jax.tree.map(halves, routing), halves(x)).reshape(x.shape)
    return jnp.sum(y * jnp.cos(y))
  grouped_grad = jax.jit(jax.value_and_grad(grouped, argnums=(0, 1, 2)),
                         static_argnums=3)
  got = grouped_grad(logits, x, w, "gather")
  want = grouped_grad(logits, x, w, "einsum")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(a, b, rtol=2e-4, atol=2e-5)
  kept, routed = jax.jit(lambda lg: (
      dispatch.plan(top_k(lg, k).routing, 12, strategy="gather",
                    max_fanout=k).kept, top_k(lg, k).routing.routed))(logits)
  assert not np.asarray(kept)[np.asarray(routed)].all()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dense_ffn_is_one_routed_expert(activation):
  s, d, f = 8, 6, 5
  x = jax.random.normal(jax.random.PRNGKey(0), (s, d))
  dense = experts.DenseFFN(d, f, activation)
  # Eager init: its random programs are cached per shape across the cases.
  params = dense.init(jax.random.PRNGKey(1), x)
  want = jax.jit(dense.apply)(params, x)
  kernels = {name: nn.unbox(p["kernel"]) for name, p in params["params"].items()}
  assert_close(jax.jit(lambda x, w: experts.mlp(x, w, activation))(x, kernels),
               want)
  stacked = {name: k[None] for name, k in kernels.items()}  # E = 1
  ones = jnp.ones((s, 1))
  ffn = jax.jit(lambda x, w, strategy: experts.ffn(
      dispatch.plan(Routing(ones, ones), s, strategy=strategy), x, w,
      activation), static_argnums=2)
  for strategy in ("einsum", "gather", "sorted"):
    assert_close(ffn(x, stacked, strategy), want)


def test_weights_and_activation_validation():
  shapes = experts.weight_shapes(4, 6, 5, "swiglu")
  assert shapes == {"w_in": (4, 6, 5), "w_out": (4, 5, 6),
                    "w_gate": (4, 6, 5)}
  assert "w_gate" not in experts.weight_shapes(4, 6, 5, "gelu")
  params = jax.eval_shape(experts.Experts(4, 6, 5).init,  # shapes and names
                          jax.random.PRNGKey(0))["params"]
  for name, shape in shapes.items():
    assert params[name].value.shape == shape
    assert params[name].names == experts.WEIGHT_AXES[name]
  with pytest.raises(ValueError, match="activation='relu'"):
    experts.activate("relu", jnp.ones(3))
  with pytest.raises(ValueError, match="activation='relu'"):
    experts.packed_activation("relu")
