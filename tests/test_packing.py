"""Packed documents in the model: attention, MoD blocks and the loss stay
inside each document when a row packs several (segment ids and per-document
positions, as the packed loader of `moejax/data/packed.py` gives them).

Axis legend:
  L  row length (documents packed one after another)
"""
import numpy as np
import pytest


def _packed_row(lens, vocab=64, seed=0):
  """tokens, segment_ids, positions int32[1, L] of documents of `lens`."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, sum(lens)).astype(np.int32)
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])
  pos = np.concatenate([np.arange(n) for n in lens])
  return tokens[None], seg[None].astype(np.int32), pos[None].astype(np.int32)


def _lm(router=None):
  from moejax import routing
  from moejax.models.lm import LMConfig, TransformerLM
  from moejax.nn.moe import MoEConfig
  moe = None
  if router:  # room for every token: routing stays token-local
    moe = MoEConfig(num_experts=4, expert_width=32, capacity_factor=4.0,
                    eval_capacity_factor=4.0,
                    router=routing.build(router, {"k": 2}))
  cfg = LMConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2,
                 d_ff=64, max_len=32, moe=moe)
  return TransformerLM(cfg)


def _init(model, tokens):
  import jax
  from moejax.models.lm import init_variables
  import flax.linen as nn
  return nn.meta.unbox(init_variables(model, jax.random.PRNGKey(0),
                                      tokens)[0])


def test_attention_does_not_cross_documents():
  import jax
  model = _lm("top_k")
  tokens, seg, pos = _packed_row([5, 7, 4])
  params = {"params": _init(model, tokens)}
  run = jax.jit(lambda t, s, p: model.apply(params, t, segment_ids=s,
                                            positions=p))
  base = np.asarray(run(tokens, seg, pos))
  # Document 1 changed: documents 2 and 3 do not move.
  other = tokens.copy()
  other[0, :5] = (other[0, :5] + 7) % 64
  moved = np.asarray(run(other, seg, pos))
  assert not np.allclose(moved[0, :5], base[0, :5])
  np.testing.assert_allclose(moved[0, 5:], base[0, 5:], rtol=1e-5, atol=1e-5)
  # Document 2 alone (first in its row, positions from 0, one segment up
  # to its end) gives the same outputs.
  alone = np.concatenate([tokens[:, 5:12], tokens[:, :5], tokens[:, 12:]], 1)
  one = np.ones_like(seg)
  arange = np.arange(16, dtype=np.int32)[None]
  got = np.asarray(run(alone, one, arange))
  np.testing.assert_allclose(base[0, 5:12], got[0, :7], rtol=1e-5, atol=1e-5)
  # One segment is exactly the model without segment ids.
  np.testing.assert_array_equal(
      got, np.asarray(jax.jit(lambda t: model.apply(params, t))(alone)))


def test_mod_blocks_keep_attention_inside_documents():
  import jax
  from moejax.nn.mod import MoDBlock, MoDConfig
  block = MoDBlock(MoDConfig(capacity=1.0), num_heads=2, d_ff=32)
  x = np.random.default_rng(1).normal(size=(1, 12, 16)).astype(np.float32)
  _, seg, pos = _packed_row([5, 7])
  params = jax.jit(lambda: block.init(jax.random.PRNGKey(0), x, pos,
                                      train=False, segment_ids=seg))()
  run = jax.jit(lambda x: block.apply(params, x, pos, train=False,
                                      segment_ids=seg)[0])
  base = np.asarray(run(x))
  other = x.copy()
  other[0, :5] += 1.0
  # capacity 1: every token enters, so only attention could carry doc 1 over.
  np.testing.assert_allclose(np.asarray(run(other))[0, 5:], base[0, 5:],
                             rtol=1e-5, atol=1e-5)


def test_packed_loss_is_the_per_document_loss():
  """The loss of a packed batch (segment ids and positions through
  `make_loss_fn`) equals the token-weighted loss of its documents run alone
  (each first in a causal row of its own, the rest of the row masked)."""
  import jax
  from moejax.models.lm import init_cache
  from moejax.train.step import make_loss_fn
  model = _lm()
  lens = (6, 9, 5)
  tokens, seg, pos = _packed_row(lens, seed=3)
  targets = np.roll(tokens, -1, axis=1)
  params = _init(model, tokens)
  loss_fn = jax.jit(lambda b: make_loss_fn(model, train=False)(
      params, {}, b, jax.random.PRNGKey(0))[1][0])
  packed = loss_fn({"inputs": tokens, "targets": targets, "segment_ids": seg,
                    "positions": pos,
                    "mask": np.ones(tokens.shape, np.float32)})
  rows, trows, masks, start = [], [], [], 0
  for n in lens:
    rows.append(np.roll(tokens[0], -start))
    trows.append(np.roll(targets[0], -start))
    masks.append((np.arange(tokens.shape[1]) < n).astype(np.float32))
    start += n
  alone = loss_fn({"inputs": np.stack(rows), "targets": np.stack(trows),
                   "mask": np.stack(masks)})
  np.testing.assert_allclose(float(packed), float(alone), rtol=1e-5)
  with pytest.raises(ValueError, match="segment_ids with a kv cache"):
    model.apply({"params": params}, tokens[:, :4], kv=init_cache(
        model.config, 1, 8), positions=pos[:, :4], segment_ids=seg[:, :4])
