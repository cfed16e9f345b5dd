"""The MoE layer and the LM against simple references.

Inits, forward passes and references run under jit (one compile each instead
of one per primitive).
"""
import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routing import ExpertChoice, TopK
from moejax.models import LMConfig, TransformerLM
from moejax.models.lm import init_variables
from moejax.nn import MoE, MoEConfig
from moejax.train.step import router_outputs


@functools.partial(jax.jit, static_argnums=(2, 3))
def moe_reference(params, x, k, num_shared=0):
  """Dense reference: every expert on every token, weighted by top-k gates."""
  logits = x.reshape(-1, x.shape[-1]) @ params["router"]
  probs = jax.nn.softmax(logits, -1)
  top, idx = jax.lax.top_k(probs, k)
  gates = jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], idx].set(
      top / top.sum(-1, keepdims=True))
  w = params["experts"]
  xf = x.reshape(-1, x.shape[-1])
  h = jax.nn.silu(jnp.einsum("sd,edf->esf", xf, w["w_gate"])) * jnp.einsum(
      "sd,edf->esf", xf, w["w_in"])
  y = jnp.einsum("esf,efd->esd", h, w["w_out"])
  return jnp.einsum("se,esd->sd", gates, y).reshape(x.shape)


def _init_apply(cfg, x, train):
  """(params, y, router collection) of an `MoE(cfg, 16)` layer on x, jitted."""
  layer = MoE(cfg, d_model=16)
  params = nn.meta.unbox(jax.jit(lambda x: layer.init(
      {"params": jax.random.PRNGKey(1)}, x, train=train)["params"])(x))
  y, coll = jax.jit(lambda p, x: layer.apply({"params": p}, x, train=train,
                                             mutable=["router"]))(params, x)
  return params, y, coll


def _train_outputs(cfg, x=None):
  """The router outputs of one training forward pass of an `MoE(cfg, 16)` layer."""
  if x is None:
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16))
  _, _, coll = _init_apply(cfg, x, train=True)
  (out,) = router_outputs(coll["router"]).values()
  return out


@pytest.mark.parametrize("strategy", ["einsum", "index", "dropless"])
def test_moe_layer_matches_dense_reference(strategy):
  cfg = MoEConfig(num_experts=4, expert_width=8, router=TopK(k=2),
                  capacity_factor=4.0, strategy=strategy)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16))
  params, y, coll = _init_apply(cfg, x, train=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(moe_reference(params, x, 2)),
                             rtol=1e-4, atol=1e-5)
  layers = router_outputs(coll["router"])
  (metrics,) = [v["metrics"] for v in layers.values()]
  assert float(metrics["drop_fraction"]) == 0.0
  np.testing.assert_allclose(float(metrics["experts_per_token"]), 2.0)


def test_moe_aux_loss_uses_configured_weights():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  base = MoEConfig(num_experts=4, expert_width=8)
  outs = {}
  for lb, z in [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]:
    cfg = dataclasses.replace(base, load_balance_weight=lb, z_loss_weight=z,
                              entropy_weight=0.0)
    outs[(lb, z)] = _train_outputs(cfg, x)
  np.testing.assert_allclose(float(outs[(1.0, 0.0)]["aux_loss"]),
                             float(outs[(1.0, 0.0)]["aux"]["load_balance"]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(outs[(0.0, 1.0)]["aux_loss"]),
                             float(outs[(0.0, 1.0)]["aux"]["z_loss"]), rtol=1e-6)
  assert float(outs[(0.0, 0.0)]["aux_loss"]) == 0.0


def test_shared_expert_adds_dense_ffn():
  cfg = MoEConfig(num_experts=4, expert_width=8, num_shared=1,
                  capacity_factor=4.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 16))
  params, y, _ = _init_apply(cfg, x, train=False)

  @jax.jit
  def reference(params, x):
    shared = params["shared"]
    h = jax.nn.silu(x @ shared["w_gate"]["kernel"]) * (
        x @ shared["w_in"]["kernel"])
    return moe_reference(params, x, 2) + h @ shared["w_out"]["kernel"]
  want = reference(params, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4,
                             atol=1e-5)


def test_groups_and_capacity_drop_reported():
  cfg = MoEConfig(num_experts=4, expert_width=8, capacity_factor=0.25,
                  group_size=8)
  out = _train_outputs(cfg)
  m = out["metrics"]
  assert float(m["capacity"]) == 4.0  # ceil(.25*8*2/4)=1 -> multiple of 4
  assert float(m["drop_fraction"]) > 0.0
  assert float(m["kept_per_token"]) < 2.0


def test_param_logical_axes():
  cfg = LMConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=16,
                 moe=MoEConfig(num_experts=4, expert_width=16), moe_every=2)
  # Shapes and partitioning only: traced, not compiled.
  params, router_state = jax.eval_shape(lambda: init_variables(
      TransformerLM(cfg), jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)))
  specs = nn.get_partition_spec(params)
  assert specs["layers_1"]["mlp"]["experts"]["w_in"] == jax.sharding.PartitionSpec(
      "expert", "embed", "mlp")
  assert "experts" not in params["layers_0"]["mlp"]  # dense layer
  assert router_state == {}


def test_lm_is_causal():
  cfg = LMConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=16,
                 moe=MoEConfig(num_experts=4, expert_width=16,
                               eval_capacity_factor=8.0))
  model = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, 256)
  params, _ = init_variables(model, jax.random.PRNGKey(1), tokens)
  params = nn.meta.unbox(params)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                             mutable=["router"])[0])
  a = forward(params, tokens)
  b = forward(params, tokens.at[0, 10].set(7))
  np.testing.assert_allclose(np.asarray(a[0, :10]), np.asarray(b[0, :10]),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(a[0, 10:]), np.asarray(b[0, 10:]))


def test_expert_choice_layer_balanced():
  cfg = MoEConfig(num_experts=4, expert_width=8, router=ExpertChoice(k=2))
  out = _train_outputs(cfg)
  np.testing.assert_allclose(np.asarray(out["metrics"]["expert_load"]), 0.25)
  assert float(out["metrics"]["drop_fraction"]) == 0.0


@pytest.mark.parametrize("field,value,match", [
    ("num_experts", 0, "num_experts=0"),
    ("capacity_factor", 0.0, "capacity_factor=0.0"),
    ("capacity_factor", -1.0, "capacity_factor=-1.0"),
    ("strategy", "nope", "strategy='nope'"),
    ("router", TopK(k=9), "k=9"),
])
def test_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    MoEConfig(**{field: value})


def test_bf16_activations_keep_f32_routing():
  cfg = LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=8,
                 moe=MoEConfig(num_experts=4, expert_width=16), dtype="bfloat16")
  model = TransformerLM(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params, _ = init_variables(model, jax.random.PRNGKey(0), tokens)
  logits, coll = jax.jit(lambda p, t: model.apply(
      {"params": p}, t, train=True, mutable=["router"]))(
          nn.meta.unbox(params), tokens)
  assert logits.dtype == jnp.float32
  (out,) = router_outputs(coll["router"]).values()
  chex.assert_type(out["metrics"]["expert_load"], jnp.float32)
  chex.assert_tree_all_finite(logits)
