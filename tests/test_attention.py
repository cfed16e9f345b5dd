"""Attention implementations ("xla", "dot_product", "splash"), grouped-query
heads and the masks MoD and packed documents need.

Every implementation is compared with the "xla" reference (forward and
gradients). Tolerances: float32 1e-5 relative / absolute on outputs and
gradients (the fused paths reorder the same float32 sums; splash's online
softmax rescales blockwise); bfloat16 3e-2 absolute on outputs and 5e-2
relative to the largest gradient entry (inputs, outputs and the probabilities
that multiply V are rounded to bfloat16 at different points). "splash" runs
in the Pallas interpreter on CPU.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import backend
from moejax.models.lm import LMConfig, TransformerLM, init_cache
from moejax.nn import attention as attn
from moejax.nn.mod import MoDConfig, gather_plan, mod_routing, top_c_mask

FUSED = ("dot_product", "splash")
TOL = {"float32": dict(out=1e-5, grad=1e-5),
       "bfloat16": dict(out=3e-2, grad=5e-2)}


def _qkv(heads=4, groups=2, length=128, width=16, batch=2, dtype=jnp.float32):
  r = np.random.default_rng(0)
  make = lambda h: jnp.asarray(r.normal(size=(batch, length, h, width)), dtype)
  return make(heads), make(groups), make(groups)


def _reference(q, k, v, positions, segment_ids=None, causal=True):
  mask = attn.causal_mask(positions, positions)
  if not causal:
    mask = jnp.ones_like(mask)
  if segment_ids is not None:
    mask = mask & attn.segment_mask(segment_ids, segment_ids)
  return attn.attend(q, k, v, mask)


def _packed_segments(batch, length):
  """int32[B, L]: row b holds documents of lengths cut at 37 and 90 + b."""
  idx = np.arange(length)
  return jnp.asarray([(idx >= 37).astype(int) + (idx >= 90 + b)
                      for b in range(batch)], jnp.int32)


def _restarting_positions(segments):
  """Positions that restart at 0 in every document (as packed data has)."""
  s = np.asarray(segments)
  starts = np.maximum.accumulate(np.where(
      np.diff(s, prepend=-1, axis=1) != 0, np.arange(s.shape[1]), 0), axis=1)
  return jnp.asarray(np.arange(s.shape[1]) - starts, jnp.int32)


def _close(a, b, tol, scale=1.0):
  np.testing.assert_allclose(np.asarray(a, np.float32),
                             np.asarray(b, np.float32), rtol=tol,
                             atol=tol * scale)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype,groups,packed", [
    ("float32", 4, False), ("float32", 2, True), ("float32", 1, True),
    ("bfloat16", 2, True)])
def test_fused_equals_xla_forward_and_gradients(impl, dtype, groups, packed):
  """Causal self-attention, plain / grouped / multi-query heads, with and
  without packed documents (positions restarting per document)."""
  q, k, v = _qkv(groups=groups, dtype=jnp.dtype(dtype))
  batch, length = q.shape[:2]
  seg = _packed_segments(batch, length) if packed else None
  pos = (_restarting_positions(seg) if packed else
         jnp.broadcast_to(jnp.arange(length), (batch, length)))
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), q.dtype)
  loss = lambda f: lambda q, k, v: jnp.sum(
      (f(q, k, v) * cot).astype(jnp.float32))
  ref = lambda q, k, v: _reference(q, k, v, pos, seg)
  run = lambda q, k, v: attn.FUSED[impl](q, k, v, causal=True, segment_ids=seg)
  tol = TOL[dtype]
  _close(jax.jit(run)(q, k, v), jax.jit(ref)(q, k, v), tol["out"])
  got = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    _close(g, w, tol["grad"], float(jnp.max(jnp.abs(w.astype(jnp.float32)))))


@pytest.mark.parametrize("impl", FUSED)
def test_fused_non_causal_equals_xla(impl):
  q, k, v = _qkv(groups=4)
  pos = jnp.zeros(q.shape[:2], jnp.int32)
  _close(attn.FUSED[impl](q, k, v, causal=False),
         _reference(q, k, v, pos, causal=False), 1e-5)


def test_grouped_query_xla_equals_repeated_heads():
  """G key/value heads act as H heads whose keys/values repeat per group."""
  q, k, v = _qkv(heads=6, groups=2, length=8)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  rep = lambda a: jnp.repeat(a, 3, axis=2)
  _close(_reference(q, k, v, pos), _reference(q, rep(k), rep(v), pos), 1e-6)


def test_mod_gather_keeps_position_order():
  """The routed block's gathered slots are in increasing position order and
  the empty slots (PAD_POSITION) come last, so an index-causal mask over the
  slots is the position-causal one among the chosen tokens."""
  r = np.random.default_rng(2)
  logits = jnp.asarray(r.normal(size=(3, 64)), jnp.float32)
  for capacity, chosen in ((16, None), (64, logits > 0.3)):
    chosen = top_c_mask(logits, capacity) if chosen is None else chosen
    plan = gather_plan(mod_routing(logits, chosen, "raw"), capacity)
    index = np.asarray(plan.token_index[:, 0])
    valid = np.asarray(plan.slot_valid[:, 0])
    for b in range(3):
      n = int(valid[b].sum())
      assert n == int(np.asarray(chosen)[b].sum())
      assert valid[b, :n].all() and not valid[b, n:].any()
      assert (np.diff(index[b, :n]) > 0).all()
      np.testing.assert_array_equal(index[b, :n],
                                    np.flatnonzero(np.asarray(chosen)[b]))


@pytest.mark.parametrize("impl", FUSED)
def test_fused_on_gathered_subset_equals_xla_by_position(impl):
  """Attention among a MoD-gathered subset (positions increasing, empty slots
  last at PAD_POSITION) with the fused index-causal kernels equals the xla
  position-causal reference on the valid slots, forward and gradients."""
  q, k, v = _qkv(groups=2)
  batch, length = q.shape[:2]
  r = np.random.default_rng(3)
  n_valid = 100
  pos = np.full((batch, length), attn.PAD_POSITION, np.int32)
  for b in range(batch):
    pos[b, :n_valid] = np.sort(r.choice(2048, n_valid, replace=False))
  pos = jnp.asarray(pos)
  valid = (pos != attn.PAD_POSITION)[..., None, None]
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v), 0) ** 2)
  ref = lambda q, k, v: _reference(q, k, v, pos)
  run = lambda q, k, v: attn.FUSED[impl](q, k, v, causal=True)
  _close(jnp.where(valid, run(q, k, v), 0), jnp.where(valid, ref(q, k, v), 0),
         1e-5)
  for g, w in zip(jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v),
                  jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)):
    _close(g, w, 1e-5, float(jnp.max(jnp.abs(w))))


def _lm(**fields):
  base = dict(vocab_size=64, num_layers=2, d_model=64, num_heads=4, d_ff=64,
              max_len=128)
  return LMConfig(**{**base, **fields})


@pytest.mark.parametrize("impl", FUSED)
def test_lm_with_mod_and_packing_equals_xla(impl):
  """A whole LM step (every other block a routed MoD block, GQA, packed
  documents): logits and parameter gradients equal the xla model's."""
  cfg = _lm(num_kv_heads=2, mod=MoDConfig(capacity=0.5), mod_every=2,
            d_model=32)
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 64)
  seg = _packed_segments(2, 128)
  pos = _restarting_positions(seg)
  ref_model = TransformerLM(cfg)
  params = ref_model.init({"params": jax.random.key(1),
                           "router": jax.random.key(1)}, tokens)["params"]

  def loss(model, p):
    logits, _ = model.apply({"params": p}, tokens, positions=pos,
                            segment_ids=seg, mutable=["router"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  model = TransformerLM(dataclasses.replace(cfg, attention=impl))
  want, got = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
               for m in (ref_model, model))
  _close(got[0], want[0], 1e-5)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    _close(g, w, 1e-4, float(jnp.max(jnp.abs(w))) + 1e-6)


def test_grouped_query_cached_decoding_equals_full_forward():
  """The cache holds num_kv_heads heads; decoding token by token gives the
  full forward pass's logits (and so the same greedy tokens)."""
  cfg = _lm(num_kv_heads=1, max_len=16)
  model = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, 64)
  params = nn.meta.unbox(model.init({"params": jax.random.key(5)},
                                    tokens)["params"])
  kernel = params["layers_0"]["attn"]["key"]["kernel"]
  assert kernel.shape == (64, 1, 16)
  full = model.apply({"params": params}, tokens)
  kv = init_cache(cfg, 2, 12)
  assert kv[0]["k"].shape == (2, 1, 12, 16)
  steps = []
  for t in range(12):
    logits, kv, _ = model.apply({"params": params}, tokens[:, t:t + 1], t, kv,
                                method=TransformerLM.decode)
    steps.append(logits)
  _close(jnp.concatenate(steps, axis=1), full, 1e-4)


