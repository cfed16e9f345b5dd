"""The fused CPU path: dispatch, expert MLP and combine in one block loop.

Axis legend:
  S  tokens
  E  experts
  N  row blocks; B rows per block (R = N * B rows)
  D  model width
  F  expert width; U width of the packed up-projection (2F for SwiGLU's
     [gate | in], F otherwise)

On CPU the "gather" and "sorted" plans lay their rows out in blocks of B rows,
each block holding one expert's rows (`RowBlocks`). `block_ffn` runs one loop
over the used blocks: each gathers its tokens, runs the whole expert MLP while
they are in cache and adds its gated rows to the output; empty blocks cost
nothing. Dispatch does not know the expert weights: the caller
(`moejax.experts.ffn`) passes the packed up-projection, the down-projection
and the activation of packed pre-activations.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moejax.dispatch.kernels import take_rows

BLOCK_ROWS = 256  # rows per block of the CPU block loops


class RowBlocks(NamedTuple):
  """A plan's rows in blocks of B rows, one expert per block.

  Attributes:
    row_gate: float32[N, B] gate of each row (0 for empty rows).
    row_token: int32[N, B] token of each row; a block's valid rows hold
      distinct tokens.
    row_valid: bool[N, B] rows that hold a token.
    block_expert: int32[N] expert of each block (clipped into [0, E)).
    order: int32[N] block indices, the used ones first.
    num_used: int32[] number of used blocks.
  """
  row_gate: jax.Array
  row_token: jax.Array
  row_valid: jax.Array
  block_expert: jax.Array
  order: jax.Array
  num_used: jax.Array


def _dot(a, b, contract):
  """a @ b contracting a's dim contract[0] with b's dim contract[1] (f32 out)."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)),
                                    ((), ())),
                             preferred_element_type=jnp.float32)


def _block_rows(x, row_token, row_valid, b):
  rows = take_rows(x, row_token[b])
  return jnp.where(row_valid[b][:, None], rows, jnp.zeros((), x.dtype))


def _block_moe_forward(x, w_up, w_out, row_gate, row_token, row_valid,
                       block_expert, order, num_used, act_fn, save):
  experts = jnp.minimum(block_expert, w_up.shape[0] - 1)
  num, size = row_token.shape
  dtype = x.dtype

  def body(i, carry):
    out, pre_all = carry
    b = order[i]
    e = experts[b]
    xb = _block_rows(x, row_token, row_valid, b)
    pre = _dot(xb, w_up[e], (1, 0))  # [B, U]
    yb = _dot(act_fn(pre).astype(dtype), w_out[e], (1, 0))  # [B, D]
    yb = jnp.where(row_valid[b][:, None], row_gate[b][:, None] * yb, 0.0)
    out = out.at[row_token[b]].add(yb)
    if save:
      pre_all = jax.lax.dynamic_update_index_in_dim(pre_all, pre.astype(dtype),
                                                    b, 0)
    return out, pre_all
  out = jnp.zeros(x.shape[:1] + w_out.shape[-1:], jnp.float32)
  pre_all = jnp.zeros((num, size, w_up.shape[-1]) if save else (0,), dtype)
  out, pre_all = jax.lax.fori_loop(0, num_used, body, (out, pre_all))
  return out.astype(dtype), pre_all


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def block_moe(x: jax.Array, w_up: jax.Array, w_out: jax.Array,
              row_gate: jax.Array, row_token: jax.Array, row_valid: jax.Array,
              block_expert: jax.Array, order: jax.Array, num_used: jax.Array,
              act_fn: Callable[[jax.Array], jax.Array],
              remat: bool = False) -> jax.Array:
  """Dispatch, expert MLPs and combine in one loop over the used row blocks.

  out[s] = sum over valid rows r with row_token[r] = s of
  row_gate[r] * act(x[s] @ w_up[e]) @ w_out[e], e = the row's block expert,
  for the used blocks b in order[:num_used]. Each block gathers its tokens,
  runs the whole MLP while they are in cache and adds its gated rows to the
  output; nothing of size [rows, D] is materialised. Matmuls accumulate in
  float32, the output sums in float32; activations are in x's dtype. The
  backward pass is the same loop: it gathers the output cotangents of each
  block, adds the block's input gradients to dx and accumulates the weight
  gradients (float32); the gate gradient of a row is <dout[s], y_r> =
  <dout[s] @ w_out^T, act>, from the same matmul as the activation gradient.

  Args:
    x: float[S, D] tokens.
    w_up: float[E, D, U] packed up-projection (SwiGLU: [w_gate | w_in],
      U = 2F; GELU: w_in, U = F).
    w_out: float[E, F, D].
    row_gate: float32[N, B] gate of each row (0 for empty rows).
    row_token: int32[N, B] token of each row; row_valid: bool[N, B]. A block's
      valid rows hold distinct tokens.
    block_expert: int32[N]; order: int32[N] used blocks first; num_used:
      int32[] (see `RowBlocks`).
    act_fn: static; packed pre-activations float[B, U] -> float[B, F].
    remat: static; True recomputes the pre-activations in the backward
      (one extra up-projection) instead of saving float[N, B, U].
  Returns:
    float[S, D] in x's dtype.
  """
  out, _ = _block_moe_forward(x, w_up, w_out, row_gate, row_token, row_valid,
                              block_expert, order, num_used, act_fn, False)
  return out


