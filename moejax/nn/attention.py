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
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding. x float[B, L, H, K], positions int32[B, L] -> same shape."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, L, 1, K/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array,
                k_valid: jax.Array | None = None) -> jax.Array:
  """bool[B, 1, L, T]: query at position p sees keys at positions <= p."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if k_valid is not None:
    mask = mask & k_valid[:, None, :]
  return mask[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array) -> jax.Array:
  """q float[B, L, H, K], k/v float[B, T, H, K], mask bool[B, 1, L, T] -> [B, L, H, K]."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("blhk,bthk->bhlt", q, k).astype(jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhlt,bthk->blhk", probs, v)


class Attention(nn.Module):
  """Multi-head causal self-attention.

  `__call__(x, positions)` returns (out float[B, L, D], (k, v)) so that a decoder
  can cache keys/values; `kv` passes cached keys/values (with their positions and
  a validity mask) to attend to in addition to nothing else (decode mode).
  `causal=False` lets every query see every key (encoders, DiT).
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, kv=None):
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
    if kv is None:
      mask = causal_mask(positions, positions)
      keys, values = k, v
    else:
      keys, values, k_positions, k_valid = kv
      mask = causal_mask(positions, k_positions, k_valid)
    if not self.causal:  # every query sees every (valid) key
      mask = jnp.ones_like(mask)
      if kv is not None and k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    out = attend(q, keys, values, mask)
    out = proj("out", width, (-2, -1), ("heads", "kv", "embed"))(out)
    return out, (k, v)
