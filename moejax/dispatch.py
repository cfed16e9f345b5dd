"""Dispatchers: turn a `Routing` into static-shape gather/compute/combine plans.

Axis legend:
  S  tokens in one group
  E  experts
  C  capacity (slots per expert)
  D  model width
  F  expert width
  m  static bound on experts per token (`max_fanout`)
  M  rows of the ragged dropless layout (S * m)
  B  rows per block of the sorted-blocks layout
  N  blocks of the sorted-blocks layout (static bound); R = N * B rows

A plan moves tokens into an expert-major layout, runs expert weights on it and
brings the results back:

  h = plan.dispatch(x)          # x float[S, D] -> plan layout ([E, C, D] or [R, D])
  h = plan.matmul(h, w)         # w float[E, D, F]: each row times its expert's weight
  y = plan.combine(h)           # -> float[S, D]: sum over kept assignments of gate * row

`plan.kept` (bool[S, E]) holds the assignments that survived capacity. Strategies:
  capacity-bounded, `[E, C, D]` layout, identical kept sets:
  "einsum"   one-hot dispatch/combine tensors (the GShard reference; O(S*E*C*D)).
  "index"    gather into slots (column-wise argsort of priorities), scatter-add
             back.
  "gather"   slots assigned by one sort of the S*m routed assignments (for
             m = E, a top-C per expert column); dispatch and combine are
             gathers whose backward passes are gathers too (custom VJPs over
             the token->slot map and its inverse), no scatter-add of rows.
             With a large m (S*m > 2*E*C) combine falls back to the
             scatter-add of "index".
  dropless (ignore capacity; keep every assignment among each token's
  `max_fanout` largest gates, default E = everything):
  "ragged"   rows sorted by expert, `jax.lax.ragged_dot` for the expert matmuls
             (a real grouped matmul on GPU/TPU; XLA:CPU lowers it to a dense
             matmul over every expert).
  "sorted"   rows sorted by expert and padded per expert to blocks of B rows
             (static bound N = (S*m + E*(B-1)) // B blocks); each block times its
             expert's weight (a loop over the used blocks on CPU, one batched
             matmul with per-block weights elsewhere); gather dispatch/combine.
  "dropless" "sorted" on CPU, "ragged" elsewhere (`jax.default_backend()`).

On CPU, "gather" and "sorted" plans also offer `plan.ffn(x, weights)`, the
whole expert FFN in one loop over the used blocks of rows (`block_moe`: each
block gathers its tokens, runs the MLP, adds its gated rows to the output; the
backward is the same loop); `moejax.nn.experts.expert_ffn` takes it when
present. Empty slots and blocks cost nothing there.
All paths are jit-able with static shapes and no host synchronisation.
"""
from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from moejax.routing.base import Routing, check_int
# Re-exported: the capacity formula belongs to routing (methods size by it).
from moejax.routing.base import capacity  # noqa: F401

STRATEGIES = ("einsum", "index", "gather", "dropless", "sorted", "ragged")
# Strategies that ignore capacity and keep every assignment within max_fanout.
DROPLESS = ("dropless", "sorted", "ragged")
_HIGHEST = jax.lax.Precision.HIGHEST


def ratio_capacity(num_tokens: int, ratio: float) -> int:
  """Expert-choice / MoD capacity `ceil(ratio * S)`, at least 1."""
  if not 0 < ratio:
    raise ValueError(f"capacity ratio={ratio} is out of range; allowed: > 0")
  return max(1, math.ceil(ratio * num_tokens))


def slot_ranks(routing: Routing) -> tuple[jax.Array, jax.Array]:
  """Each expert's order of its routed tokens.

  Returns:
    order: int32[S, E]; order[r, e] = token at rank r of expert e (routed tokens
      by priority descending, ties to the lower token index, then unrouted).
    rank: int32[S, E]; rank[s, e] = position of token s in expert e's order.
  """
  num_tokens = routing.gates.shape[0]
  key = jnp.where(routing.routed, -routing.priority.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(key, axis=0, stable=True).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None],
                          order.shape)
  rank = jnp.zeros_like(order).at[order, jnp.arange(order.shape[1])[None, :]].set(
      rows)
  return order, rank


