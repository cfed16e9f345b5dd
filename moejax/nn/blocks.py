"""Pre-norm Transformer block whose MLP is dense or an MoE layer.

Axis legend:
  B  batch
  L  sequence length
  D  model width

With a key/value cache (`kv`, see `moejax.nn.attention`) the block decodes:
attention reads and extends the cache, and an MoE MLP routes in evaluation
mode with `decode_moe`'s config (each token on its own, none dropped).

Block rematerialisation (`REMAT_POLICIES`, the models' `remat` settings):
what each block keeps for the backward pass; the rest is recomputed there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.checks import check_choice, check_heads, check_positive_ints
from moejax.experts import (EXPERT_INPUTS, EXPERT_OUTPUTS, EXPERT_PRE,
                            DenseFFN)
from moejax.nn.attention import IMPLEMENTATIONS, Attention
from moejax.nn.moe import MoE, MoEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

@dataclasses.dataclass(frozen=True)
class RematPolicy:
  """How each block is rematerialised (an entry of `REMAT_POLICIES`).

  Attributes:
    block: `nn.remat` of every block: its forward is recomputed in the
      backward pass from the block's inputs.
    saved: with `block`, the `jax.checkpoint` policy of what else is kept
      (None: nothing).
    recompute_attention: the attention recomputes its scores and
      probabilities in the backward pass from the saved queries and keys
      (`moejax.nn.attention`), everything else kept.
    moe_saved: without `block`, the MoE layer runs under `jax.checkpoint`
      with this policy (None: not rematerialised): what it does not save
      (routing, dispatch gathers, layout copies, the activation) is
      recomputed in the backward pass from the layer's input.
  """
  block: bool = False
  saved: Callable[..., bool] | None = None
  recompute_attention: bool = False
  moe_saved: Callable[..., bool] | None = None


# The models' `remat` settings by name; adding one is one line here.
REMAT_POLICIES: dict[str, RematPolicy] = {
    "none": RematPolicy(),
    # recompute the whole block: the least memory, one more forward
    "block": RematPolicy(block=True),
    # block remat keeping the routed experts' inputs (the dispatched rows,
    # `EXPERT_INPUTS`): the backward recomputes attention and the expert MLPs
    # but not the dispatch (nor, with expert parallelism, its all-to-all).
    # The fused CPU block loop has no dispatched rows: there it is "block".
    "save_expert_inputs": RematPolicy(
        block=True,
        saved=jax.checkpoint_policies.save_only_these_names(EXPERT_INPUTS)),
    # block remat keeping the outputs of matmuls without batch dimensions:
    # the attention's query / key / value / output projections, the router
    # logits, dense MLPs. The backward recomputes the attention scores, the
    # routing and dispatch and the expert matmuls (batched over experts)
    "save_dots": RematPolicy(
        block=True,
        saved=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
    # "save_dots" and the expert matmuls' outputs (the up-projections and
    # the experts' token-side outputs, `moejax.experts` names): the backward
    # recomputes the attention scores and their product with the values,
    # norms, routing, dispatch gathers and the activation, but no weight
    # matmul of the forward
    "save_matmuls": RematPolicy(
        block=True,
        saved=jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            jax.checkpoint_policies.save_only_these_names(EXPERT_PRE,
                                                          EXPERT_OUTPUTS))),
    # keep everything but the attention scores / probabilities float[B, H, L,
    # L], the largest activations at long sequences
    "recompute_attention": RematPolicy(recompute_attention=True),
    # "recompute_attention", and of the MoE layer keep only the expert
    # matmuls' operands: the dispatched rows, the up-projections and the
    # experts' token-side outputs (`moejax.experts` names); its router,
    # dispatch gathers, layout copies around the all-to-alls, activation and
    # combine products are recomputed (no all-to-all is redone)
    "save_moe_operands": RematPolicy(
        recompute_attention=True,
        moe_saved=jax.checkpoint_policies.save_only_these_names(
            EXPERT_INPUTS, EXPERT_PRE, EXPERT_OUTPUTS)),
}
REMAT_MODES = tuple(REMAT_POLICIES)
# Aliases of the boolean `remat` of earlier versions.
_REMAT_ALIASES = {True: "block", False: "none"}


def remat_mode(value: Any) -> str:
  """The remat mode of `value` (a `REMAT_MODES` name, or True / False for
  "block" / "none"); ValueError naming the field otherwise."""
  if isinstance(value, bool):
    return _REMAT_ALIASES[value]
  if value not in REMAT_MODES:
    raise ValueError(f"remat={value!r} is not supported; allowed: "
                     f"{', '.join(REMAT_MODES)} (True / False: block / none)")
  return value


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
    dtype: activation dtype name ("float32" or "bfloat16"); routing math is
      float32 whatever this is (params: float32, or the model config's
      `param_dtype` where it has one).
    num_kv_heads: key/value heads G of grouped-query attention (must divide
      `num_heads`; 1 = multi-query); None = `num_heads` (plain multi-head
      attention, the parameters of configs written before this field).
    attention: the attention implementation, one of
      `moejax.nn.attention.IMPLEMENTATIONS`: "xla" (einsums around
      materialised scores, the reference), "dot_product"
      (`jax.nn.dot_product_attention`, cuDNN flash attention on GPU),
      "splash" (the Pallas TPU splash kernel) or "auto" (per backend,
      `moejax.backend.choose_attention`).
  """
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  d_ff: int = 512
  moe: MoEConfig | None = None
  moe_every: int = 1
  dtype: str = "float32"
  num_kv_heads: int | None = None
  attention: str = "xla"

  def __post_init__(self):
    check_positive_ints(self, ("num_layers", "d_model", "num_heads", "d_ff",
                               "moe_every"))
    check_heads(self.d_model, self.num_heads)
    check_choice("dtype", self.dtype, DTYPES)
    check_choice("attention", self.attention, IMPLEMENTATIONS)
    kv = self.num_kv_heads
    if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int)
                           or kv < 1 or self.num_heads % kv):
      raise ValueError(f"num_kv_heads={kv!r} is not allowed; allowed: None or "
                       f"a divisor of num_heads={self.num_heads}")

  @property
  def kv_heads(self) -> int:
    """G, the key/value heads (`num_kv_heads`, else `num_heads`)."""
    return self.num_kv_heads or self.num_heads


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
    moe_saved: the MoE MLP under `jax.checkpoint` with this policy (see
      `RematPolicy.moe_saved`), or None.
    num_kv_heads: key/value heads of the attention (None = `num_heads`).
    attention: the attention implementation (`StackConfig.attention`).
  """
  num_heads: int
  d_ff: int
  moe: MoEConfig | None = None
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  recompute_attention: bool = False
  moe_saved: Callable[..., bool] | None = None
  num_kv_heads: int | None = None
  attention: str = "xla"

  def _attention(self, **kwargs) -> Attention:
    """The attention "attn" of this block's options."""
    return Attention(self.num_heads, self.dtype, self.param_dtype,
                     recompute=self.recompute_attention,
                     num_kv_heads=self.num_kv_heads,
                     implementation=self.attention, name="attn", **kwargs)

  def _mlp(self, z: jax.Array, *, train: bool, decode: bool = False,
           token_mask: jax.Array | None = None) -> jax.Array:
    """The MLP "mlp": float[..., D] -> float[..., D], dense without `moe`,
    else the MoE layer (with `decode_moe`'s config when `decode`).
    `token_mask` (bool[B, L]): the MoE routes only these tokens (the others,
    e.g. a MoD block's empty slots, take no capacity)."""
    width = z.shape[-1]
    if self.moe is None:
      return DenseFFN(width, self.d_ff, self.activation, self.dtype,
                      self.param_dtype, name="mlp")(z)
    moe = decode_moe(self.moe) if decode else self.moe

    def routed(module, z, token_mask):
      del module  # the layer is created in this module's scope
      return MoE(moe, width, self.dtype, self.param_dtype, name="mlp")(
          z, train=train, token_mask=token_mask)
    if self.moe_saved is not None and not decode:
      routed = nn.remat(routed, policy=self.moe_saved)
    return routed(self, z, token_mask)


class Block(BlockBase):
  """x float[B, L, D] -> float[B, L, D]: x + attn(norm x), then + mlp(norm x)."""
  residual: bool = True  # False: return the update Δ alone (for MoD wrappers)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, train: bool,
               kv=None, kv_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               token_mask: jax.Array | None = None):
    """Returns (x + Δ or Δ, the updated cache or None without `kv`).

    `kv` / `kv_mask` (bool[B, L], the tokens whose keys/values are stored):
    cached decoding, evaluation only (see `Attention`). `segment_ids`
    int32[B, L]: attention stays inside each segment (packed documents).
    `token_mask` (bool[B, L]): the tokens an MoE MLP routes (default all).
    """
    if kv is not None and train:
      raise ValueError("train=True with a kv cache is not supported; cached "
                       "decoding is evaluation only")
    h, kv = self._attention()(
        nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="attn_norm")(x), positions, kv, kv_mask, segment_ids)
    y = x + h
    z = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name="mlp_norm")(y)
    m = self._mlp(z, train=train, decode=kv is not None,
                  token_mask=token_mask)
    delta = h + m
    return (x + delta if self.residual else delta), kv