def test_default_heads_keep_parameter_shapes():
  """num_kv_heads=None is plain multi-head attention: the parameters of
  configs written before the field existed."""
  cfg = _lm()
  params = nn.meta.unbox(TransformerLM(cfg).init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32))["params"])
  attn_params = params["layers_0"]["attn"]
  assert {n: p["kernel"].shape for n, p in attn_params.items()} == {
      "query": (64, 4, 16), "key": (64, 4, 16), "value": (64, 4, 16),
      "out": (4, 16, 64)}
  assert cfg.kv_heads == 4


@pytest.mark.parametrize("fields,match", [
    (dict(num_kv_heads=3), "num_kv_heads=3 is not allowed; allowed: None or a "
     "divisor of num_heads=4"),
    (dict(num_kv_heads=0), "num_kv_heads=0"),
    (dict(attention="flash"), "attention='flash'"),
])
def test_config_validation_names_field(fields, match):
  with pytest.raises(ValueError, match=match):
    _lm(**fields)


def test_auto_attention_per_backend():
  assert backend.choose_attention("auto", 2048, "cpu") == "xla"
  assert backend.choose_attention("auto", 2048, "gpu") == "dot_product"
  assert backend.choose_attention("auto", 2048, "tpu") == "splash"
  assert backend.choose_attention("auto", 100, "tpu") == "xla"
  assert backend.choose_attention("splash", 100, "cpu") == "splash"
  assert backend.use_cudnn(jnp.bfloat16, 128, "gpu")
  assert not backend.use_cudnn(jnp.float32, 128, "gpu")
  assert not backend.use_cudnn(jnp.bfloat16, 256, "gpu")
  assert not backend.use_cudnn(jnp.bfloat16, 128, "cpu")


