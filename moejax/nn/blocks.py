"""Pre-norm Transformer block whose MLP is dense or an MoE layer.

Axis legend:
  B  batch
  L  sequence length
  D  model width

With a key/value cache (`kv`, see `moejax.nn.attention`) the block decodes:
attention reads and extends the cache, and an MoE MLP routes in evaluation
mode with `decode_moe`'s config (each token on its own, none dropped).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.experts import DenseFFN
from moejax.nn.attention import Attention
from moejax.nn.moe import MoE, MoEConfig


def decode_moe(moe: MoEConfig) -> MoEConfig:
  """The MoE config for cached decoding: one group per call, no token dropped.

  With a token-local router each token's routing is then that of the full
  forward pass with capacity for every token (e.g. a large evaluation capacity
  factor, or "dropless").
  """
  return dataclasses.replace(moe, group_size=None,
                             eval_capacity_factor=float(moe.router_experts))


class Block(nn.Module):
  """x float[B, L, D] -> float[B, L, D]: x + attn(norm x), then + mlp(norm x)."""
  num_heads: int
  d_ff: int
  moe: MoEConfig | None = None
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  residual: bool = True  # False: return the update Δ alone (for MoD wrappers)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, train: bool,
               kv=None, kv_mask: jax.Array | None = None):
    """Returns (x + Δ or Δ, the updated cache or None without `kv`).

    `kv` / `kv_mask` (bool[B, L], the tokens whose keys/values are stored):
    cached decoding, evaluation only (see `Attention`).
    """
    if kv is not None and train:
      raise ValueError("train=True with a kv cache is not supported; cached "
                       "decoding is evaluation only")
    h, kv = Attention(self.num_heads, self.dtype, self.param_dtype,
                      name="attn")(
        nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="attn_norm")(x), positions, kv, kv_mask)
    y = x + h
    z = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="mlp_norm")(y)
    if self.moe is None:
      m = DenseFFN(x.shape[-1], self.d_ff, self.activation, self.dtype,
                   self.param_dtype, name="mlp")(z)
    else:
      moe = self.moe if kv is None else decode_moe(self.moe)
      m = MoE(moe, x.shape[-1], self.dtype, self.param_dtype,
              name="mlp")(z, train=train)
    delta = h + m
    return (x + delta if self.residual else delta), kv