@flax.struct.dataclass
class SlotPlan:
  """Capacity-bounded plan in the `[E, C, D]` layout ("einsum" and "index").

  Attributes:
    gates: float32[S, E] the routing's gates.
    position: int32[S, E] slot of each kept assignment, -1 elsewhere.
    token_index: int32[E, C] token held by each slot (0 for empty slots).
    slot_gate: float32[E, C] gate of each slot, 0 for empty slots.
    strategy: "einsum" or "index" (static).
  """
  gates: jax.Array
  position: jax.Array
  token_index: jax.Array
  slot_gate: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="index")

  @property
  def capacity(self) -> int:
    return self.token_index.shape[1]

  @property
  def kept(self) -> jax.Array:
    """bool[S, E]: assignments that fit in capacity."""
    return self.position >= 0

  @property
  def slot_valid(self) -> jax.Array:
    """bool[E, C]: slots that hold a token."""
    return self.slot_gate != 0

  def _one_hot(self) -> jax.Array:
    return jax.nn.one_hot(self.position, self.capacity, dtype=jnp.float32)

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[E, C, D]; empty slots are zeros."""
    if self.strategy == "einsum":
      mask = self._one_hot().astype(x.dtype)
      return jnp.einsum("sec,sd->ecd", mask, x, precision=_HIGHEST)
    h = jnp.take(x, self.token_index, axis=0)
    return jnp.where(self.slot_valid[..., None], h, jnp.zeros((), x.dtype))

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[E, C, A] times w float[E, A, B] -> float[E, C, B]."""
    return jnp.einsum("eca,eab->ecb", h, w)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[E, C, D] -> float[S, D]: sum over kept (s, e) of gate * y[e, slot]."""
    if self.strategy == "einsum":
      weights = self._one_hot() * self.gates[..., None]
      return jnp.einsum("sec,ecd->sd", weights.astype(y.dtype), y,
                        precision=_HIGHEST)
    num_tokens, width = self.gates.shape[0], y.shape[-1]
    weighted = y * self.slot_gate[..., None].astype(y.dtype)
    out = jnp.zeros((num_tokens, width), y.dtype)
    return out.at[self.token_index.reshape(-1)].add(weighted.reshape(-1, width))


@flax.struct.dataclass
class DroplessPlan:
  """Plan in the sorted-by-expert `[M, D]` layout ("dropless").

  Attributes:
    gates: float32[S, E] the routing's gates.
    kept: bool[S, E] assignments in the layout (all routed ones within the bound).
    row_token: int32[M] token of each row (0 for padding rows at the end).
    row_gate: float32[M] gate of each row (0 for padding rows).
    group_sizes: int32[E] rows per expert, in expert order.
  """
  gates: jax.Array
  kept: jax.Array
  row_token: jax.Array
  row_gate: jax.Array
  group_sizes: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="dropless")

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[M, D] rows sorted by expert; padding rows zero."""
    h = jnp.take(x, self.row_token, axis=0)
    return jnp.where((self.row_gate != 0)[:, None], h, jnp.zeros((), x.dtype))

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[M, A] times each row's expert weight w float[E, A, B] -> [M, B]."""
    return jax.lax.ragged_dot(h, w, self.group_sizes)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[M, D] -> float[S, D]."""
    num_tokens, width = self.gates.shape[0], y.shape[-1]
    weighted = y * self.row_gate[:, None].astype(y.dtype)
    return jnp.zeros((num_tokens, width), y.dtype).at[self.row_token].add(weighted)


# ---------------------------------------------------------------------------
# Gather-based dispatch and combine (custom VJPs: the backward is a gather).
# ---------------------------------------------------------------------------


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
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
  return jnp.where(valid[:, None], _take_rows(x, index), jnp.zeros((), x.dtype))


def _gather_rows_fwd(x, index, valid, inverse, inverse_valid):
  out = gather_rows(x, index, valid, inverse, inverse_valid)
  return out, (index, valid, inverse, inverse_valid)


def _gather_rows_bwd(res, g):
  _, _, inverse, inverse_valid = res  # index, valid: the forward map
  picked = _take_rows(g, inverse)  # [N, m, D]; g has x's dtype
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
  picked = _take_rows(y, token_row).astype(jnp.float32)  # [S, m, D]
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
  dy = row_gate[:, None] * _take_rows(g32, row_token)
  dy = jnp.where((row_gate != 0)[:, None], dy, 0.0).astype(y.dtype)
  picked = jnp.where(token_valid[..., None],
                     _take_rows(y, token_row).astype(jnp.float32), 0.0)
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


def use_loop_matmul(backend: str | None = None) -> bool:
  """Whether plans use the block loop (`grouped_matmul`): on CPU, where XLA
  runs small batched matmuls poorly and has no grouped matmul; accelerators
  prefer one batched matmul."""
  return (backend or jax.default_backend()) == "cpu"


BLOCK_ROWS = 256  # rows per block of the CPU block loops


def slot_block_size(capacity_: int, target: int = BLOCK_ROWS) -> int:
  """Rows B of the "gather" block loop: `target`, or C rounded up to a
  multiple of 8 when C is smaller (the capacity is padded to whole blocks)."""
  return min(target, 8 * -(-capacity_ // 8))


# ---------------------------------------------------------------------------
# Fused dispatch + expert FFN over row blocks (the CPU path of "gather" and
# "sorted"): one loop over the used blocks, each gathering its tokens and
# running the whole expert MLP while the block is in cache.
# ---------------------------------------------------------------------------


def _activation(activation: str):
  if activation == "swiglu":
    def fn(pre):  # pre = [gate | in] pre-activations
      gate, up = jnp.split(pre, 2, axis=-1)
      return jax.nn.silu(gate) * up
    return fn
  if activation == "gelu":
    return jax.nn.gelu
  raise ValueError(f"activation={activation!r} is not supported; allowed: "
                   f"swiglu, gelu")


def _dot(a, b, contract):
  """a @ b contracting a's dim contract[0] with b's dim contract[1] (f32 out)."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)),
                                    ((), ())),
                             preferred_element_type=jnp.float32)


