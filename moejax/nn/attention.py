"""Causal self-attention with rotary position embeddings.

Axis legend:
  B  batch
  L  query positions
  T  key positions
  H  heads
  K  head width
  D  model width

Positions are explicit (`int32[B, L]`): RoPE and the causal mask use each token's
true position, so a routed block that runs on a gathered subset of tokens (MoD)
attends exactly as the full sequence would among those tokens.

Packed rows (several documents in one row) pass `segment_ids` int32[B, L]:
a query sees only keys of its own segment (and, causal, at positions <= its
own), so attention never crosses documents. None = one segment per row
(today's behaviour exactly).

Cached decoding passes a key/value cache `kv` (`init_kv`):
`{"k": float[B, H, T, K], "v": float[B, H, T, K], "pos": int32[B, T]}` (heads
major, so that the per-step attention products need no transposed copy of the
cache). Slot t holds the token at position t; a slot that holds nothing has
position `PAD_POSITION`, larger than every real position, so the causal mask
hides it.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Position given to empty slots: larger than any real position, so the causal
# mask hides them from every real query (their own outputs are discarded).
PAD_POSITION = 2 ** 30


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding. x float[B, L, H, K], positions int32[B, L] -> same shape."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, L, 1, K/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """bool[B, 1, L, T]: query at position p sees keys at positions <= p."""
  return (k_positions[:, None, :] <= q_positions[:, :, None])[:, None]


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """bool[B, 1, L, T]: query sees keys of its own segment (int32[B, L] and
  int32[B, T] segment ids)."""
  return (k_segments[:, None, :] == q_segments[:, :, None])[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           heads_major: bool = False, recompute: bool = False) -> jax.Array:
  """Attention output float[B, L, H, K].

  q float[B, L, H, K], k/v float[B, T, H, K] (`heads_major`: float[B, H, T, K],
  the cache layout), mask bool[B, 1, L, T]. The scores q k^T float[B, H, L,
  T] stay in the activation dtype in memory (`masked_softmax` casts them up
  to float32 in its fusions). `recompute`: keep none of the scores and
  probabilities for the backward pass, which recomputes them from q and k (a
  `jax.checkpoint` of this function).
  """
  if recompute:
    return jax.checkpoint(functools.partial(attend, heads_major=heads_major))(
        q, k, v, mask)
  kv = "bhtk" if heads_major else "bthk"
  scores = jnp.einsum(f"blhk,{kv}->bhlt", q, k)
  probs = masked_softmax(scores, mask, v.dtype, q.shape[-1] ** -0.5)
  return jnp.einsum(f"bhlt,{kv}->blhk", probs, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def masked_softmax(scores: jax.Array, mask: jax.Array, dtype: Any,
                   scale: float = 1.0) -> jax.Array:
  """Softmax over the last axis of `scale * scores` where `mask` (elsewhere
  the lowest float32), computed in float32 and returned in `dtype`.

  `scores` float[B, H, L, T] may be bfloat16 (the QK^T product in a
  bfloat16 model, half the bytes of float32 scores in memory); they are cast
  up and scaled inside the softmax's own fusions, and the probabilities are
  exp(scores - logsumexp), so that XLA keeps no float32 [B, H, L, T] array
  in memory (the usual exp(s - max) / sum keeps the float32 exponentials).
  A row that sees no key is uniform, as the softmax of equal scores.

  The backward pass keeps only the output (in bfloat16 models: bfloat16
  probabilities, not the float32 scores and probabilities beside them) and
  which rows see a key, and computes the scores' cotangent from them in float32,
  scale * p * (g - sum(g * p)), the softmax's own derivative (exact when
  `dtype` is float32), returned in the scores' dtype; masked scores get
  none.
  """
  return _masked_softmax_fwd(scores, mask, dtype, scale)[0]


def _softmax_rows(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(softmax float32[..., T], float32[..., 1]: 1 for a row that sees a key,
  0 for one that sees none) of masked float32 scores.

  exp(scores - logsumexp): no float32 exponentials in memory between the
  sums and the output. A row that sees no key is uniform (as the softmax of
  equal scores): there `top + log(T)` rounds back to `top`, each entry is 1,
  and a per-row factor 1/T makes it 1/T (no [..., T] array of constants).
  """
  top = jnp.max(scores, axis=-1, keepdims=True)
  lse = top + jnp.log(jnp.sum(jnp.exp(scores - top), axis=-1, keepdims=True))
  sees = (top > jnp.finfo(jnp.float32).min).astype(jnp.float32)
  factor = sees + (1.0 - sees) / scores.shape[-1]
  return jnp.exp(scores - lse) * factor, sees


