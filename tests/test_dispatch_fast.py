"""Fast dispatch paths ("gather", "sorted", "dropless") against the references.

References: the per-expert loop of tests/test_dispatch.py and the one-hot
"einsum" strategy (outputs and gradients, over-capacity cases); the custom VJPs
against autodiff of the plain formulas; no retracing under jit. Library
calls run under jit (one compile each instead of one per primitive).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import backend, dispatch, experts, sharding
from moejax.routing import Routing, expert_choice, top_k
from moejax.routing.base import take_rows
from test_dispatch import (jit_plan, jit_top_k, make_case, reference_kept,
                           reference_moe, run_plan)


def assert_close(got, want, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=rtol, atol=atol)


def loop_reference(routing, kept, x, w1, w2):
  return reference_moe(np.asarray(x), np.asarray(routing.gates), kept,
                       np.asarray(w1), np.asarray(w2))


@pytest.mark.parametrize("max_fanout", [3, None])
@pytest.mark.parametrize("capacity", [3, 8, 40])
def test_gather_matches_loop_and_index(capacity, max_fanout):
  routing, x, w1, w2 = make_case()
  out, kept = run_plan(routing, capacity, "gather", x, w1, w2, max_fanout)
  want_kept = reference_kept(routing.gates, routing.priority, capacity)
  np.testing.assert_array_equal(np.asarray(kept), want_kept)
  assert_close(out, loop_reference(routing, want_kept, x, w1, w2))
  index_out, _ = run_plan(routing, capacity, "index", x, w1, w2)
  assert_close(out, index_out)
  # Same slot contents as "index" (token and gate of every slot).
  fast = jit_plan(routing, capacity, strategy="gather", max_fanout=max_fanout)
  ref = jit_plan(routing, capacity, strategy="index")
  np.testing.assert_array_equal(np.asarray(fast.slot_valid),
                                np.asarray(ref.slot_valid))
  np.testing.assert_array_equal(
      np.asarray(fast.token_index),
      np.where(np.asarray(ref.slot_valid), np.asarray(ref.token_index), 0))
  assert_close(fast.slot_gate, ref.slot_gate, rtol=0, atol=0)


def test_gather_hand_checked_and_ties():
  gates = jnp.array([[.6, .4], [.3, .7], [.9, .1], [.2, .8]])
  priority = jnp.array([[2., 1.], [1., 2.], [2., 1.], [1., 2.]])
  p = jit_plan(Routing(gates, priority), 3, strategy="gather", max_fanout=2)
  np.testing.assert_array_equal(
      np.asarray(p.kept),
      [[True, True], [True, True], [True, False], [False, True]])
  # Equal priorities: the lower token index wins; higher priority beats index.
  ones = jnp.ones((5, 1))
  p = jit_plan(Routing(ones, jnp.zeros((5, 1))), 2, strategy="gather")
  np.testing.assert_array_equal(np.asarray(p.kept[:, 0]),
                                [True, True, False, False, False])
  p = jit_plan(Routing(ones, jnp.array([[0.], [0.], [0.], [5.], [0.]])), 2,
               strategy="gather")
  np.testing.assert_array_equal(np.asarray(p.kept[:, 0]),
                                [True, False, False, True, False])


def test_gather_scatter_fallback_for_large_fanout_bound():
  # S*m = 24*8 > 2*E*C = 2*8*4: the token->slot map is bigger than the slots,
  # combine falls back to scatter-add; same results as "index".
  routing, x, w1, w2 = make_case(seed=4, e=8, k=3)
  fast = jit_plan(routing, 4, strategy="gather")
  assert not fast.token_major
  out, kept = run_plan(routing, 4, "gather", x, w1, w2)
  want_kept = reference_kept(routing.gates, routing.priority, 4)
  np.testing.assert_array_equal(np.asarray(kept), want_kept)
  assert_close(out, loop_reference(routing, want_kept, x, w1, w2))


@pytest.mark.parametrize("strategy,block_size", [
    ("sorted", None), ("sorted", 1), ("sorted", 3), ("sorted", 64),
    ("dropless", None), ("ragged", None)])
def test_dropless_paths_match_loop(strategy, block_size):
  for max_fanout in (2, None):
    routing, x, w1, w2 = make_case(seed=1)
    out, kept = run_plan(routing, 1, strategy, x, w1, w2, max_fanout,
                         block_size)
    np.testing.assert_array_equal(np.asarray(kept),
                                  np.asarray(routing.routed))
    assert_close(out, loop_reference(routing, np.asarray(routing.routed), x,
                                     w1, w2))


def test_variable_fanout_expert_choice():
  # Expert choice: a token can have 0..E experts; nothing drops at C = 8.
  logits = jax.random.normal(jax.random.PRNGKey(3), (32, 8))
  routing = jax.jit(expert_choice, static_argnums=1)(logits, 8).routing
  # Token 0 routed nowhere (a valid Routing; e.g. a skipped token).
  routing = Routing(routing.gates.at[0].set(0.0), routing.priority)
  _, x, w1, w2 = make_case(seed=3, s=32, e=8)
  fanout = np.asarray(routing.routed.sum(-1))
  assert fanout.min() == 0 and fanout.max() > 2
  want = loop_reference(routing, np.asarray(routing.routed), x, w1, w2)
  for strategy in ("gather", "sorted"):
    out, kept = run_plan(routing, 8, strategy, x, w1, w2)
    np.testing.assert_array_equal(np.asarray(kept),
                                  np.asarray(routing.routed))
    assert_close(out, want)


def test_sorted_block_layout():
  routing, _, _, _ = make_case(seed=5, s=40, e=4, k=2)
  size = 4
  p = jit_plan(routing, 1, strategy="sorted", max_fanout=2, block_size=size)
  counts = np.asarray(routing.routed.sum(0))
  np.testing.assert_array_equal(np.asarray(p.group_sizes), counts)
  nb = dispatch.num_blocks(80, 4, size)
  assert p.block_expert.shape == (nb,) and p.block_size == size
  block_expert = np.asarray(p.block_expert)
  want = np.concatenate([np.full(-(-c // size), e) for e, c in
                         enumerate(counts)])
  np.testing.assert_array_equal(block_expert[:len(want)], want)
  assert (block_expert[len(want):] == 4).all()
  # Every kept assignment has one row holding its token and gate.
  row_token, row_gate = np.asarray(p.row_token), np.asarray(p.row_gate)
  token_row, gates = np.asarray(p.token_row), np.asarray(routing.gates)
  for s in range(40):
    chosen = np.nonzero(gates[s])[0]
    rows = sorted(r for r in token_row[s] if r < len(row_token))
    assert len(rows) == len(chosen)
    for r in rows:
      assert row_token[r] == s
      assert block_expert[r // size] in chosen
      assert row_gate[r] == gates[s, block_expert[r // size]]
  assert (row_gate != 0).sum() == counts.sum()


@pytest.mark.parametrize("strategy,capacity", [
    ("gather", 6), ("gather", 16), ("sorted", 1), ("dropless", 1)])
def test_gradients_match_reference(strategy, capacity):
  _, x, w1, w2 = make_case(seed=2, s=16)
  logits = jax.random.normal(jax.random.PRNGKey(5), (16, 4))

  def loss(logits, x, w1, w2, strategy):
    routing = top_k(logits, 2).routing
    out, _ = run_plan(routing, capacity, strategy, x, w1, w2, max_fanout=2)
    return jnp.sum(out * jnp.cos(out))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
  got = grad(logits, x, w1, w2, strategy)
  reference = "einsum" if strategy == "gather" else "ragged"
  want = grad(logits, x, w1, w2, reference)
  if strategy == "gather" and capacity == 6:  # something really dropped
    routing = jit_top_k(logits, 2).routing
    assert not reference_kept(routing.gates, routing.priority, 6).all(
        where=np.asarray(routing.routed))
  for g, w in zip(got, want):
    assert_close(g, w, rtol=2e-4, atol=2e-5)


def test_custom_vjps_match_autodiff():
  rng = np.random.default_rng(0)
  n, rows, m, d = 7, 10, 3, 4
  # A random bijection between valid layout rows and valid (n, j) pairs.
  pairs = [(i, j) for i in range(n) for j in range(m)]
  chosen = rng.choice(len(pairs), size=8, replace=False)
  layout = rng.choice(rows, size=8, replace=False)
  index = np.zeros(rows, np.int32)
  valid = np.zeros(rows, bool)
  inverse = np.full((n, m), rows, np.int32)
  gate = rng.normal(size=(n, m)).astype(np.float32)
  for c, r in zip(chosen, layout):
    i, j = pairs[c]
    index[r], valid[r], inverse[i, j] = i, True, r
  inv_valid = inverse < rows
  gate = np.where(inv_valid, gate, 0.0).astype(np.float32)
  row_gate = np.zeros(rows, np.float32)
  row_gate[layout] = gate[tuple(np.array([pairs[c] for c in chosen]).T)]
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)

  def plain_rows(x):
    return jnp.where(valid[:, None], x[index], 0.0)

  def fast_rows(x):
    return dispatch.gather_rows(x, jnp.asarray(index), jnp.asarray(valid),
                                jnp.asarray(inverse), jnp.asarray(inv_valid))

  @jax.jit
  def rows_and_vjp(x, cot):
    """(value, x cotangent) of fast_rows and of plain_rows."""
    return [(f(x), jax.vjp(f, x)[1](cot)[0]) for f in (fast_rows, plain_rows)]

  cot = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
  (fast_y, fast_dx), (plain_y, plain_dx) = rows_and_vjp(x, cot)
  assert_close(fast_y, plain_y)
  assert_close(fast_dx, plain_dx)

  def plain_combine(y, g):
    picked = jnp.take(y, jnp.minimum(inverse, rows - 1), axis=0)
    return jnp.einsum("nm,nmd->nd", jnp.where(inv_valid, g, 0.0),
                      jnp.where(inv_valid[..., None], picked, 0.0))

  def fast_combine(y, g):
    return dispatch.gather_combine(y, g, jnp.asarray(inverse),
                                   jnp.asarray(inv_valid), jnp.asarray(index),
                                   jnp.asarray(row_gate))

  @jax.jit
  def combine_and_vjp(y, g, cot):
    """(value, (y, g) cotangents) of fast_combine and of plain_combine."""
    return [(f(y, g), jax.vjp(f, y, g)[1](cot))
            for f in (fast_combine, plain_combine)]

  cot = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  (fast_out, fast_grads), (plain_out, plain_grads) = combine_and_vjp(
      y, jnp.asarray(gate), cot)
  assert_close(fast_out, plain_out)
  for got, want in zip(fast_grads, plain_grads):
    assert_close(got, want)


@pytest.mark.parametrize("strategy", ["gather", "sorted"])
def test_jit_grad_no_retrace(strategy):
  routing, x, w1, w2 = make_case()
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(logits, x):
    def loss(logits, x):
      r = top_k(logits, 2).routing
      return jnp.sum(run_plan(r, 8, strategy, x, w1, w2, max_fanout=2)[0] ** 2)
    return jax.grad(loss, argnums=(0, 1))(logits, x)

  for seed in range(3):
    _, xx, _, _ = make_case(seed=seed)
    logits = jax.random.normal(jax.random.PRNGKey(seed), (24, 4))
    chex.assert_tree_all_finite(step(logits, xx))


@pytest.mark.parametrize("strategy", ["gather", "sorted"])
def test_bfloat16_payload(strategy):
  routing, x, w1, w2 = make_case(seed=6)
  want, _ = run_plan(routing, 8, strategy, x, w1, w2, max_fanout=2)
  bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
  got, _ = run_plan(routing, 8, strategy, bf(x), bf(w1), bf(w2), max_fanout=2)
  assert got.dtype == jnp.bfloat16
  assert_close(got, want, rtol=5e-2, atol=5e-2)

  def loss(gates, x):
    r = Routing(gates, routing.priority)
    out, _ = run_plan(r, 8, strategy, x, bf(w1), bf(w2), max_fanout=2)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  dg, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(routing.gates, bf(x))
  assert dg.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
  # The fused CPU path of experts.ffn: bfloat16 in and out (float32 inside).
  w = {"w_in": w1, "w_gate": w1, "w_out": w2}
  p = jit_plan(routing, 8, strategy=strategy, max_fanout=2)
  ffn = jax.jit(experts.ffn)
  want = ffn(p, x, w)
  got = ffn(p, bf(x), jax.tree.map(bf, w))
  assert got.dtype == jnp.bfloat16
  assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("max_fanout", [2, None])
def test_vmap_over_groups(max_fanout):
  cases = [make_case(seed=s) for s in range(3)]
  gates = jnp.stack([c[0].gates for c in cases])
  priority = jnp.stack([c[0].priority for c in cases])
  xs = jnp.stack([c[1] for c in cases])
  _, _, w1, w2 = cases[0]

  def one(r, x):
    return run_plan(r, 6, "gather", x, w1, w2, max_fanout=2)[0]
  got = jax.jit(jax.vmap(one))(Routing(gates, priority), xs)
  want = [run_plan(r, 6, "index", x, w1, w2) for r, x, _, _ in cases]
  for i in range(3):
    assert_close(got[i], want[i][0])
  # One plan over the 3 groups laid end to end, capacity 6 per group.
  flat = Routing(gates.reshape(-1, 4), priority.reshape(-1, 4))
  out, kept = run_plan_groups(flat, xs.reshape(-1, xs.shape[-1]), w1, w2,
                              max_fanout)
  np.testing.assert_array_equal(
      np.asarray(kept), np.concatenate([np.asarray(k) for _, k in want]))
  assert_close(out, np.concatenate([np.asarray(o) for o, _ in want]))
  with pytest.raises(ValueError, match="num_groups=3"):
    dispatch.plan(flat, 6, strategy="index", num_groups=3)
  with pytest.raises(ValueError, match="num_groups=5"):
    dispatch.plan(flat, 6, strategy="gather", num_groups=5)


@pytest.mark.parametrize("max_fanout", [2, None])
def test_expert_major_rows_are_the_group_major_rows_permuted(max_fanout):
  """`plan(expert_major=True)`: row e * G + g holds what row g * E + e holds
  group-major; dispatch, combine, their gradients and the CPU block loop
  (`experts.ffn`) give the same values."""
  cases = [make_case(seed=s) for s in range(3)]
  flat = Routing(jnp.concatenate([c[0].gates for c in cases]),
                 jnp.concatenate([c[0].priority for c in cases]))
  x = jnp.concatenate([c[1] for c in cases])
  g, e = 3, flat.gates.shape[-1]

  @jax.jit
  def plans(routing):
    return tuple(dispatch.plan(routing, 6, strategy="gather",
                               max_fanout=max_fanout, num_groups=g,
                               expert_major=em) for em in (False, True))
  by_group, by_expert = plans(flat)
  assert by_expert.expert_major and not by_group.expert_major

  def to_expert_major(a):  # [G*E, ...] -> [E*G, ...]
    return jnp.swapaxes(a.reshape(g, e, *a.shape[1:]), 0, 1).reshape(a.shape)
  for name in ("token_index", "slot_gate"):
    np.testing.assert_array_equal(
        np.asarray(getattr(by_expert, name)),
        np.asarray(to_expert_major(getattr(by_group, name))))
  for name in ("kept", "token_gate", "num_used"):
    np.testing.assert_array_equal(np.asarray(getattr(by_expert, name)),
                                  np.asarray(getattr(by_group, name)))
  assert by_expert.token_major == by_group.token_major

  def moved(p, x, y):  # dispatch, combine (y in the plan's row order)
    return p.dispatch(x), p.combine(y)
  y = jax.random.normal(jax.random.PRNGKey(3), (g * e, 6, x.shape[-1]))
  h_group, out_group = jax.jit(moved)(by_group, x, y)
  h_expert, out_expert = jax.jit(moved)(by_expert, x, to_expert_major(y))
  np.testing.assert_array_equal(np.asarray(h_expert),
                                np.asarray(to_expert_major(h_group)))
  np.testing.assert_array_equal(np.asarray(out_expert), np.asarray(out_group))

  def loss(p, x, y):
    h, out = moved(p, x, y)
    return jnp.sum(h * jnp.sin(h)) + jnp.sum(out * jnp.cos(out))
  grads = jax.jit(jax.grad(loss, argnums=(1, 2)))
  dx_group, dy_group = grads(by_group, x, y)
  dx_expert, dy_expert = grads(by_expert, x, to_expert_major(y))
  np.testing.assert_array_equal(np.asarray(dx_expert), np.asarray(dx_group))
  np.testing.assert_array_equal(np.asarray(dy_expert),
                                np.asarray(to_expert_major(dy_group)))
  # The CPU block loop reads each block's expert from the row order.
  _, _, w1, w2 = cases[0]
  w = {"w_in": w1, "w_gate": w1, "w_out": w2}
  ffn = jax.jit(experts.ffn)
  assert_close(ffn(by_expert, x, w), ffn(by_group, x, w))


@functools.partial(jax.jit, static_argnames="max_fanout")
def run_plan_groups(routing, x, w1, w2, max_fanout):
  """`run_plan` with capacity 6 per group, 3 groups laid end to end in S."""
  p = dispatch.plan(routing, 6, strategy="gather", max_fanout=max_fanout,
                    num_groups=3)
  h = jax.nn.relu(p.matmul(p.dispatch(x), w1))
  return p.combine(p.matmul(h, w2)), p.kept


def test_backend_choice():
  # Every backend-dependent choice of the library is made in
  # moejax.backend, and tested here only.
  assert dispatch.current_backend() == jax.default_backend()
  assert dispatch.resolve_strategy("dropless", "cpu") == "sorted"
  assert dispatch.resolve_strategy("dropless", "gpu") == "ragged"
  assert dispatch.resolve_strategy("dropless", "tpu") == "ragged"
  assert dispatch.resolve_strategy("gather", "gpu") == "gather"
  # "auto" is a capacity strategy on every backend (same drops as "gather").
  for name in ("cpu", "gpu", "tpu"):
    assert dispatch.choose_strategy("auto", name) == "gather"
    assert dispatch.resolve_strategy("auto", name) == "gather"
    assert dispatch.choose_strategy("dropless", name) == "dropless"
  assert dispatch.choose_strategy("auto") not in dispatch.DROPLESS
  assert dispatch.use_loop_matmul("cpu")
  assert not dispatch.use_loop_matmul("gpu")
  assert not dispatch.use_loop_matmul("tpu")
  assert backend.use_one_hot_scatter("tpu")
  assert not backend.use_one_hot_scatter("cpu")
  assert not backend.use_one_hot_scatter("gpu")
  on_cpu = jax.default_backend() == "cpu"
  routing, *_ = make_case()
  for strategy in ("gather", "sorted"):  # the fused CPU block loop
    assert jit_plan(routing, 4, strategy=strategy).block_loop == on_cpu
  assert jit_plan(routing, 4, strategy="auto").block_loop == on_cpu
  assert isinstance(jit_plan(routing, 4, strategy="dropless"),
                    dispatch.BlockPlan if on_cpu else dispatch.DroplessPlan)
  # Under a mesh the choices follow its devices' platform (TPU topology
  # devices on a CPU host: tests/test_aot_tpu.py).
  with jax.set_mesh(sharding.make_mesh(f"data:{jax.device_count()}")):
    assert dispatch.current_backend() == jax.default_backend()


def test_take_rows_select_matches_gather(monkeypatch):
  # The plans read gates and priorities at a token's experts with
  # `routing.base.take_rows`: its TPU select over E gives the gather's values
  # and gradients exactly.
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  expert = jnp.asarray(np.argsort(rng.normal(size=(16, 8)), -1)[:, :3],
                       jnp.int32)
  cot = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)

  def value_and_grad():
    return jax.jit(jax.value_and_grad(
        lambda v: jnp.vdot(take_rows(v, expert), cot)))(values)
  monkeypatch.setattr(backend, "current_backend", lambda: "cpu")
  want = value_and_grad()
  monkeypatch.setattr(backend, "current_backend", lambda: "tpu")
  got = value_and_grad()
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(
      jax.jit(take_rows)(values, expert),
      jnp.take_along_axis(values, expert, axis=1))


def test_bad_arguments():
  assert set(dispatch.DROPLESS) < set(dispatch.STRATEGIES)
  assert dispatch.default_block_size(8192, 8) == 256
  assert dispatch.default_block_size(64, 8) == 8
  assert dispatch.default_block_size(8 * 40, 8) == 32
  assert dispatch.slot_block_size(1280) == 256
  assert dispatch.slot_block_size(640, 64) == 64
  assert dispatch.slot_block_size(20) == 24
  routing, *_ = make_case()
  with pytest.raises(ValueError, match="block_size=0"):
    dispatch.plan(routing, 4, strategy="sorted", block_size=0)
  with pytest.raises(ValueError, match="max_fanout=5"):
    dispatch.plan(routing, 4, strategy="gather", max_fanout=5)


def test_grouped_matmul_matches_einsum_and_autodiff():
  rng = np.random.default_rng(1)
  nb, size, a, c, e = 6, 4, 5, 3, 3
  h = jnp.asarray(rng.normal(size=(nb, size, a)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(e, a, c)), jnp.float32)
  block_expert = jnp.array([0, 0, 2, 2, 2, 3], jnp.int32)  # 3 = unused
  order = jnp.array([4, 0, 2, 1, 3, 5], jnp.int32)
  used = np.zeros(nb, bool)
  used[[4, 0, 2, 1]] = True
  num_used = jnp.int32(4)

  def plain(h, w):
    wb = jnp.take(w, jnp.minimum(block_expert, e - 1), axis=0)
    return jnp.where(used[:, None, None], jnp.einsum("nra,nab->nrb", h, wb),
                     0.0)

  def fast(h, w):
    return dispatch.grouped_matmul(h, w, block_expert, order, num_used)

  @jax.jit
  def value_and_vjp(h, w, cot):
    """(value, (h, w) cotangents) of fast and of plain."""
    return [(f(h, w), jax.vjp(f, h, w)[1](cot)) for f in (fast, plain)]

  cot = jnp.asarray(rng.normal(size=(nb, size, c)), jnp.float32)
  (fast_out, fast_grads), (plain_out, plain_grads) = value_and_vjp(h, w, cot)
  assert_close(fast_out, plain_out)
  for got, want in zip(fast_grads, plain_grads):
    assert_close(got, want)


def test_moe_layer_gather_default_matches_index():
  # The MoE layer's default strategy ("auto" = "gather": one plan over all
  # groups and the fused block loop on CPU, here with remat) against "index"
  # (per-group vmap), with drops.
  from moejax.routing import TopK
  from moejax.nn.moe import MoE, MoEConfig
  assert dispatch.choose_strategy(MoEConfig().strategy) == "gather"
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 8))
  layers = {}
  for strategy, remat in (("index", False), ("gather", True),
                          ("sorted", False)):
    cfg = MoEConfig(num_experts=4, expert_width=6, router=TopK(k=2),
                    capacity_factor=0.75, strategy=strategy, remat=remat,
                    router_init_scale=1.0)
    layers[(strategy, remat)] = MoE(cfg, d_model=8)
  # One program inits all three (their identical initialisers compile once).
  variables = jax.jit(lambda x: {
      key: layer.init({"params": jax.random.PRNGKey(1)}, x, train=True)
      for key, layer in layers.items()})(x)
  outs = {}
  for (strategy, remat), layer in layers.items():
    params = variables[(strategy, remat)]

    def loss(params, x):
      y, coll = layer.apply(params, x, train=True, mutable=["router"])
      return jnp.sum(y * jnp.cos(y)), coll["router"]["metrics"][0]
    (value, metrics), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(params, x)
    outs[(strategy, remat)] = (value, grads, metrics["drop_fraction"])
  ref_value, ref_grads, ref_drop = outs[("index", False)]
  assert float(ref_drop) > 0
  for key in (("gather", True),):
    value, grads, drop = outs[key]
    assert_close(value, ref_value, rtol=1e-5)
    assert_close(drop, ref_drop)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert_close(a, b, rtol=2e-4, atol=2e-5)
  assert float(outs[("sorted", False)][2]) == 0  # dropless