def _block_rows(x, row_token, row_valid, b):
  rows = _take_rows(x, row_token[b])
  return jnp.where(row_valid[b][:, None], rows, jnp.zeros((), x.dtype))


def _block_moe_forward(x, w_up, w_out, row_gate, row_token, row_valid,
                       block_expert, order, num_used, activation, save):
  act_fn = _activation(activation)
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
              activation: str = "swiglu", remat: bool = False) -> jax.Array:
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
    w_up: float[E, D, U]: SwiGLU [w_gate | w_in] (U = 2F), or GELU w_in (U = F).
    w_out: float[E, F, D].
    row_gate: float32[N, B] gate of each row (0 for empty rows).
    row_token: int32[N, B] token of each row; row_valid: bool[N, B]. A block's
      valid rows hold distinct tokens.
    block_expert: int32[N]; order: int32[N] used blocks first; num_used:
      int32[] (see `grouped_matmul`).
    activation: "swiglu" or "gelu" (static).
    remat: static; True recomputes the pre-activations in the backward
      (one extra up-projection) instead of saving float[N, B, U].
  Returns:
    float[S, D] in x's dtype.
  """
  out, _ = _block_moe_forward(x, w_up, w_out, row_gate, row_token, row_valid,
                              block_expert, order, num_used, activation, False)
  return out


def _block_moe_fwd(x, w_up, w_out, row_gate, row_token, row_valid,
                   block_expert, order, num_used, activation, remat):
  out, pre_all = _block_moe_forward(x, w_up, w_out, row_gate, row_token,
                                    row_valid, block_expert, order, num_used,
                                    activation, not remat)
  return out, (x, w_up, w_out, row_gate, row_token, row_valid, block_expert,
               order, num_used, pre_all)


def _block_moe_bwd(activation, remat, res, g):
  (x, w_up, w_out, row_gate, row_token, row_valid, block_expert, order,
   num_used, pre_all) = res
  act_fn = _activation(activation)
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
    gb = jnp.where(valid, _take_rows(g, row_token[b]), jnp.zeros((), g.dtype))
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


def fused_ffn(x: jax.Array, weights: dict[str, jax.Array], activation: str,
              row_gate: jax.Array, row_token: jax.Array, row_valid: jax.Array,
              block_expert: jax.Array, order: jax.Array, num_used: jax.Array,
              remat: bool = False) -> jax.Array:
  """`block_moe` with the weights of `moejax.nn.experts` (w_in, w_gate,
  w_out): x float[S, D] -> float[S, D]."""
  if activation == "swiglu":
    w_up = jnp.concatenate([weights["w_gate"], weights["w_in"]], axis=-1)
  else:
    w_up = weights["w_in"]
  # XLA:CPU runs these small matmuls faster in float32 than in bfloat16
  # (which it converts per call): the loop computes in float32 whatever the
  # payload dtype, and returns the payload dtype.
  out = block_moe(x.astype(jnp.float32), w_up.astype(jnp.float32),
                  weights["w_out"].astype(jnp.float32),
                  row_gate.astype(jnp.float32), row_token, row_valid,
                  block_expert, order, num_used, activation, remat)
  return out.astype(x.dtype)


def _assignments(routing: Routing, max_fanout: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Each token's routed experts, at most `max_fanout` of them.

  Returns:
    expert: int32[S, m] expert of each assignment (distinct per token).
    valid: bool[S, m] assignment exists (routed); with m < E the kept ones are
      the token's m largest |gates|.
  """
  num_tokens, num_experts = routing.gates.shape
  routed = routing.routed
  if max_fanout >= num_experts:
    expert = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                              (num_tokens, num_experts))
    return expert, routed
  key = jax.lax.stop_gradient(
      jnp.where(routed, jnp.abs(routing.gates.astype(jnp.float32)), -1.0))
  values, expert = jax.lax.top_k(key, max_fanout)
  return expert.astype(jnp.int32), values >= 0


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
  return jnp.cumsum(x) - x


def _inverse_permutation(perm: jax.Array, values: jax.Array) -> jax.Array:
  """out[perm[i]] = values[i] (perm a permutation of range(len(perm)))."""
  return jnp.zeros(perm.shape, values.dtype).at[perm].set(
      values, unique_indices=True)


