"""Batched expert feed-forward networks.

Axis legend:
  E  experts
  C  capacity (slots per expert)
  M  rows of a dropless layout
  D  model width
  F  expert width
  S  tokens

Expert weights are stacked `[E, D, F]` / `[E, F, D]` with logical axis names
("expert", "embed", "mlp") so that a mesh can shard them. The compute itself is
the pure function `expert_ffn`, which runs in whatever layout the dispatch plan
uses.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

ACTIVATIONS = ("swiglu", "gelu")


def expert_ffn(plan, x: jax.Array, weights: dict[str, jax.Array],
               activation: str = "swiglu", remat: bool = False) -> jax.Array:
  """One group through its routed experts.

  Args:
    plan: a dispatch plan (`moejax.dispatch.plan`).
    x: float[S, D] tokens.
    weights: `w_in` float[E, D, F], `w_out` float[E, F, D] and, for SwiGLU,
      `w_gate` float[E, D, F].
    activation: "swiglu" or "gelu".
    remat: recompute the expert hidden activations in the backward instead of
      saving them (they are tagged `checkpoint_name(..., "expert_hidden")`).
  Returns:
    float[S, D]: sum over each token's kept experts of gate * expert(x).
  """
  fused = getattr(plan, "ffn", None)  # the whole FFN in one block loop (CPU)
  out = fused(x, weights, activation, remat) if fused is not None else None
  if out is not None:
    return out

  def hidden(h, weights):
    up = plan.matmul(h, weights["w_in"])
    if activation == "swiglu":
      up = nn.silu(plan.matmul(h, weights["w_gate"])) * up
    else:
      up = nn.gelu(up)
    return checkpoint_name(up, "expert_hidden")
  if remat:
    hidden = jax.checkpoint(
        hidden, policy=jax.checkpoint_policies.save_anything_except_these_names(
            "expert_hidden"))
  up = hidden(plan.dispatch(x), weights)
  return plan.combine(plan.matmul(up, weights["w_out"]))


class Experts(nn.Module):
  """Holds E experts' weights; returns them as a dict for `expert_ffn`."""
  num_experts: int
  d_model: int
  width: int
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=-2, out_axis=-1,
                                            batch_axis=(0,))
    e, d, f = self.num_experts, self.d_model, self.width
    names_in, names_out = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    weights = {
        "w_in": self.param("w_in", nn.with_logical_partitioning(init, names_in),
                           (e, d, f), self.param_dtype),
        "w_out": self.param("w_out",
                            nn.with_logical_partitioning(init, names_out),
                            (e, f, d), self.param_dtype),
    }
    if self.activation == "swiglu":
      weights["w_gate"] = self.param(
          "w_gate", nn.with_logical_partitioning(init, names_in), (e, d, f),
          self.param_dtype)
    return {k: v.astype(self.dtype) for k, v in weights.items()}


class DenseFFN(nn.Module):
  """The dense feed-forward block (also the shared, always-on expert)."""
  d_model: int
  width: int
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x float[..., D] -> float[..., D]."""
    def dense(name, features, names):
      return nn.DenseGeneral(
          features, use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), names))
    up = dense("w_in", self.width, ("embed", "mlp"))(x)
    if self.activation == "swiglu":
      up = nn.silu(dense("w_gate", self.width, ("embed", "mlp"))(x)) * up
    else:
      up = nn.gelu(up)
    return dense("w_out", self.d_model, ("mlp", "embed"))(up)