def _block_moe_fwd(x, w_up, w_out, row_gate, row_token, row_valid,
                   block_expert, order, num_used, act_fn, remat):
  out, pre_all = _block_moe_forward(x, w_up, w_out, row_gate, row_token,
                                    row_valid, block_expert, order, num_used,
                                    act_fn, not remat)
  return out, (x, w_up, w_out, row_gate, row_token, row_valid, block_expert,
               order, num_used, pre_all)


def _block_moe_bwd(act_fn, remat, res, g):
  (x, w_up, w_out, row_gate, row_token, row_valid, block_expert, order,
   num_used, pre_all) = res
  experts = jnp.minimum(block_expert, w_up.shape[0] - 1)
  dtype = x.dtype

  def body(i, carry):
    dx, dw_up, dw_out, dgate = carry
    b = order[i]
    e = experts[b]
    valid = row_valid[b][:, None]
    xb = _block_rows(x, row_token, row_valid, b)
    if remat:
      pre = _dot(xb, w_up[e], (1, 0))
    else:
      pre = pre_all[b].astype(jnp.float32)
    act, act_vjp = jax.vjp(act_fn, pre)
    gb = jnp.where(valid, take_rows(g, row_token[b]), jnp.zeros((), g.dtype))
    dact = _dot(gb, w_out[e], (1, 1))  # [B, F], before the gate
    dgate = jax.lax.dynamic_update_index_in_dim(
        dgate, jnp.sum(dact * act, axis=-1), b, 0)
    gate = row_gate[b][:, None]
    gw = (gate * gb.astype(jnp.float32)).astype(dtype)
    dw_out = jax.lax.dynamic_update_index_in_dim(
        dw_out, dw_out[e] + _dot(act.astype(dtype), gw, (0, 0)), e, 0)
    dpre = act_vjp(gate * dact)[0].astype(dtype)  # [B, U]
    dw_up = jax.lax.dynamic_update_index_in_dim(
        dw_up, dw_up[e] + _dot(xb, dpre, (0, 0)), e, 0)
    dxb = jnp.where(valid, _dot(dpre, w_up[e], (1, 1)), 0.0)  # [B, D]
    dx = dx.at[row_token[b]].add(dxb)
    return dx, dw_up, dw_out, dgate
  dx, dw_up, dw_out, dgate = jax.lax.fori_loop(
      0, num_used, body,
      (jnp.zeros(x.shape, jnp.float32), jnp.zeros(w_up.shape, jnp.float32),
       jnp.zeros(w_out.shape, jnp.float32),
       jnp.zeros(row_gate.shape, jnp.float32)))
  return (dx.astype(x.dtype), dw_up.astype(w_up.dtype),
          dw_out.astype(w_out.dtype), dgate.astype(row_gate.dtype), None,
          None, None, None, None)


block_moe.defvjp(_block_moe_fwd, _block_moe_bwd)


def block_ffn(x: jax.Array, blocks: RowBlocks, w_up: jax.Array,
              w_out: jax.Array, act_fn: Callable[[jax.Array], jax.Array],
              remat: bool = False) -> jax.Array:
  """`block_moe` over a plan's `RowBlocks`: x float[S, D] -> float[S, D].

  Args:
    x: float[S, D] tokens.
    blocks: the plan's row blocks (`GatherPlan.row_blocks`,
      `BlockPlan.row_blocks`).
    w_up: float[E, D, U] packed up-projection; w_out: float[E, F, D].
    act_fn: packed pre-activations float[B, U] -> hidden float[B, F] (a
      module-level function: it is a static argument).
    remat: recompute the pre-activations in the backward.
  Returns:
    float[S, D] in x's dtype.
  """
  # XLA:CPU runs these small matmuls faster in float32 than in bfloat16
  # (which it converts per call): the loop computes in float32 whatever the
  # payload dtype, and returns the payload dtype.
  f32 = jnp.float32
  out = block_moe(x.astype(f32), w_up.astype(f32), w_out.astype(f32),
                  blocks.row_gate.astype(f32), blocks.row_token,
                  blocks.row_valid, blocks.block_expert, blocks.order,
                  blocks.num_used, act_fn, remat)
  return out.astype(x.dtype)
