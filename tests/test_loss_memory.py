"""Memory-saving forms of the training loss equal the plain ones.

The chunked cross-entropy (`LMConfig.loss_chunk`) against the logits of the
whole sequence: value and gradients, alone and through a train step.
"""
import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.models import LMConfig
from moejax.models.lm import TransformerLM
from moejax.train.step import (chunked_cross_entropy, cross_entropy,
                               make_loss_fn)


def _inputs(batch=3, length=12, width=8, vocab=37, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (batch, length, width), jnp.float32)
  kernel = jax.random.normal(k[1], (width, vocab), jnp.float32) * 0.5
  targets = jax.random.randint(k[2], (batch, length), 0, vocab)
  mask = (jax.random.uniform(k[3], (batch, length)) > 0.3).astype(jnp.float32)
  return x, kernel, targets, mask


@pytest.mark.parametrize("chunk", [3, 12])
def test_chunked_ce_equals_plain_in_value_and_gradient(chunk):
  x, kernel, targets, mask = _inputs()

  def plain(x, kernel):
    return cross_entropy(jnp.einsum("bld,dv->blv", x, kernel), targets,
                         mask)[0]

  def chunked(x, kernel):
    return chunked_cross_entropy(x, kernel, targets, mask, chunk)[0]

  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(x, kernel)
  got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(
      x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert float(chunked_cross_entropy(x, kernel, targets, mask, chunk)[1]) == (
      float(mask.sum()))


def test_chunked_ce_bfloat16_hidden_matches_the_float32_head():
  # The head casts bfloat16 hidden states to float32, so does each chunk.
  x, kernel, targets, mask = _inputs()
  xb = x.astype(jnp.bfloat16)
  want = cross_entropy(jnp.einsum("bld,dv->blv", xb.astype(jnp.float32),
                                  kernel), targets, mask)[0]
  got = chunked_cross_entropy(xb, kernel, targets, mask, 4)[0]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("chunk", [0, 5, True])
def test_chunked_ce_rejects_a_chunk_that_does_not_divide(chunk):
  x, kernel, targets, mask = _inputs()
  with pytest.raises(ValueError, match="loss_chunk"):
    chunked_cross_entropy(x, kernel, targets, mask, chunk)


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_lm_config_rejects_bad_loss_chunk(value):
  with pytest.raises(ValueError, match="loss_chunk"):
    LMConfig(loss_chunk=value)


def test_loss_fn_with_chunks_equals_plain_through_the_model():
  cfg = LMConfig(num_layers=1, d_model=16, num_heads=2, d_ff=32, vocab_size=41,
                 max_len=16)
  plain_model = TransformerLM(cfg)
  chunked_model = TransformerLM(dataclasses.replace(cfg, loss_chunk=4))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 41)
  variables = plain_model.init({"params": jax.random.PRNGKey(2),
                                "router": jax.random.PRNGKey(3)}, tokens)
  params = variables["params"]
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "mask": jnp.ones(tokens.shape, jnp.float32)}
  rng = jax.random.PRNGKey(4)

  def run(model):
    fn = make_loss_fn(model, train=True)
    (obj, out), grads = jax.value_and_grad(fn, has_aux=True)(
        params, {}, batch, rng)
    return obj, out[0], grads

  want_obj, want_ce, want_grads = run(plain_model)
  got_obj, got_ce, got_grads = run(chunked_model)
  np.testing.assert_allclose(got_ce, want_ce, rtol=1e-6)
  np.testing.assert_allclose(got_obj, want_obj, rtol=1e-6)
  np.testing.assert_allclose(optax.global_norm(got_grads),
                             optax.global_norm(want_grads), rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _tiny_lm(**kw):
  return LMConfig(num_layers=2, d_model=16, num_heads=2, d_ff=32,
                  vocab_size=29, max_len=16, **kw)


def _lm_loss(cfg, params, tokens):
  model = TransformerLM(cfg)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "mask": jnp.ones(tokens.shape, jnp.float32)}
  return make_loss_fn(model, train=True)(params, {}, batch,
                                         jax.random.PRNGKey(0))[0]


def test_recompute_attention_remat_keeps_no_scores_and_equals_no_remat():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 29)
  params = TransformerLM(_tiny_lm()).init(
      {"params": jax.random.PRNGKey(2), "router": jax.random.PRNGKey(3)},
      tokens)["params"]
  scores_shape = "[2,2,16,16]"  # [B, H, L, L]

  def residual_shapes(cfg):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      jax.ad_checkpoint.print_saved_residuals(
          lambda p: _lm_loss(cfg, p, tokens), params)
    return out.getvalue()

  assert scores_shape in residual_shapes(_tiny_lm())
  assert scores_shape not in residual_shapes(
      _tiny_lm(remat="recompute_attention"))
  want, want_g = jax.value_and_grad(
      lambda p: _lm_loss(_tiny_lm(), p, tokens))(params)
  for remat in ("recompute_attention", "block", True):
    got, got_g = jax.value_and_grad(
        lambda p, r=remat: _lm_loss(_tiny_lm(remat=r), p, tokens))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_lm_config_rejects_an_unknown_remat_policy():
  with pytest.raises(ValueError, match="remat"):
    LMConfig(remat="attention_only")


def _reference_attend(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("blhk,bthk->bhlt", q, k).astype(jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhlt,bthk->blhk", probs, v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6),
                                       (jnp.bfloat16, 2e-2)])
def test_attend_keeps_probabilities_in_the_value_dtype_only(dtype, tol):
  from moejax.nn.attention import attend, causal_mask
  k = jax.random.split(jax.random.PRNGKey(5), 4)
  q, kk, v = (jax.random.normal(k[i], (2, 8, 2, 4)).astype(dtype)
              for i in range(3))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  mask = causal_mask(pos, pos)
  g = jax.random.normal(k[3], (2, 8, 2, 4)).astype(dtype)

  def vjp(fn):
    out, pull = jax.vjp(lambda a, b, c: fn(a, b, c, mask), q, kk, v)
    return (out, *pull(g))

  for got, want in zip(vjp(attend), vjp(_reference_attend)):
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), rtol=tol,
                               atol=tol)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(
        lambda a: attend(a, kk, v, mask), q)
  saved = out.getvalue()
  # the probabilities once, in the value dtype; no float32 [B, H, L, T]
  assert ("f32[2,2,8,8]" in saved) == (dtype == jnp.float32)
  assert saved.count("[2,2,8,8]") == 1  # the probabilities


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_softmax_matches_the_softmax_also_for_rows_that_see_nothing(
    dtype):
  from moejax.nn.attention import masked_softmax
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  scores = (4 * jax.random.normal(k1, (2, 3, 5, 6))).astype(dtype)
  mask = jax.random.bernoulli(k2, 0.6, (2, 1, 5, 6))
  mask = mask.at[0, 0, 2].set(False).at[1, 0, 4].set(False)  # see no key
  g = jax.random.normal(k3, (2, 3, 5, 6))

  def reference(s):
    s = jnp.where(mask, s.astype(jnp.float32) * 0.5, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s, axis=-1)

  got, pull = jax.vjp(lambda s: masked_softmax(s, mask, jnp.float32, 0.5),
                      scores)
  want, pull_want = jax.vjp(reference, scores)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  np.testing.assert_allclose(got[0, :, 2], 1 / 6, rtol=1e-6)  # uniform
  assert pull(g)[0].dtype == dtype  # the cotangent in the scores' dtype
  np.testing.assert_allclose(np.asarray(pull(g)[0], np.float32),
                             np.asarray(pull_want(g)[0], np.float32),
                             rtol=tol, atol=tol)
