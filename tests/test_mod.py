"""Mixture-of-Depths: selection, skipping, gradients, FLOPs, cached decoding, MoDE."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import configs, decode, flops, sample as sample_lib
from moejax.cli import lm_flags
from moejax.routing import ExpertChoice, TopK
from moejax.models.lm import (LMConfig, TransformerLM, init_cache,
                              init_variables)
from moejax.nn.attention import Attention, init_kv
from moejax.nn.blocks import Block
from moejax.nn.mod import (PAD_POSITION, MoDBlock, MoDConfig, gather_plan,
                           mod_routing, top_c_mask)
from moejax.nn.moe import MoE, MoEConfig
from moejax.train.step import router_outputs, summarize

B, L, D, HEADS, FF = 2, 16, 32, 4, 64


def _mod_block(**kw):
  cfg = MoDConfig(**{"capacity": 0.25, **kw})
  return MoDBlock(cfg, HEADS, FF)


def _init_block(block, x, pos):
  init = jax.jit(lambda x, pos: block.init(jax.random.PRNGKey(0), x, pos,
                                           train=False))
  return nn.meta.unbox(init(x, pos)["params"])


def _inputs(seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  return x, pos


def test_selection_is_top_c_in_original_order():
  logits = jax.random.normal(jax.random.PRNGKey(3), (B, L))
  cap = 5
  chosen = np.asarray(top_c_mask(logits, cap))
  for b in range(B):
    want = np.sort(np.argsort(-np.asarray(logits[b]), kind="stable")[:cap])
    np.testing.assert_array_equal(np.flatnonzero(chosen[b]), want)
  plan = gather_plan(mod_routing(logits, jnp.asarray(chosen), "raw"), cap)
  idx = np.asarray(plan.token_index[:, 0])
  for b in range(B):  # the dispatcher lays them out in their original order
    np.testing.assert_array_equal(idx[b], np.flatnonzero(chosen[b]))
  gates = np.asarray(plan.slot_gate[:, 0])
  np.testing.assert_allclose(gates, np.take_along_axis(np.asarray(logits), idx,
                                                       axis=1))


@pytest.mark.parametrize("score", ["raw", "sigmoid"])
def test_mod_block_matches_loop_reference(score):
  block = _mod_block(score=score)
  x, pos = _inputs()
  params = _init_block(block, x, pos)
  (out, chosen), state = block.apply(
      {"params": params}, x, pos, train=False, capture_intermediates=True,
      mutable=["intermediates"])
  cap = block.config.num_selected(L)
  # Only C tokens enter the wrapped block.
  delta = state["intermediates"]["block"]["__call__"][0][0]
  assert delta.shape == (B, cap, D)
  chosen = np.asarray(chosen)
  assert (chosen.sum(axis=1) == cap).all()
  # Skipped tokens pass unchanged, bit for bit.
  np.testing.assert_array_equal(np.asarray(out)[~chosen], np.asarray(x)[~chosen])
  # Loop reference: the plain Block on the gathered tokens, true positions.
  r = np.asarray(jnp.einsum("bld,d->bl", x, params["router"]))
  ref_block = Block(HEADS, FF, residual=False)
  want = np.array(x)
  for b in range(B):
    idx = np.sort(np.argsort(-r[b], kind="stable")[:cap])
    np.testing.assert_array_equal(np.flatnonzero(chosen[b]), idx)
    d, _ = ref_block.apply({"params": params["block"]}, x[b:b + 1, idx],
                           pos[b:b + 1, idx], train=False)
    s = r[b, idx] if score == "raw" else 1 / (1 + np.exp(-r[b, idx]))
    want[b, idx] += s[:, None] * np.asarray(d[0])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_gathered_block_uses_original_positions():
  """A chosen token's update equals the full block's on the chosen subsequence
  with its true positions, not on positions 0..C-1."""
  block = _mod_block()
  x, pos = _inputs(1)
  params = _init_block(block, x, pos)
  (out, chosen) = block.apply({"params": params}, x, pos, train=False)
  idx = np.flatnonzero(np.asarray(chosen[0]))
  wrong_pos = jnp.arange(len(idx))[None]
  d, _ = Block(HEADS, FF, residual=False).apply(
      {"params": params["block"]}, x[:1, idx], wrong_pos, train=False)
  r = jnp.einsum("d,ld->l", params["router"], x[0, idx])
  assert not np.allclose(np.asarray(out[0, idx]),
                         np.asarray(x[0, idx] + r[:, None] * d[0]), atol=1e-4)


@pytest.mark.parametrize("score", ["raw", "sigmoid"])
def test_gradient_reaches_router_through_score(score):
  block = _mod_block(score=score, aux_weight=0.0)
  x, pos = _inputs(2)
  params = _init_block(block, x, pos)
  target = jax.random.normal(jax.random.PRNGKey(9), (B, L, D))

  def loss(router):
    p = {**params, "router": router}
    out, _ = block.apply({"params": p}, x, pos, train=False)
    return jnp.sum((out - target) ** 2)
  g = jax.grad(loss)(params["router"])
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-3
  # Finite differences agree (a small step keeps the same selection).
  eps = 1e-3
  num = (loss(params["router"].at[0].add(eps))
         - loss(params["router"].at[0].add(-eps))) / (2 * eps)
  np.testing.assert_allclose(g[0], num, rtol=2e-2, atol=2e-2)


def test_predictor_and_router_bce_metrics():
  block = _mod_block()
  x, pos = _inputs(4)
  params = _init_block(block, x, pos)
  _, coll = block.apply({"params": params}, x, pos, train=False,
                        mutable=["router"])
  m = coll["router"]["metrics"][0]
  assert float(m["mod_capacity"]) == pytest.approx(0.25)
  for key in ("mod_pred_accuracy", "mod_pred_precision", "mod_pred_recall",
              "mod_router_accuracy", "mod_causal_capacity"):
    assert 0.0 <= float(m[key]) <= 1.0, key
  aux = coll["router"]["aux"][0]
  want = (block.config.aux_weight * aux["mod_router_bce"]
          + block.config.predictor_weight * aux["mod_predictor_bce"])
  np.testing.assert_allclose(coll["router"]["aux_loss"][0], want, rtol=1e-6)
  # The predictor's loss does not reach the block's input.
  def pred_loss(x):
    _, c = block.apply({"params": params}, x, pos, train=False,
                       mutable=["router"])
    return c["router"]["aux"][0]["mod_predictor_bce"]
  assert np.abs(jax.grad(pred_loss)(x)).max() == 0.0


def test_predictor_trains():
  """BCE training of the predictor alone reaches high top-C accuracy."""
  block = MoDBlock(MoDConfig(capacity=0.125), HEADS, FF)
  x = jax.random.normal(jax.random.PRNGKey(5), (8, 64, D))
  pos = jnp.broadcast_to(jnp.arange(64), (8, 64))
  params = _init_block(block, x[:1], pos[:1])
  opt = optax.adam(1e-2)

  def metrics(pred_params, xs, ps):
    p = {**params, "predictor": pred_params}
    _, c = block.apply({"params": p}, xs, ps, train=False, mutable=["router"])
    return c["router"]["aux"][0]["mod_predictor_bce"], c["router"]["metrics"][0]

  @jax.jit
  def step(pp, s):
    (l, _), g = jax.value_and_grad(metrics, has_aux=True)(pp, x, pos)
    u, s = opt.update(g, s)
    return optax.apply_updates(pp, u), s

  pp, s = params["predictor"], opt.init(params["predictor"])
  x_val = jax.random.normal(jax.random.PRNGKey(6), (8, 64, D))
  evaluate = jax.jit(metrics)
  before = float(evaluate(pp, x_val, pos)[1]["mod_pred_accuracy"])
  for _ in range(120):
    pp, s = step(pp, s)
  after = evaluate(pp, x_val, pos)[1]
  assert float(after["mod_pred_accuracy"]) > 0.93 > before
  assert float(after["mod_pred_recall"]) > 0.6


def test_flops_ratio_and_counts():
  for kw in (dict(num_layers=4, d_model=128, num_heads=4, d_ff=512,
                  max_len=128),
             dict(num_layers=6, d_model=256, num_heads=8, d_ff=1024,
                  max_len=256)):
    dense = LMConfig(**kw)
    mod = LMConfig(**kw, mod=MoDConfig(capacity=0.125))
    ratio = (flops.flops_per_token(mod)["total"]
             / flops.flops_per_token(dense)["total"])
    assert ratio <= 0.60, ratio
  # Hand count of the tiny dense model: per layer 8D^2 + 4LD + 6DF; head 2DV.
  d, l, f, v = 128, 128, 512, 256
  want = 4 * (8 * d * d + 4 * l * d + 6 * d * f) + 2 * d * v
  assert flops.flops_per_token(LMConfig(num_layers=4, d_model=d, num_heads=4,
                                        d_ff=f, max_len=l))["total"] == want
  # A routed layer at C = L/8: c (8D^2 + 6DF) + c^2 4LD + router + predictor.
  cfg = LMConfig(num_layers=2, d_model=d, num_heads=4, d_ff=f, max_len=l,
                 mod=MoDConfig(capacity=0.125))
  c = 16 / 128
  routed = (c * (8 * d * d + 6 * d * f) + c * c * 4 * l * d + 2 * d
            + 2 * (d * d // 2 + d // 2))
  got = flops.flops_per_token(cfg)["layers"]
  assert got[0] == 8 * d * d + 4 * l * d + 6 * d * f
  assert got[1] == pytest.approx(routed)
  # No-op experts shrink the expert compute at the same fanout.
  moe = MoEConfig(num_experts=4, expert_width=64, router=TopK(k=2))
  base = flops.moe_flops(moe, 32, 64)
  noop = flops.moe_flops(dataclasses.replace(moe, num_noop_experts=4), 32, 64)
  assert noop["experts"] < base["experts"]
  assert flops.train_flops(cfg, 2, 128) == 3 * flops.forward_flops(cfg, 2, 128)


# ----------------------------------------------------------- cached decoding
MOE = MoEConfig(num_experts=4, expert_width=32, router=TopK(k=2),
                eval_capacity_factor=4.0)
# Without MoD: a dense model and a top-k MoE model (both layers full blocks).
# With MoD, layer 0 is a full block (dense MLP, or top-k MoE with no-op
# experts); layer 1 is routed: MoD with the router's causal rule, or staged
# MoDE (predictor rule, MoE MLP inside the routed block).
DECODE_CASES = {
    "dense": dict(),
    "moe_top_k": dict(moe=MOE),
    "mod_router": dict(mod=MoDConfig(capacity=0.25, causal="router")),
    "staged_mode": dict(mod=MoDConfig(capacity=0.25, causal="predictor"),
                        moe=dataclasses.replace(MOE, num_noop_experts=2)),
}


def _lm(seed=0, **kw):
  cfg = LMConfig(num_layers=2, d_model=D, num_heads=HEADS, d_ff=FF, max_len=24,
                 **kw)
  model = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (B, 20), 0, 256)
  params, rs = init_variables(model, jax.random.PRNGKey(seed), tokens)
  params = nn.meta.unbox(params)
  if cfg.mod is not None:  # make the causal rules pick a fraction, not all/none
    for i in range(cfg.num_layers):
      if cfg.is_mod_layer(i):
        p = params[f"layers_{i}"]
        p["predictor"]["out"]["bias"] = p["predictor"]["out"]["bias"] - 0.2
  return cfg, model, params, rs, tokens


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_cached_decoding_equals_causal_full_forward(case):
  cfg, model, params, rs, tokens = _lm(**DECODE_CASES[case])
  variables = {"params": params, "router_state": rs}
  full, inter = jax.jit(lambda v, t: model.apply(
      v, t, mod_routing="causal", capture_intermediates=True,
      mutable=["intermediates"]))(variables, tokens)
  prompt = 6
  cache = decode.init_cache(cfg, B, tokens.shape[1])
  logits, cache, dec = decode.prefill(cfg, params, rs, tokens[:, :prompt],
                                      cache)
  steps, decs = [logits], [dec]
  compiled = decode.decode_step._cache_size()
  for t in range(prompt, tokens.shape[1]):
    lt, cache, d = decode.decode_step(cfg, params, rs, tokens[:, t],
                                      jnp.int32(t), cache)
    steps.append(lt[:, None])
    decs.append(d[..., None])
  assert decode.decode_step._cache_size() <= compiled + 1  # static shapes
  got = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5,
                             rtol=1e-5)
  routed = [i for i in range(cfg.num_layers) if cfg.is_mod_layer(i)]
  if routed:
    decs = np.asarray(jnp.concatenate(decs, axis=-1))
    for j, i in enumerate(routed):
      chosen = inter["intermediates"][f"layers_{i}"]["__call__"][0][1]
      np.testing.assert_array_equal(decs[:, j], np.asarray(chosen))
      # The routed block stored keys/values only for the tokens it processed.
      pos = np.asarray(cache[i]["pos"])
      np.testing.assert_array_equal(pos != PAD_POSITION, np.asarray(chosen))
    assert 0 < decs.mean() < 1  # some tokens skipped, some processed
  else:
    assert all((np.asarray(c["pos"]) < PAD_POSITION).all() for c in cache)


def test_decode_skip_modes_agree_and_batch_one():
  cfg, _, params, rs, tokens = _lm(mod=MoDConfig(capacity=0.25))
  prompt = tokens[:1, :4]
  outs = {}
  for skip in decode.SKIPS:
    outs[skip] = decode.generate(cfg, params, rs, prompt, 10, skip=skip)
  np.testing.assert_array_equal(outs["cond"], outs["mask"])
  assert outs["cond"].shape == (1, 10)


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_model_decode_in_chunks_equals_full_forward(case):
  """`TransformerLM.decode` called directly, several tokens per call at
  positions > 0, gives the logits of one causal full forward pass."""
  cfg, model, params, rs, tokens = _lm(**DECODE_CASES[case])
  variables = {"params": params, "router_state": rs}
  full = jax.jit(lambda v, t: model.apply(v, t, mod_routing="causal"))(
      variables, tokens)
  kv = init_cache(cfg, B, tokens.shape[1])
  chunks, decisions = [], []
  decode_chunk = jax.jit(lambda v, t, start, kv: model.apply(
      v, t, start, kv, method=TransformerLM.decode))
  for start, stop in ((0, 7), (7, 8), (8, 15), (15, 20)):
    logits, kv, dec = decode_chunk(variables, tokens[:, start:stop],
                                   jnp.int32(start), kv)
    chunks.append(logits)
    decisions.append(dec)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(chunks, axis=1)),
                             np.asarray(full), atol=2e-5, rtol=1e-5)
  num_mod = sum(cfg.is_mod_layer(i) for i in range(cfg.num_layers))
  assert jnp.concatenate(decisions, axis=-1).shape == (B, num_mod, 20)


def test_attention_cache_matches_attention_without_cache():
  attn = Attention(num_heads=HEADS)
  x, pos = _inputs(3)
  variables = attn.init(jax.random.PRNGKey(0), x, pos)
  want, none = attn.apply(variables, x, pos)
  assert none is None
  kv = init_kv(B, L + 3, HEADS, D // HEADS)
  got = []
  for start, stop in ((0, 5), (5, 6), (6, L)):
    out, kv = attn.apply(variables, x[:, start:stop], pos[:, start:stop], kv)
    got.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)),
                             np.asarray(want), atol=1e-5, rtol=1e-5)
  assert (np.asarray(kv["pos"][:, L:]) == PAD_POSITION).all()  # unused slots
  with pytest.raises(ValueError, match="causal=False"):
    Attention(num_heads=HEADS, causal=False).apply(variables, x, pos, kv)


def _full_recompute(model, params, rs, prompt, num_new):
  """Greedy reference: the causal full forward pass over a zero-padded buffer
  each step, reading the logits at the last filled position."""
  extra = ({"mod_routing": "causal"} if model.config.mod is not None
           else {})
  plen = prompt.shape[1]
  buf = np.concatenate([prompt, np.zeros((B, num_new), np.int32)], axis=1)
  forward = jax.jit(lambda b: model.apply(
      {"params": params, "router_state": rs}, b, **extra))
  for t in range(plen, plen + num_new):
    logits = forward(jnp.asarray(buf))
    buf[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
  return buf[:, plen:]


@pytest.mark.parametrize("moe", [MOE, MoEConfig(num_experts=4, expert_width=32,
                                                router=ExpertChoice()),
                                 dataclasses.replace(MOE, num_noop_experts=2)],
                         ids=["top_k", "expert_choice", "staged_mode"])
def test_sample_matches_full_recompute(moe):
  cfg, model, params, rs, tokens = _lm(mod=MoDConfig(capacity=0.25), moe=moe)
  prompt = np.asarray(tokens[:, :5])
  got = sample_lib.sample(model, params, rs, prompt, 8)
  np.testing.assert_array_equal(got, _full_recompute(model, params, rs,
                                                     prompt, 8))
  # Expert choice is not causal per token: the full-recompute path is used.
  assert decode.supports(cfg) == (moe.router.name != "expert_choice")


# ----------------------------------------------------------------- MoDE
def test_integrated_mode_noop_experts_skip_the_mlp():
  moe = MoEConfig(num_experts=2, expert_width=16, router=TopK(k=1),
                  num_noop_experts=2, eval_capacity_factor=8.0)
  layer = MoE(moe, D)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, L, D))
  params = nn.meta.unbox(jax.jit(lambda x: layer.init(
      jax.random.PRNGKey(1), x, train=False))(x)["params"])
  assert params["router"].shape == (D, 4)
  y, coll = jax.jit(lambda p, x: layer.apply(
      {"params": p}, x, train=False, mutable=["router"]))(params, x)
  logits = np.asarray(x[0] @ params["router"])
  to_noop = logits.argmax(-1) >= 2
  assert 0 < to_noop.sum() < L
  np.testing.assert_array_equal(np.asarray(y[0])[to_noop], 0.0)
  assert np.abs(np.asarray(y[0])[~to_noop]).min() > 0
  m = coll["router"]["metrics"][0]
  np.testing.assert_allclose(m["noop_fraction"], to_noop.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["mlp_skip_fraction"], to_noop.mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="num_noop_experts"):
    MoEConfig(num_noop_experts=-1)


def test_staged_mode_structure_and_metrics():
  cfg = LMConfig(num_layers=2, d_model=D, num_heads=HEADS, d_ff=FF, max_len=L,
                 moe=MOE, mod=MoDConfig(capacity=0.25), mod_every=2)
  model = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, L), 0, 256)
  params, rs = init_variables(model, jax.random.PRNGKey(0), tokens)
  params = nn.meta.unbox(params)
  assert "mlp" in params["layers_1"]["block"]  # the MoE inside the MoD block
  assert "experts" in params["layers_1"]["block"]["mlp"]
  _, coll = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                             mutable=["router"]))(params, tokens)
  layers = router_outputs(coll["router"])
  assert set(layers) == {("layers_0", "mlp"), ("layers_1",),
                         ("layers_1", "block", "mlp")}
  metrics = summarize(layers)  # MoD keys beside MoE keys, not mixed
  for key in ("mod_capacity", "mod_pred_accuracy", "experts_per_token",
              "layer_fanout"):
    assert key in metrics, key
  assert metrics["layer_fanout"].shape == (2,)
  assert float(metrics["mod_capacity"]) == pytest.approx(0.25)
  want = np.mean([layers[k]["metrics"]["experts_per_token"]
                  for k in (("layers_0", "mlp"), ("layers_1", "block", "mlp"))])
  np.testing.assert_allclose(metrics["experts_per_token"], want, rtol=1e-6)


def test_config_validation_and_flags():
  with pytest.raises(ValueError, match="capacity=1.5"):
    MoDConfig(capacity=1.5)
  with pytest.raises(ValueError, match="causal"):
    MoDConfig(capacity=0.125, causal="oracle")
  with pytest.raises(ValueError, match="mod_every"):
    LMConfig(mod_every=0)
  with pytest.raises(ValueError, match="mod=0.125 is not allowed"):
    LMConfig(mod=0.125)
  cfg = LMConfig(num_layers=6, mod=MoDConfig(capacity=0.125))
  assert [cfg.is_mod_layer(i) for i in range(6)] == [False, True] * 3
  assert not any(LMConfig(num_layers=6).is_mod_layer(i) for i in range(6))
  # The flat flags set the nested config; --mod_capacity=0 removes it.
  values = dict(config="tiny", router="dense", mod_capacity=0.125, mod_every=2,
                mod_score="sigmoid", mod_aux_weight=0.0, mod_causal="router")
  model = lm_flags.build_train_config(values).model
  assert model.mod_every == 2 and model.mod == MoDConfig(
      capacity=0.125, score="sigmoid", aux_weight=0.0, causal="router")
  assert lm_flags.build_train_config(
      dict(config="paper_mod", mod_capacity=0.0)).model.mod is None
  assert lm_flags.build_train_config(dict(
      config="paper_mod", mod_causal="router")).model.mod == MoDConfig(
          capacity=0.125, causal="router")
  # Without --mod_capacity the other MoD flags leave a model without MoD.
  assert lm_flags.build_train_config(dict(
      config="tiny", mod_score="sigmoid")).model.mod is None
  # Dotted overrides: model.mod.FIELD starts from the MoDConfig defaults.
  cfg = configs.override(configs.get("tiny"), {"model.mod.capacity": "0.25"})
  assert cfg.model.mod == MoDConfig(capacity=0.25)
  assert configs.override(configs.get("paper_mod"),
                          {"model.mod": "none"}).model.mod is None
  values = dict(config="tiny", router="top_k", num_noop_experts=2)
  assert lm_flags.build_train_config(values).model.moe.num_noop_experts == 2
  with pytest.raises(ValueError, match="mod_capacity"):
    lm_flags.build_train_config(dict(config="tiny", router="dense",
                                     mod_capacity=2.0))


# Staged MoDE at the default evaluation capacity: the routed block's MoE must
# not route (and give capacity to) the zero rows of the tokens that skip it,
# or an earlier token's output depends on later tokens.
@pytest.mark.parametrize("causal", ["predictor", "router"])
def test_mode_block_causal_at_default_capacity(causal):
  moe = MoEConfig(num_experts=4, expert_width=32, router=TopK(k=2),
                  num_noop_experts=2)
  block = MoDBlock(MoDConfig(capacity=0.25, causal=causal), HEADS, FF, moe=moe)
  x, pos = _inputs(4)
  params = _init_block(block, x, pos)
  apply = jax.jit(lambda x: block.apply({"params": params}, x, pos,
                                        train=False, routing="causal"))
  y, chosen = apply(x)
  assert 0 < float(jnp.mean(chosen)) < 1  # some tokens skip the block
  for t in range(2, 12, 2):  # later tokens change: earlier outputs may not
    for seed in range(2):
      later = x.at[:, t + 1:].set(3 * jax.random.normal(
          jax.random.PRNGKey(10 + seed + t), (B, L - t - 1, D)))
      y2, _ = apply(later)
      np.testing.assert_array_equal(np.asarray(y2[:, :t + 1]),
                                    np.asarray(y[:, :t + 1]))