@pytest.mark.parametrize("causal", [True, False])
def test_splash_pads_untiled_length(causal):
  """A length the kernel's 128-blocks do not tile (a MoD block's gathered
  subset) is padded with tokens of their own segment."""
  q, k, v = _qkv(length=96)
  seg = _packed_segments(2, 96)
  plain = jnp.broadcast_to(jnp.arange(96), (2, 96))
  for s, pos in ((None, plain), (seg, _restarting_positions(seg))):
    _close(jax.jit(lambda q, k, v: attn.splash_attend(
        q, k, v, causal=causal, segment_ids=s))(q, k, v),
           _reference(q, k, v, pos, s, causal=causal), 1e-5)


def test_splash_under_a_mesh_equals_xla():
  """Under a mesh the kernel runs per device in a shard_map (batch over the
  batch axes, heads over `model`; kv heads that `model` does not divide are
  repeated)."""
  from moejax import sharding
  q, k, v = _qkv(heads=4, groups=1, batch=4)
  seg = _packed_segments(4, 128)
  pos = _restarting_positions(seg)
  mesh = sharding.make_mesh("data:4,model:2", jax.devices()[:8])
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v: attn.splash_attend(
        q, k, v, segment_ids=seg))(q, k, v)
  _close(got, _reference(q, k, v, pos, seg), 1e-5)


def test_flops_count_grouped_query_projections():
  """Key/value projections shrink by G / H; the scores do not."""
  from moejax import flops
  full = flops.block_flops(_lm(), 128, None)
  mqa = flops.block_flops(_lm(num_kv_heads=1), 128, None)
  d = 64
  assert full["attention_proj"] == 2 * 4 * d * d
  assert mqa["attention_proj"] == 2 * (2 + 2 / 4) * d * d
  assert mqa["attention_scores"] == full["attention_scores"]


def test_flags_and_overrides_set_the_fields():
  """`--attention` / `--num_kv_heads` and `model.attention=` overrides; a bad
  value stops with one line naming the field."""
  from moejax.configs import overrides
  from moejax.tasks.lm import TrainConfig
  cfg = overrides.override(TrainConfig(), {"model.attention": "splash",
                                           "model.num_kv_heads": "2"})
  assert cfg.model.attention == "splash" and cfg.model.kv_heads == 2
  from moejax.cli import lm_flags
  assert {"attention", "num_kv_heads"} <= set(lm_flags.LM_MODEL_FLAGS)
  with pytest.raises(ValueError, match="attention='flash'"):
    overrides.override(TrainConfig(), {"model.attention": "flash"})


def test_aot_report_counts_kernel_flops_and_keeps_its_section(tmp_path,
                                                              monkeypatch):
  """experiments/attention_aot.py: the attention matmul FLOPs from shapes
  (splash computes only the causal blocks but recomputes in its backward)
  and its section of the markdown report, rewritten in place."""
  import os
  import sys
  from moejax import configs
  from moejax.experiment import load_module
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.syspath_prepend(os.path.join(root, "experiments"))
  script = load_module(os.path.join(root, "experiments", "attention_aot.py"))
  model = dataclasses.replace(configs.REGISTRY["paper_mod"].config(
      batch_size=128).model, mod=None, num_layers=1)
  got = script.kernel_flops(model, 4, 16, 2048)
  pair = 2.0 * 4 * 16 * 2048 ** 2 * 128
  assert got["xla"] == pair * 6
  assert got["splash"] == pair * (5 / 8) * 9  # 4 blocks of 512: 10 of 16
  report = tmp_path / "r.md"
  report.write_text("# head\n\ntable\n")
  row = {"config": "c", "attention": "splash", "mesh": "data:2",
         "shard_batch": 1, "remat": False, "temp_bytes": 2**30,
         "hbm_peak_bytes": 2**31, "fits": True, "flops_per_device": 1e12,
         "hbm_bytes_accessed": 1e9, "attention_flops_from_shapes": 2e12}
  for _ in range(2):
    script.write_section(str(report), script.markdown([row], "cmd"))
  text = report.read_text()
  assert text.startswith("# head\n\ntable\n\n" + script.MARK)
  assert text.count(script.MARK) == 1
  assert "| c | splash | data:2 | 1 | no | 1.0 | 2.0 | yes | 1.0 | 1 | 2.0 |" \
      in text
  del sys.modules["attention_aot"]
