"""Experts: their weights, the one MLP, and `ffn` for every dispatch plan.

Axis legend:
  G  routing groups
  S  tokens in one group
  E  experts
  C  capacity (slots per expert)
  R  rows of a dropless layout
  D  model width
  F  expert width
  U  width of the packed up-projection (2F for SwiGLU, F for GELU)

Expert weights are a dict of stacked arrays, `w_in` float[E, D, F],
`w_out` float[E, F, D] and, for SwiGLU, `w_gate` float[E, D, F], with the
logical axis names of `WEIGHT_AXES` ("expert", "embed", "mlp") so that a mesh
can shard them (the `Experts` module holds them). The MLP is written once:

  mlp(h) = act(h @ w_in [, h @ w_gate]) @ w_out     (`mlp`, `activate`)

and runs on every layout through the `matmul` it is given: a plan's
`matmul` (`[E, C, D]` slots or sorted rows), a `[G, E, C, D]` batch
(`batched_matmul`, expert parallelism) or the dense FFN's own kernels
(`DenseFFN`, the unbatched case). `ffn(plan, x, weights)` picks the path from
the plan's type: the fused CPU block loop for the plans that have one
(`moejax.dispatch.cpu`, given the packed weights and `packed_activation`),
else dispatch -> `mlp` -> combine.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax import dispatch, sharding

ACTIVATIONS = ("swiglu", "gelu")
# Logical axis names of the stacked expert weights.
WEIGHT_AXES = {"w_in": ("expert", "embed", "mlp"),
               "w_gate": ("expert", "embed", "mlp"),
               "w_out": ("expert", "mlp", "embed")}
HIDDEN = "expert_hidden"  # checkpoint name of the hidden activations
# Checkpoint name of the routed experts' inputs (the dispatched rows `mlp`
# gets; block remat policies may save them, `moejax.nn.blocks`).
EXPERT_INPUTS = "expert_inputs"
# Checkpoint names of the up-projections h @ w_in / h @ w_gate (the
# pre-activations float[..., F]) and of the routed experts' outputs where the
# combine reads them (token side, after any all-to-all back).
EXPERT_PRE = "expert_pre_activations"
EXPERT_OUTPUTS = "expert_outputs"


def activate(activation: str, up: jax.Array,
             gate: jax.Array | None = None) -> jax.Array:
  """The hidden activations from the up-projections (float[..., F] each).

  Args:
    activation: "swiglu" (silu(gate) * up) or "gelu" (gelu(up); gate unused).
    up: h @ w_in.
    gate: h @ w_gate (SwiGLU).
  """
  if activation == "swiglu":
    return jax.nn.silu(gate) * up
  if activation == "gelu":
    return jax.nn.gelu(up)
  raise _unsupported(activation)


def _unsupported(activation: str) -> ValueError:
  return ValueError(f"activation={activation!r} is not supported; allowed: "
                    f"{', '.join(ACTIVATIONS)}")


def _swiglu_packed(pre: jax.Array) -> jax.Array:
  gate, up = jnp.split(pre, 2, axis=-1)  # pre = [gate | in]
  return activate("swiglu", up, gate)


def _gelu_packed(pre: jax.Array) -> jax.Array:
  return activate("gelu", pre)


def packed_activation(activation: str
                      ) -> tuple[Callable[[jax.Array], jax.Array],
                                 tuple[str, ...]]:
  """The activation of packed pre-activations float[..., U] and the weights
  packed along U (SwiGLU: [w_gate | w_in]; GELU: w_in)."""
  if activation == "swiglu":
    return _swiglu_packed, ("w_gate", "w_in")
  if activation == "gelu":
    return _gelu_packed, ("w_in",)
  raise _unsupported(activation)


def batched_matmul(h: jax.Array, w: jax.Array) -> jax.Array:
  """h float[G, E, C, A] times w float[E, A, B] -> float[G, E, C, B]."""
  return jnp.einsum("geca,eab->gecb", h, w)


def mlp(h: jax.Array, weights: dict[str, Any], activation: str = "swiglu",
        matmul: Callable[[jax.Array, Any], jax.Array] = jnp.matmul,
        remat: bool = False, hidden_names: tuple[str, ...] | None = None,
        input_name: str | None = EXPERT_INPUTS) -> jax.Array:
  """The expert MLP on any layout: act(h @ w_in [, h @ w_gate]) @ w_out.

  Args:
    h: float[..., D] rows in the layout `matmul` understands.
    weights: `w_in`, `w_out` and, for SwiGLU, `w_gate` (whatever `matmul`
      takes: stacked arrays, or the dense FFN's kernels).
    activation: "swiglu" or "gelu".
    matmul: (rows, weight) -> rows times the weight.
    remat: recompute the hidden activations (tagged `HIDDEN`) in the
      backward instead of saving them.
    hidden_names: logical names to constrain the float[..., F] hidden
      activations with (GSPMD expert parallelism), or None.
    input_name: checkpoint name of `h` (`EXPERT_INPUTS`; None: no name, the
      dense FFN).
  Returns:
    float[..., D].
  """
  if input_name is not None:
    h = checkpoint_name(h, input_name)
  def hidden(h, weights):
    up = checkpoint_name(matmul(h, weights["w_in"]), EXPERT_PRE)
    gate = (checkpoint_name(matmul(h, weights["w_gate"]), EXPERT_PRE)
            if activation == "swiglu" else None)
    return checkpoint_name(activate(activation, up, gate), HIDDEN)
  if remat:
    hidden = jax.checkpoint(
        hidden,
        policy=jax.checkpoint_policies.save_anything_except_these_names(HIDDEN))
  up = hidden(h, weights)
  if hidden_names is not None:
    up = sharding.constrain(up, hidden_names)
  return matmul(up, weights["w_out"])


def ffn(plan: dispatch.Plan, x: jax.Array, weights: dict[str, jax.Array],
        activation: str = "swiglu", remat: bool = False) -> jax.Array:
  """One group through its routed experts.

  Args:
    plan: a dispatch plan (`moejax.dispatch.plan`).
    x: float[S, D] tokens.
    weights: `w_in` float[E, D, F], `w_out` float[E, F, D] and, for SwiGLU,
      `w_gate` float[E, D, F].
    activation: "swiglu" or "gelu".
    remat: recompute the expert hidden activations in the backward instead of
      saving them.
  Returns:
    float[S, D]: sum over each token's kept experts of gate * expert(x).
  """
  if plan.block_loop:  # CPU: the whole FFN in one loop over the row blocks
    act_fn, packed = packed_activation(activation)
    w_up = (weights[packed[0]] if len(packed) == 1 else
            jnp.concatenate([weights[name] for name in packed], axis=-1))
    return dispatch.block_ffn(x, plan.row_blocks(), w_up, weights["w_out"],
                              act_fn, remat)
  h = plan.dispatch(x)
  y = mlp(h, weights, activation, plan.matmul, remat=remat)
  return plan.combine(checkpoint_name(y, EXPERT_OUTPUTS))


def weight_shapes(num_experts: int, d_model: int, width: int,
                  activation: str = "swiglu") -> dict[str, tuple[int, ...]]:
  """Shapes of the stacked expert weights (E, D, F as in the legend)."""
  e, d, f = num_experts, d_model, width
  shapes = {"w_in": (e, d, f), "w_out": (e, f, d)}
  if activation == "swiglu":
    shapes["w_gate"] = (e, d, f)
  return shapes


# Fan-in truncated normal per expert (the expert axis is a batch axis).
init_weight = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


class FFNBase(nn.Module):
  """The options of the feed-forward modules (`Experts`, `DenseFFN`).

  Attributes:
    d_model: D.
    width: F, the hidden width.
    activation: "swiglu" or "gelu" (`ACTIVATIONS`).
    dtype: activation dtype.
    param_dtype: parameter dtype.
  """
  d_model: int
  width: int
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class _ExpertCount(nn.Module):
  """`Experts`' first field: `Experts(num_experts, d_model, width, ...)`."""
  num_experts: int


# Dataclass fields follow the reversed MRO: `num_experts`, then `FFNBase`'s.
class Experts(FFNBase, _ExpertCount):
  """Holds E experts' weights; returns them as a dict for `ffn`."""

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    shapes = weight_shapes(self.num_experts, self.d_model, self.width,
                           self.activation)
    weights = {
        name: self.param(name, nn.with_logical_partitioning(
            init_weight, WEIGHT_AXES[name]), shape, self.param_dtype)
        for name, shape in shapes.items()}
    return {k: v.astype(self.dtype) for k, v in weights.items()}


class DenseFFN(FFNBase):
  """The dense feed-forward block (also the shared, always-on expert): `mlp`
  with unbatched kernels (logical axes `WEIGHT_AXES` without "expert")."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x float[..., D] -> float[..., D]."""
    def dense(name, features):
      return nn.DenseGeneral(
          features, use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), WEIGHT_AXES[name][1:]))
    layers = {"w_in": dense("w_in", self.width),
              "w_out": dense("w_out", self.d_model)}
    if self.activation == "swiglu":
      layers["w_gate"] = dense("w_gate", self.width)
    return mlp(x, layers, self.activation, matmul=lambda h, layer: layer(h),
               input_name=None)
