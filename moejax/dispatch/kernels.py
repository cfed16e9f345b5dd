"""Differentiable row movers of the dispatch layouts (custom VJPs).

Axis legend:
  S  tokens in one group (N source rows in general)
  E  experts
  m  static bound on experts per token
  R  rows of a layout (E * C slots or the sorted-blocks rows)
  N  blocks of rows; B rows per block
  D  model width (A, C: the two widths of a matmul)

The plans (`moejax.dispatch.slots`, `moejax.dispatch.dropless`) move tokens
into their layout and back with these. Their backward passes are gathers (no
scatter-add of rows), driven by the token->row map and its inverse, which the
plans build once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x float[N, D] at int index[...] (clipped into range) -> float[..., D]."""
  return jnp.take(x, index, axis=0, mode="clip")


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, valid: jax.Array,
                inverse: jax.Array, inverse_valid: jax.Array) -> jax.Array:
  """Rows of x moved into a layout: out[r] = x[index[r]] where valid[r], else 0.

  The backward pass is a gather as well: every source row n collects the
  cotangents of the (at most m) layout rows `inverse[n, :]` that copy it.

  Args:
    x: float[N, D] source rows.
    index: int32[R] source row of each layout row.
    valid: bool[R] layout rows that hold a source row.
    inverse: int32[N, m] layout rows holding each source row (any value where
      `inverse_valid` is False); together with `index` a bijection between the
      valid layout rows and the valid (n, j) pairs.
    inverse_valid: bool[N, m].
  Returns:
    float[R, D] in x's dtype.
  """
  del inverse, inverse_valid
  return jnp.where(valid[:, None], take_rows(x, index), jnp.zeros((), x.dtype))


def _gather_rows_fwd(x, index, valid, inverse, inverse_valid):
  out = gather_rows(x, index, valid, inverse, inverse_valid)
  return out, (index, valid, inverse, inverse_valid)


def _gather_rows_bwd(res, g):
  _, _, inverse, inverse_valid = res  # index, valid: the forward map
  picked = take_rows(g, inverse)  # [N, m, D]; g has x's dtype
  dx = jnp.sum(jnp.where(inverse_valid[..., None], picked.astype(jnp.float32),
                         0.0), axis=1)
  return dx.astype(g.dtype), None, None, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def gather_combine(y: jax.Array, token_gate: jax.Array, token_row: jax.Array,
                   token_valid: jax.Array, row_token: jax.Array,
                   row_gate: jax.Array) -> jax.Array:
  """out[s] = sum_j token_gate[s, j] * y[token_row[s, j]] over valid (s, j).

  The backward pass is two gathers: dy[r] = row_gate[r] * dout[row_token[r]]
  and dgate[s, j] = <dout[s], y[token_row[s, j]]>. `row_token`/`row_gate` are
  the inverse map (the same assignments seen from the rows); gradients reach
  the gates through `token_gate` only.

  Args:
    y: float[R, D] rows of the layout.
    token_gate: float32[S, m] gate of each assignment (0 where not valid).
    token_row: int32[S, m] row of each assignment.
    token_valid: bool[S, m].
    row_token: int32[R] token of each row (any value where row_gate is 0).
    row_gate: float32[R] gate of each row, 0 for empty rows.
  Returns:
    float[S, D] in y's dtype (sums in float32).
  """
  del row_token, row_gate
  picked = take_rows(y, token_row).astype(jnp.float32)  # [S, m, D]
  gate = jnp.where(token_valid, token_gate, 0.0)
  out = jnp.einsum("sm,smd->sd", gate, jnp.where(token_valid[..., None],
                                                  picked, 0.0))
  return out.astype(y.dtype)


def _gather_combine_fwd(y, token_gate, token_row, token_valid, row_token,
                        row_gate):
  out = gather_combine(y, token_gate, token_row, token_valid, row_token,
                       row_gate)
  return out, (y, token_row, token_valid, row_token, row_gate)


def _gather_combine_bwd(res, g):
  y, token_row, token_valid, row_token, row_gate = res
  g32 = g.astype(jnp.float32)
  dy = row_gate[:, None] * take_rows(g32, row_token)
  dy = jnp.where((row_gate != 0)[:, None], dy, 0.0).astype(y.dtype)
  picked = jnp.where(token_valid[..., None],
                     take_rows(y, token_row).astype(jnp.float32), 0.0)
  dgate = jnp.einsum("sd,smd->sm", g32, picked)
  return dy, dgate, None, None, None, None


gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)


# ---------------------------------------------------------------------------
# Grouped matmul over row blocks: a loop over the blocks in use.
# ---------------------------------------------------------------------------


@jax.custom_vjp
def grouped_matmul(h: jax.Array, w: jax.Array, block_expert: jax.Array,
                   order: jax.Array, num_used: jax.Array) -> jax.Array:
  """Each used block of rows times its expert's weight; other blocks are 0.

  out[b] = h[b] @ w[block_expert[b]] for b in order[:num_used], zeros for the
  other blocks. A loop over the used blocks only (dynamic trip count, no host
  sync): no FLOPs on empty blocks and no per-block copy of the weights, which
  makes it XLA:CPU's grouped matmul. The backward is the same loop:
  dh[b] = g[b] @ w[e]^T and dw[e] += h[b]^T @ g[b].

  Args:
    h: float[N, B, A] rows in blocks.
    w: float[E, A, C] expert weights.
    block_expert: int32[N] expert of each block (clipped into [0, E)).
    order: int32[N] block indices, the used ones first.
    num_used: int32[] number of used blocks.
  Returns:
    float[N, B, C] in h's dtype.
  """
  experts = jnp.minimum(block_expert, w.shape[0] - 1)

  def body(i, out):
    b = order[i]
    row = jnp.dot(h[b], w[experts[b]], preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(out, row.astype(out.dtype), b,
                                               0)
  out = jnp.zeros(h.shape[:2] + w.shape[-1:], h.dtype)
  return jax.lax.fori_loop(0, num_used, body, out)


def _grouped_matmul_fwd(h, w, block_expert, order, num_used):
  out = grouped_matmul(h, w, block_expert, order, num_used)
  return out, (h, w, block_expert, order, num_used)


def _grouped_matmul_bwd(res, g):
  h, w, block_expert, order, num_used = res
  experts = jnp.minimum(block_expert, w.shape[0] - 1)

  def body(i, carry):
    dh, dw = carry
    b = order[i]
    e = experts[b]
    dh_b = jnp.dot(g[b], w[e].T, preferred_element_type=jnp.float32)
    dh = jax.lax.dynamic_update_index_in_dim(dh, dh_b.astype(dh.dtype), b, 0)
    dw_e = dw[e] + jnp.dot(h[b].T, g[b], preferred_element_type=jnp.float32)
    dw = jax.lax.dynamic_update_index_in_dim(dw, dw_e, e, 0)
    return dh, dw
  dh, dw = jax.lax.fori_loop(
      0, num_used, body,
      (jnp.zeros_like(h), jnp.zeros(w.shape, jnp.float32)))
  return dh, dw.astype(w.dtype), None, None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def scatter_combine(rows: jax.Array, row_token: jax.Array, row_gate: jax.Array,
                    num_tokens: int) -> jax.Array:
  """float[R, D] rows -> float[S, D]: scatter-add of gate * row (the "index"
  combine; the fallback of "gather" when its token map is too large)."""
  weighted = (rows.astype(jnp.float32) * row_gate[:, None]).astype(rows.dtype)
  return jnp.zeros((num_tokens, rows.shape[-1]), rows.dtype).at[
      row_token].add(weighted)