def _masked_softmax_fwd(scores, mask, dtype, scale):
  masked = jnp.where(mask, scores.astype(jnp.float32) * scale,
                     jnp.finfo(jnp.float32).min)
  probs, sees = _softmax_rows(masked)
  probs = probs.astype(dtype)
  return probs, (probs, sees, jnp.zeros((0,), scores.dtype))


def _masked_softmax_bwd(dtype, scale, res, g):
  del dtype
  probs, sees, like = res
  p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
  # a row that sees no key: every score is masked, none gets a gradient
  ds = p * (g - jnp.sum(g * p, axis=-1, keepdims=True)) * (scale * sees)
  return ds.astype(like.dtype), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def init_kv(batch: int, length: int, num_heads: int, head_width: int,
            dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """An empty cache of T = `length` slots: k/v float[B, H, T, K] zeros,
  pos int32[B, T] = PAD_POSITION."""
  shape = (batch, num_heads, length, head_width)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full((batch, length), PAD_POSITION, jnp.int32)}


def write_kv(kv: dict[str, jax.Array], k: jax.Array, v: jax.Array,
             positions: jax.Array,
             kv_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Stores this call's keys/values in the cache at their positions.

  Args:
    kv: the cache (`init_kv`).
    k, v: float[B, L, H, K].
    positions: int32[B, L], one run start..start+L-1 shared by every row.
    kv_mask: bool[B, L] tokens to store; the others' slots get PAD_POSITION
      (hidden from every later query). None = all.
  Returns:
    the updated cache.
  """
  start = positions[0, 0]
  write = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(
      buf, new.astype(buf.dtype), start, axis=axis)
  heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # [B, L, H, K] -> [B, H, L, K]
  pos = positions if kv_mask is None else jnp.where(kv_mask, positions,
                                                    PAD_POSITION)
  return {"k": write(kv["k"], heads_major(k), 2),
          "v": write(kv["v"], heads_major(v), 2),
          "pos": write(kv["pos"], pos, 1)}


class Attention(nn.Module):
  """Multi-head causal self-attention.

  `__call__(x, positions, kv=None, kv_mask=None)` returns (out float[B, L, D],
  kv). Without a cache (`kv=None`) the L tokens attend among themselves and
  the second value is None. With one (cached decoding), the tokens' keys/values
  are written into it first (`write_kv`; `positions` must be one run
  start..start+L-1 in every row, `kv_mask` bool[B, L] the tokens to store), the
  queries attend to every stored key at a position <= theirs, and the second
  value is the updated cache.
  `causal=False` lets every query see every key (encoders, DiT; no cache).
  `recompute`: the backward pass recomputes the attention scores instead of
  keeping them (see `attend`).
  `segment_ids` int32[B, L] (packed documents; no cache) restricts every
  query to the keys of its own segment.
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True
  recompute: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, kv=None,
               kv_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    width = x.shape[-1]
    head = width // self.num_heads

    def proj(name, shape, axes, names):
      return nn.DenseGeneral(
          shape, axis=axes, use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), names))
    qkv_names = ("embed", "heads", "kv")
    q = proj("query", (self.num_heads, head), -1, qkv_names)(x)
    k = proj("key", (self.num_heads, head), -1, qkv_names)(x)
    v = proj("value", (self.num_heads, head), -1, qkv_names)(x)
    q, k = rope(q, positions), rope(k, positions)
    if kv is not None:
      if segment_ids is not None:
        raise ValueError("segment_ids with a kv cache is not supported; cached "
                         "decoding runs one document per row")
      if not self.causal:
        raise ValueError("causal=False attention has no cached decoding; "
                         "allowed: kv=None")
      kv = write_kv(kv, k, v, positions, kv_mask)
      out = attend(q, kv["k"], kv["v"], causal_mask(positions, kv["pos"]),
                   heads_major=True)
    else:
      mask = causal_mask(positions, positions)
      if not self.causal:  # every query sees every key
        mask = jnp.ones_like(mask)
      if segment_ids is not None:
        mask = mask & segment_mask(segment_ids, segment_ids)
      out = attend(q, k, v, mask, recompute=self.recompute)
    out = proj("out", width, (-2, -1), ("heads", "kv", "embed"))(out)
    return out, kv
