"""Pre-norm Transformer block whose MLP is dense or an MoE layer.

Axis legend:
  B  batch
  L  sequence length
  D  model width
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.experts import DenseFFN
from moejax.nn.attention import Attention
from moejax.nn.moe import MoE, MoEConfig


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
               kv=None):
    """Returns (x + Δ or Δ, (keys, values) of this call)."""
    h, new_kv = Attention(self.num_heads, self.dtype, self.param_dtype,
                          name="attn")(
        nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="attn_norm")(x), positions, kv)
    y = x + h
    z = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="mlp_norm")(y)
    if self.moe is None:
      m = DenseFFN(x.shape[-1], self.d_ff, self.activation, self.dtype,
                   self.param_dtype, name="mlp")(z)
    else:
      m = MoE(self.moe, x.shape[-1], self.dtype, self.param_dtype,
              name="mlp")(z, train=train)
    delta = h + m
    return (x + delta if self.residual else delta), new_kv
