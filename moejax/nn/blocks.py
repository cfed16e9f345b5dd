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

from moejax.checks import check_choice, check_heads, check_positive_ints
from moejax.experts import DenseFFN
from moejax.nn.attention import Attention
from moejax.nn.moe import MoE, MoEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """The stack of blocks that every model config (LM, DiT) holds.

  Attributes:
    num_layers: Transformer blocks.
    d_model: D.
    num_heads: attention heads (must divide D into even head widths).
    d_ff: width of the dense MLPs (dense model, or blocks between MoE blocks).
    moe: the MoE layer config, or None for a dense model.
    moe_every: every `moe_every`-th block (1-based) has an MoE MLP.
    dtype: activation dtype name ("float32" or "bfloat16"); params stay float32
      and routing math is float32 whatever this is.
  """
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  d_ff: int = 512
  moe: MoEConfig | None = None
  moe_every: int = 1
  dtype: str = "float32"

  def __post_init__(self):
    check_positive_ints(self, ("num_layers", "d_model", "num_heads", "d_ff",
                               "moe_every"))
    check_heads(self.d_model, self.num_heads)
    check_choice("dtype", self.dtype, DTYPES)


def decode_moe(moe: MoEConfig) -> MoEConfig:
  """The MoE config for cached decoding: one group per call, no token dropped.

  With a token-local router each token's routing is then that of the full
  forward pass with capacity for every token (e.g. a large evaluation capacity
  factor, or "dropless").
  """
  return dataclasses.replace(moe, group_size=None,
                             eval_capacity_factor=float(moe.router_experts))


class BlockBase(nn.Module):
  """The options of every Transformer block (`Block`, the DiT's, MoD's) and
  the MLP they share.

  Attributes:
    num_heads: attention heads.
    d_ff: width of the dense MLP.
    moe: the MoE layer config of the MLP, or None for a dense MLP.
    activation: of the dense MLP ("swiglu" or "gelu").
    dtype: activation dtype.
    param_dtype: parameter dtype.
    recompute_attention: the backward pass recomputes the attention scores
      instead of keeping them (`moejax.nn.attention.attend`).
  """
  num_heads: int
  d_ff: int
  moe: MoEConfig | None = None
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  recompute_attention: bool = False

  def _mlp(self, z: jax.Array, *, train: bool, decode: bool = False
           ) -> jax.Array:
    """The MLP "mlp": float[..., D] -> float[..., D], dense without `moe`,
    else the MoE layer (with `decode_moe`'s config when `decode`)."""
    width = z.shape[-1]
    if self.moe is None:
      return DenseFFN(width, self.d_ff, self.activation, self.dtype,
                      self.param_dtype, name="mlp")(z)
    moe = decode_moe(self.moe) if decode else self.moe
    return MoE(moe, width, self.dtype, self.param_dtype, name="mlp")(
        z, train=train)


class Block(BlockBase):
  """x float[B, L, D] -> float[B, L, D]: x + attn(norm x), then + mlp(norm x)."""
  residual: bool = True  # False: return the update Δ alone (for MoD wrappers)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, train: bool,
               kv=None, kv_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    """Returns (x + Δ or Δ, the updated cache or None without `kv`).

    `kv` / `kv_mask` (bool[B, L], the tokens whose keys/values are stored):
    cached decoding, evaluation only (see `Attention`). `segment_ids`
    int32[B, L]: attention stays inside each segment (packed documents).
    """
    if kv is not None and train:
      raise ValueError("train=True with a kv cache is not supported; cached "
                       "decoding is evaluation only")
    h, kv = Attention(self.num_heads, self.dtype, self.param_dtype,
                      recompute=self.recompute_attention, name="attn")(
        nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="attn_norm")(x), positions, kv, kv_mask, segment_ids)
    y = x + h
    z = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="mlp_norm")(y)
    m = self._mlp(z, train=train, decode=kv is not None)
    delta = h + m
    return (x + delta if self.residual else delta), kv