@flax.struct.dataclass
class GatherPlan:
  """Capacity-bounded plan in the `[E, C, D]` layout ("gather").

  Same kept set and slots contents as "index" (each expert keeps its routed
  tokens by priority descending, ties to the lower token index); slots are
  assigned by one stable sort of the S*m assignments by (expert, -priority)
  (for m = E by a top-C per expert instead, `_top_slots`), and
  dispatch/combine are gathers in both directions.

  Attributes:
    gates: float32[S, E] the routing's gates.
    kept: bool[S, E] assignments that fit in capacity.
    token_index: int32[G*E, C] token held by each slot (0 for empty slots);
      with G > 1 groups (`plan(num_groups=G)`) row g * E + e holds the slots
      of expert e for the tokens of group g.
    slot_gate: float32[G*E, C] gate of each slot, 0 for empty slots.
    token_slot: int32[S, m] flat slot (v * C + c) of each assignment, G*E*C
      where it is not kept.
    token_gate: float32[S, m] gate of each kept assignment, 0 elsewhere.
    token_major: static; False when the token->slot map is larger than the
      slots (S*m > 2*E*C): combine and the dispatch backward then scatter-add.
    block_order: int32[E * ceil(C / B)] blocks of B slots (the capacity
      padded to whole blocks) holding tokens first, for the block loop of
      `ffn`.
    num_used: int32[] blocks holding at least one token.
    block_size: static B of `ffn`; 0 = no fused block loop (accelerators).
  """
  gates: jax.Array
  kept: jax.Array
  token_index: jax.Array
  slot_gate: jax.Array
  token_slot: jax.Array
  token_gate: jax.Array
  block_order: jax.Array
  num_used: jax.Array
  token_major: bool = flax.struct.field(pytree_node=False, default=True)
  block_size: int = flax.struct.field(pytree_node=False, default=0)
  strategy: str = flax.struct.field(pytree_node=False, default="gather")

  @property
  def capacity(self) -> int:
    return self.token_index.shape[-1]

  @property
  def slot_valid(self) -> jax.Array:
    """bool[E, C]: slots that hold a token."""
    return self.slot_gate != 0

  @property
  def token_valid(self) -> jax.Array:
    """bool[S, m]: assignments that hold a slot."""
    num_experts = self.token_index.shape[0]
    return self.token_slot < num_experts * self.capacity

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[E, C, D]; empty slots are zeros."""
    num_experts, cap = self.token_index.shape
    index, valid = self.token_index.reshape(-1), self.slot_valid.reshape(-1)
    if self.token_major:
      h = gather_rows(x, index, valid, self.token_slot, self.token_valid)
    else:
      h = jnp.where(valid[:, None], jnp.take(x, index, axis=0),
                    jnp.zeros((), x.dtype))
    return h.reshape(num_experts, cap, x.shape[-1])

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[G*E, C, A] times w float[E, A, B] -> float[G*E, C, B]."""
    num_experts = w.shape[0]
    h = h.reshape(-1, num_experts, *h.shape[1:])
    out = jnp.einsum("geca,eab->gecb", h, w)
    return out.reshape(-1, *out.shape[2:])

  def ffn(self, x: jax.Array, weights: dict[str, jax.Array],
          activation: str = "swiglu", remat: bool = False
          ) -> jax.Array | None:
    """The whole `expert_ffn` fused (the CPU path): x float[S, D] -> float[S, D].

    One loop over the used blocks of B slots (capacity padded to whole
    blocks) gathers each block's tokens, runs the expert MLP and adds the
    gated rows to the output (`block_moe`). None when this plan has no block
    loop (use dispatch/matmul/combine).
    """
    if not self.block_size:
      return None
    num_experts, cap = self.token_index.shape
    size = self.block_size
    per_expert = -(-cap // size)
    padded = per_expert * size

    def pad(a):
      return jnp.pad(a, ((0, 0), (0, padded - cap)))
    row_token, row_gate = pad(self.token_index), pad(self.slot_gate)
    block_expert = jnp.repeat(
        jnp.arange(num_experts, dtype=jnp.int32) % self.gates.shape[-1],
        per_expert)
    return fused_ffn(x, weights, activation, row_gate.reshape(-1, size),
                     row_token.reshape(-1, size),
                     (row_gate != 0).reshape(-1, size), block_expert,
                     self.block_order, self.num_used, remat)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[E, C, D] -> float[S, D]: sum over kept (s, e) of gate * y[e, slot]."""
    width = y.shape[-1]
    rows = y.reshape(-1, width)
    row_token = self.token_index.reshape(-1)
    if self.token_major:
      return gather_combine(rows, self.token_gate, self.token_slot,
                            self.token_valid, row_token,
                            jax.lax.stop_gradient(self.slot_gate.reshape(-1)))
    return _scatter_combine(rows, row_token, self.slot_gate.reshape(-1),
                            self.gates.shape[0])


def _scatter_combine(rows, row_token, row_gate, num_tokens):
  """float[R, D] rows -> float[S, D]: scatter-add of gate * row (the "index"
  combine; the fallback of "gather" when its token map is too large)."""
  weighted = (rows.astype(jnp.float32) * row_gate[:, None]).astype(rows.dtype)
  return jnp.zeros((num_tokens, rows.shape[-1]), rows.dtype).at[
      row_token].add(weighted)


def _top_slots(routing: Routing, capacity_: int, num_groups: int
               ) -> tuple[jax.Array, jax.Array]:
  """Each (group, expert)'s kept tokens in slot order, from a top-C per expert.

  The slots of "gather" without the sort of S*m assignments: for m = E (a
  router whose fanout may reach every expert: expert choice, uncapped top-p)
  that sort is over S*E elements, while a top-C per expert column gives the
  same slots (routed tokens by priority descending, ties to the lower token
  index: `lax.top_k` keeps the lower index first).

  Returns:
    slot_token: int32[G*E, C] global token of each slot (0 where empty).
    slot_valid: bool[G*E, C].
  """
  num_tokens, num_experts = routing.gates.shape
  per_group = num_tokens // num_groups
  finite = jnp.maximum(routing.priority.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
  key = jax.lax.stop_gradient(jnp.where(routing.routed, finite, -jnp.inf))
  key = key.reshape(num_groups, per_group, num_experts).transpose(0, 2, 1)
  take = min(capacity_, per_group)
  values, token = jax.lax.top_k(key, take)  # [G, E, take]
  valid = values > -jnp.inf
  token = token + (jnp.arange(num_groups, dtype=jnp.int32)
                   * per_group)[:, None, None]
  pad = ((0, 0), (0, 0), (0, capacity_ - take))
  token = jnp.pad(jnp.where(valid, token, 0), pad)
  valid = jnp.pad(valid, pad)
  return (token.reshape(-1, capacity_).astype(jnp.int32),
          valid.reshape(-1, capacity_))


def _gather_plan_all_experts(routing: Routing, capacity_: int,
                             block_size: int | None,
                             num_groups: int) -> GatherPlan:
  """`_gather_plan` for m = E (every expert is a possible assignment)."""
  num_tokens, real_experts = routing.gates.shape
  token_index, slot_valid = _top_slots(routing, capacity_, num_groups)
  num_experts = num_groups * real_experts
  num_slots = num_experts * capacity_
  slot_expert = jnp.broadcast_to(
      (jnp.arange(num_experts, dtype=jnp.int32) % real_experts)[:, None],
      token_index.shape)
  slot_id = jnp.arange(num_slots, dtype=jnp.int32).reshape(token_index.shape)
  token_slot = jnp.full((num_tokens, real_experts), num_slots, jnp.int32).at[
      jnp.where(slot_valid, token_index, num_tokens), slot_expert].set(
          slot_id, mode="drop")
  kept = token_slot < num_slots
  token_gate = jnp.where(kept, routing.gates, 0.0)
  slot_gate = jnp.where(slot_valid, routing.gates[token_index, slot_expert],
                        0.0)
  kept_e = slot_valid.sum(axis=1)
  return _with_blocks(routing, kept, token_index, slot_gate, token_slot,
                      token_gate, kept_e, capacity_, block_size,
                      token_major=num_tokens * real_experts <= 2 * num_slots)


def _with_blocks(routing: Routing, kept, token_index, slot_gate, token_slot,
                 token_gate, kept_e, capacity_: int, block_size: int | None,
                 token_major: bool) -> GatherPlan:
  """The GatherPlan with the block order of the CPU loop (kept_e: int32[V]
  tokens each virtual expert keeps)."""
  # Blocks of B slots holding tokens: the first ceil(kept_e / B) of expert e.
  size = (block_size or slot_block_size(capacity_)) if use_loop_matmul() else 0
  per_expert = -(-capacity_ // size) if size else 1
  used_e = (kept_e + max(size, 1) - 1) // max(size, 1)
  used = jnp.arange(per_expert)[None, :] < used_e[:, None]  # [V, C/B]
  block_order = jnp.argsort(~used.reshape(-1), stable=True).astype(jnp.int32)
  return GatherPlan(gates=routing.gates, kept=kept,
                    token_index=token_index.astype(jnp.int32),
                    slot_gate=slot_gate, token_slot=token_slot.astype(jnp.int32),
                    token_gate=token_gate, block_order=block_order,
                    num_used=jnp.sum(used_e).astype(jnp.int32),
                    token_major=token_major, block_size=size)


def _gather_plan(routing: Routing, capacity_: int, max_fanout: int,
                 block_size: int | None = None,
                 num_groups: int = 1) -> GatherPlan:
  num_tokens, real_experts = routing.gates.shape
  if max_fanout >= real_experts:
    return _gather_plan_all_experts(routing, capacity_, block_size, num_groups)
  expert, valid = _assignments(routing, max_fanout)  # [S, m]
  fanout = expert.shape[1]
  n = num_tokens * fanout
  # Groups: (group, expert) pairs are virtual experts g * E + e, each with C
  # slots, so that capacity applies per group.
  num_experts = num_groups * real_experts
  group = jnp.arange(num_tokens, dtype=jnp.int32) // (num_tokens // num_groups)
  virtual = group[:, None] * real_experts + expert
  flat_expert = jnp.where(valid, virtual, num_experts).reshape(-1)
  priority = jax.lax.stop_gradient(jnp.take_along_axis(
      routing.priority.astype(jnp.float32), expert, axis=1)).reshape(-1)
  iota = jnp.arange(n, dtype=jnp.int32)
  # One stable sort by (expert, -priority): token order breaks ties.
  sorted_expert, _, source = jax.lax.sort(
      (flat_expert, -priority, iota), num_keys=2, is_stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)
  starts = _exclusive_cumsum(counts)
  position = iota - starts[sorted_expert]
  kept_sorted = (sorted_expert < num_experts) & (position < capacity_)
  num_slots = num_experts * capacity_
  slot_sorted = jnp.where(kept_sorted, sorted_expert * capacity_ + position,
                          num_slots)
  token_slot = _inverse_permutation(source, slot_sorted).reshape(
      num_tokens, fanout)
  token_valid = token_slot < num_slots
  gate = jnp.take_along_axis(routing.gates, expert, axis=1)  # [S, m]
  token_gate = jnp.where(token_valid, gate, 0.0)
  # Slot (e, c) holds sorted element starts[e] + c when c < counts[e].
  slots = jnp.arange(capacity_, dtype=jnp.int32)
  slot_valid = slots[None, :] < jnp.minimum(counts[:num_experts],
                                            capacity_)[:, None]
  slot_source = jnp.take(source, starts[:num_experts, None] + slots[None, :],
                         mode="clip")  # [E, C] flat (s * m + j)
  token_index = jnp.where(slot_valid, slot_source // fanout, 0)
  slot_gate = jnp.where(slot_valid,
                        jnp.take(token_gate.reshape(-1), slot_source,
                                 mode="clip"), 0.0)
  kept = jnp.zeros((num_tokens, real_experts), bool).at[
      jnp.arange(num_tokens)[:, None], expert].set(token_valid)
  return _with_blocks(routing, kept, token_index, slot_gate, token_slot,
                      token_gate, jnp.minimum(counts[:num_experts], capacity_),
                      capacity_, block_size,
                      token_major=num_tokens * fanout <= 2 * num_slots)


# ---------------------------------------------------------------------------
# Sorted-blocks dropless layout.
# ---------------------------------------------------------------------------


def default_block_size(num_rows: int, num_experts: int) -> int:
  """Block rows B for `num_rows` = S*m assignments over E experts.

  `BLOCK_ROWS` (the CPU block loop runs only the used blocks, so padding
  costs about E*B/2 rows of compute; XLA:CPU's small matmuls, the weight
  gradients above all, lose efficiency below ~256 rows), smaller when there
  are fewer rows per expert: the power of two in [8, BLOCK_ROWS] at most
  S*m/E.
  """
  target = max(1, num_rows // num_experts)
  size = 8
  while size * 2 <= min(target, BLOCK_ROWS):
    size *= 2
  return size


def num_blocks(num_rows: int, num_experts: int, block_size: int) -> int:
  """Static bound N on the blocks of `num_rows` rows padded per expert."""
  return max(1, (num_rows + min(num_experts, num_rows) * (block_size - 1))
             // block_size)


@flax.struct.dataclass
class BlockPlan:
  """Dropless plan in the sorted-blocks `[R, D]` layout ("sorted").

  Rows are sorted by expert and each expert's rows padded to whole blocks of
  B rows; block b belongs to expert `block_expert[b]` (E for unused trailing
  blocks). The expert matmul is one batched matmul over blocks with the
  weights gathered per block.

  Attributes:
    gates: float32[S, E] the routing's gates.
    kept: bool[S, E] assignments in the layout.
    row_token: int32[R] token of each row (0 for padding rows).
    row_gate: float32[R] gate of each row (0 for padding rows).
    token_row: int32[S, m] row of each assignment, R where none.
    token_gate: float32[S, m] gate of each assignment, 0 where none.
    block_expert: int32[N] expert of each block, E for unused blocks.
    group_sizes: int32[E] rows per expert (before padding).
  """
  gates: jax.Array
  kept: jax.Array
  row_token: jax.Array
  row_gate: jax.Array
  token_row: jax.Array
  token_gate: jax.Array
  block_expert: jax.Array
  group_sizes: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="sorted")

  @property
  def block_size(self) -> int:
    return self.row_token.shape[0] // self.block_expert.shape[0]

  @property
  def token_valid(self) -> jax.Array:
    return self.token_row < self.row_token.shape[0]

  def dispatch(self, x: jax.Array) -> jax.Array:
    """x float[S, D] -> float[R, D] rows sorted by expert; padding rows zero."""
    return gather_rows(x, self.row_token, self.row_gate != 0, self.token_row,
                       self.token_valid)

  def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
    """h float[R, A] times each row's expert weight w float[E, A, B] -> [R, B].

    On CPU a loop over the used blocks (`grouped_matmul`); elsewhere one
    batched matmul with the weights gathered per block.
    """
    nb, size = self.block_expert.shape[0], self.block_size
    blocks = h.reshape(nb, size, h.shape[-1])
    if use_loop_matmul():
      num_used = jnp.sum(self.block_expert < w.shape[0]).astype(jnp.int32)
      out = grouped_matmul(blocks, w, self.block_expert,
                           jnp.arange(nb, dtype=jnp.int32), num_used)
    else:
      experts = jnp.minimum(self.block_expert, w.shape[0] - 1)
      wb = jnp.take(w, experts, axis=0)  # [N, A, B]
      out = jnp.einsum("nra,nab->nrb", blocks, wb)
    return out.reshape(nb * size, w.shape[-1])

  def ffn(self, x: jax.Array, weights: dict[str, jax.Array],
          activation: str = "swiglu", remat: bool = False
          ) -> jax.Array | None:
    """The whole `expert_ffn` fused on CPU (`block_moe` over the used
    blocks): x float[S, D] -> float[S, D]; None elsewhere (use
    dispatch/matmul/combine)."""
    if not use_loop_matmul():
      return None
    nb, size = self.block_expert.shape[0], self.block_size
    num_used = jnp.sum(self.block_expert < self.gates.shape[-1]
                       ).astype(jnp.int32)
    return fused_ffn(x, weights, activation, self.row_gate.reshape(nb, size),
                     self.row_token.reshape(nb, size),
                     (self.row_gate != 0).reshape(nb, size), self.block_expert,
                     jnp.arange(nb, dtype=jnp.int32), num_used, remat)

  def combine(self, y: jax.Array) -> jax.Array:
    """y float[R, D] -> float[S, D]."""
    return gather_combine(y, self.token_gate, self.token_row, self.token_valid,
                          self.row_token, jax.lax.stop_gradient(self.row_gate))


def _block_plan(routing: Routing, max_fanout: int,
                block_size: int | None) -> BlockPlan:
  num_tokens, num_experts = routing.gates.shape
  expert, valid = _assignments(routing, max_fanout)  # [S, m]
  fanout = expert.shape[1]
  n = num_tokens * fanout
  size = block_size or default_block_size(n, num_experts)
  nb = num_blocks(n, num_experts, size)
  num_rows = nb * size
  flat_expert = jnp.where(valid, expert, num_experts).reshape(-1)
  iota = jnp.arange(n, dtype=jnp.int32)
  sorted_expert, source = jax.lax.sort((flat_expert, iota), num_keys=1,
                                       is_stable=True)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)
  counts = counts[:num_experts]
  starts = _exclusive_cumsum(counts)
  expert_blocks = (counts + size - 1) // size
  block_end = jnp.cumsum(expert_blocks)
  first_row = (block_end - expert_blocks) * size  # [E]
  clipped = jnp.minimum(sorted_expert, num_experts - 1)
  row_sorted = jnp.where(sorted_expert < num_experts,
                         first_row[clipped] + iota - starts[clipped], num_rows)
  token_row = _inverse_permutation(source, row_sorted).reshape(
      num_tokens, fanout).astype(jnp.int32)
  token_valid = token_row < num_rows
  gate = jnp.take_along_axis(routing.gates, expert, axis=1)
  token_gate = jnp.where(token_valid, gate, 0.0)
  # Row r: block b = r // B of expert block_expert[b], offset within the expert.
  blocks = jnp.arange(nb, dtype=jnp.int32)
  block_expert = jnp.sum(block_end[None, :] <= blocks[:, None], axis=1,
                         dtype=jnp.int32)  # [N], E = unused
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  row_expert = jnp.minimum(jnp.repeat(block_expert, size), num_experts - 1)
  offset = rows - first_row[row_expert]
  row_valid = (jnp.repeat(block_expert, size) < num_experts) & (
      offset < counts[row_expert])
  row_source = jnp.take(source, starts[row_expert] + offset, mode="clip")
  row_token = jnp.where(row_valid, row_source // fanout, 0).astype(jnp.int32)
  row_gate = jnp.where(row_valid, jnp.take(token_gate.reshape(-1), row_source,
                                           mode="clip"), 0.0)
  kept = jnp.zeros((num_tokens, num_experts), bool).at[
      jnp.arange(num_tokens)[:, None], expert].set(valid)
  return BlockPlan(gates=routing.gates, kept=kept, row_token=row_token,
                   row_gate=row_gate, token_row=token_row,
                   token_gate=token_gate, block_expert=block_expert,
                   group_sizes=counts)


def _slot_plan(routing: Routing, capacity_: int, strategy: str) -> SlotPlan:
  num_tokens, num_experts = routing.gates.shape
  order, rank = slot_ranks(routing)
  routed = routing.routed
  position = jnp.where(routed & (rank < capacity_), rank, -1)
  if capacity_ > num_tokens:
    order = jnp.concatenate(
        [order, jnp.zeros((capacity_ - num_tokens, num_experts), jnp.int32)], 0)
  top = order[:capacity_]  # [C, E]; routed tokens first in each column
  slot_valid = (jnp.arange(capacity_)[:, None] <
                routing.routed.sum(axis=0)[None, :])
  slot_gate = jnp.where(slot_valid,
                        jnp.take_along_axis(routing.gates, top, axis=0), 0.0)
  return SlotPlan(gates=routing.gates, position=position.astype(jnp.int32),
                  token_index=top.T, slot_gate=slot_gate.T, strategy=strategy)


def _dropless_plan(routing: Routing, max_fanout: int) -> DroplessPlan:
  num_tokens, num_experts = routing.gates.shape
  values, experts = jax.lax.top_k(routing.gates, max_fanout)  # [S, m]
  valid = values != 0
  flat_expert = jnp.where(valid, experts, num_experts).reshape(-1)
  perm = jnp.argsort(flat_expert, stable=True)
  row_token = (perm // max_fanout).astype(jnp.int32)
  row_gate = jnp.where(valid.reshape(-1), values.reshape(-1), 0.0)[perm]
  group_sizes = jnp.bincount(flat_expert, length=num_experts + 1)[:num_experts]
  kept = jnp.zeros(routing.gates.shape, bool).at[
      jnp.arange(num_tokens)[:, None], experts].set(valid)
  # Row gates must carry the gradient of the routing's gates.
  row_gate = jnp.where(
      row_gate != 0,
      routing.gates[row_token, jnp.minimum(flat_expert[perm], num_experts - 1)],
      0.0)
  return DroplessPlan(gates=routing.gates, kept=kept, row_token=row_token,
                      row_gate=row_gate, group_sizes=group_sizes.astype(jnp.int32))


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """The implementation a strategy name runs: "dropless" is "sorted" on CPU
  (XLA:CPU has no grouped matmul kernel) and "ragged" elsewhere."""
  if strategy != "dropless":
    return strategy
  backend = backend or jax.default_backend()
  return "sorted" if backend == "cpu" else "ragged"


def plan(routing: Routing, capacity: int, *, strategy: str = "index",
         max_fanout: int | None = None, block_size: int | None = None,
         num_groups: int = 1
         ) -> SlotPlan | GatherPlan | BlockPlan | DroplessPlan:
  """Builds a dispatch plan for one group.

  Args:
    routing: `Routing` with gates/priority float32[S, E].
    capacity: static integer C >= 1, slots per expert (see `capacity()`); ignored
      by the dropless strategies.
    strategy: one of `STRATEGIES` (see the module docstring).
    max_fanout: static bound m on experts per token (the router's largest
      possible fanout; default E). The dropless strategies keep every
      assignment among each token's m largest gates; "gather" sizes its
      token->slot map with it (a router must not exceed it); "einsum" and
      "index" ignore it.
    block_size: rows per block B of the CPU block loops: "sorted" (default
      `default_block_size(S * m, E)`) and "gather" (default
      `slot_block_size(C)`; the capacity is padded to whole blocks).
    num_groups: G >= 1 routing groups laid end to end in the S tokens (S/G
      each): capacity C applies per group and expert. "gather" plans all
      groups at once (its layout is [G*E, C, D]); the dropless strategies
      keep everything anyway; "einsum" and "index" need G = 1 (vmap them).
  Returns:
    a plan pytree (`SlotPlan`, `GatherPlan`, `BlockPlan` or `DroplessPlan`).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not supported; allowed: "
                     f"{', '.join(STRATEGIES)}")
  num_experts = routing.gates.shape[-1]
  max_fanout = num_experts if max_fanout is None else check_int(
      "max_fanout", max_fanout, 1, num_experts)
  if block_size is not None:
    block_size = check_int("block_size", block_size, 1)
  num_groups = check_int("num_groups", num_groups, 1)
  if routing.gates.shape[0] % num_groups:
    raise ValueError(f"num_groups={num_groups} must divide the tokens "
                     f"S={routing.gates.shape[0]}")
  strategy = resolve_strategy(strategy)
  if num_groups > 1 and strategy in ("einsum", "index"):
    raise ValueError(f"num_groups={num_groups} is not supported by "
                     f"strategy={strategy!r}; allowed: 1 (vmap over groups)")
  if strategy == "ragged":
    return _dropless_plan(routing, max_fanout)
  if strategy == "sorted":
    return _block_plan(routing, max_fanout, block_size)
  capacity = check_int("capacity", capacity, 1)
  if strategy == "gather":
    return _gather_plan(routing, capacity, max_fanout, block_size, num_groups)
  return _slot_plan(routing, capacity, strategy)


def drop_fraction(routing: Routing, kept: jax.Array) -> jax.Array:
  """float32[]: assignments lost to capacity / all assignments."""
  routed = routing.routed
  total = jnp.maximum(routed.sum(), 1)
  return (routed & ~kept).sum() / total
