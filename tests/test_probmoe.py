"""ProbMoE exact-k / dynamic-k: tables, marginals, sampling and gradients
against brute-force enumeration of all subsets (float64 numpy)."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from moejax import routing
from moejax.routing import DynamicK, ExactK, probmoe
from moejax.models import LMConfig, TransformerLM
from moejax.nn import MoEConfig
from moejax.train import OptimConfig, create_train_state, make_train_step


# Jitted entry points (integer arguments static): one compile per shape.
marginals = jax.jit(probmoe.dynamic_k_marginals, static_argnums=(1, 2))
log_partition = jax.jit(probmoe.dynamic_k_log_partition, static_argnums=(1, 2))
exact_marginals = jax.jit(routing.exact_k_marginals, static_argnums=1)
exact_log_partition = jax.jit(routing.exact_k_log_partition, static_argnums=1)
sample = jax.jit(probmoe.sample_subsets, static_argnums=(1, 2))


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def enumerate_subsets(r, sizes):
  """All subsets with size in `sizes`: (list of index tuples, log weights)."""
  r = np.asarray(r, np.float64)
  lp, lq = log_sigmoid(r), log_sigmoid(-r)
  subsets, logw = [], []
  for size in sizes:
    for subset in itertools.combinations(range(len(r)), size):
      z = np.zeros(len(r), bool)
      z[list(subset)] = True
      subsets.append(subset)
      logw.append(np.sum(np.where(z, lp, lq)))
  return subsets, np.array(logw)


def brute(r, k_min, k_max):
  """(log Z*, marginals [E], covariance [E, E]) of the range distribution."""
  subsets, logw = enumerate_subsets(r, range(k_min, k_max + 1))
  log_z = np.logaddexp.reduce(logw)
  prob = np.exp(logw - log_z)
  zs = np.zeros((len(subsets), len(r)))
  for i, subset in enumerate(subsets):
    zs[i, list(subset)] = 1.0
  m = prob @ zs
  cov = (zs * prob[:, None]).T @ zs - np.outer(m, m)
  return log_z, m, cov


CASES = [(4, 1, 1), (6, 6, 6), (7, 3, 3), (10, 4, 4), (8, 2, 4), (6, 1, 6)]


@pytest.mark.parametrize("num_experts,k_min,k_max", CASES)
def test_partition_and_marginals_match_enumeration(num_experts, k_min, k_max):
  rng = np.random.default_rng(num_experts * 100 + k_min * 10 + k_max)
  logits = rng.normal(size=(5, num_experts)) * 2.5
  logits[0] = 0.0  # all ties
  x = jnp.asarray(logits, jnp.float32)
  if k_min == k_max:
    log_z = exact_log_partition(x, k_min)
    m = exact_marginals(x, k_min)
  else:
    log_z = log_partition(x, k_min, k_max)
    m = marginals(x, k_min, k_max)
  chex.assert_shape(log_z, (5,))
  chex.assert_shape(m, (5, num_experts))
  for s in range(5):
    ref_z, ref_m, _ = brute(logits[s], k_min, k_max)
    np.testing.assert_allclose(log_z[s], ref_z, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(m[s], ref_m, atol=2e-6)
  if k_min == k_max:
    np.testing.assert_allclose(m.sum(-1), k_min, rtol=2e-6)


def test_size_log_partitions_are_elementary_symmetric():
  logits = np.random.default_rng(1).normal(size=(3, 7)) * 2
  sizes = probmoe.size_log_partitions(jnp.asarray(logits, jnp.float32), 7)
  for s in range(3):
    for j in range(8):
      ref = brute(logits[s], j, j)[0] if j else np.sum(log_sigmoid(-logits[s]))
      np.testing.assert_allclose(sizes[s, j], ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("num_experts,k_min,k_max",
                         [(7, 1, 1), (6, 6, 6), (8, 3, 3), (8, 2, 5)])
def test_marginal_gradient_is_covariance_and_matches_finite_differences(
    num_experts, k_min, k_max):
  rng = np.random.default_rng(7 + num_experts + k_min)
  logits = rng.normal(size=(2, num_experts)) * 1.5
  c = rng.normal(size=(2, num_experts))
  eps = 1e-2
  # Rows 0-1: the point; then +eps and -eps along each expert for row 0.
  bumps = np.eye(num_experts) * eps
  points = np.concatenate([logits, logits[0] + bumps, logits[0] - bumps])

  @jax.jit
  def run(x):
    f = lambda v: jnp.sum(probmoe.dynamic_k_marginals(v, k_min, k_max)[:2] *
                          jnp.asarray(c))
    rows = jnp.sum(probmoe.dynamic_k_marginals(x, k_min, k_max) *
                   jnp.asarray(c[0]), axis=-1)
    return jax.grad(f)(x)[:2], rows[2:]

  grad, rows = run(jnp.asarray(points, jnp.float32))
  for s in range(2):
    _, _, cov = brute(logits[s], k_min, k_max)
    np.testing.assert_allclose(grad[s], cov @ c[s], atol=3e-6)
  fd = (rows[:num_experts] - rows[num_experts:]) / (2 * eps)
  np.testing.assert_allclose(grad[0], fd, atol=2e-3)


def test_log_partition_gradient_is_marginal_minus_p_and_hessian():
  logits = np.random.default_rng(3).normal(size=(4, 6)) * 2
  x = jnp.asarray(logits, jnp.float32)

  @jax.jit
  def run(x):
    total = lambda v: jnp.sum(routing.exact_k_log_partition(v, 3))
    return jax.grad(total)(x), jax.hessian(total)(x)

  grad, hess = run(x)
  p = 1 / (1 + np.exp(-logits))
  for s in range(4):
    _, m, cov = brute(logits[s], 3, 3)
    np.testing.assert_allclose(grad[s], m - p[s], atol=3e-6)
    np.testing.assert_allclose(hess[s, :, s], cov - np.diag(p[s] * (1 - p[s])),
                               atol=1e-5)
  eps = 1e-2
  d = np.zeros_like(logits)
  d[:, 2] = eps
  f = lambda v: float(jnp.sum(exact_log_partition(
      jnp.asarray(v, jnp.float32), 3)))
  np.testing.assert_allclose((f(logits + d) - f(logits - d)) / (2 * eps),
                             np.sum(grad[:, 2]), atol=2e-3)


def test_extreme_logits_are_stable():
  rng = np.random.default_rng(0)
  num_experts = 9
  scale = np.repeat([50.0, 1e3], 8)[:, None]  # rows 0-7: +-50, rows 8-15: +-1e3
  logits = rng.choice([-1.0, 1.0, 0.0, 0.2], size=(16, num_experts)) * scale
  logits[0] = logits[9] = 50.0
  logits[1] = logits[10] = -50.0
  x = jnp.asarray(logits, jnp.float32)
  for k in (1, 3, num_experts):
    @jax.jit
    def run(v):
      loss = lambda u: (jnp.sum(routing.exact_k_marginals(u, k) ** 2) +
                        jnp.sum(routing.exact_k_log_partition(u, k)))
      return (routing.exact_k_log_partition(v, k),
              routing.exact_k_marginals(v, k), jax.grad(loss)(v),
              probmoe.sample_subsets(v, k, k, jax.random.PRNGKey(k)))
    log_z, m, grad, z = run(x)
    assert np.all(np.isfinite(log_z)) and np.all(np.isfinite(grad))
    assert np.all((m >= 0) & (m <= 1))
    # float32 log-space tables of magnitude ~ scale * E: ulp-level error there.
    err = np.abs(np.asarray(m).sum(-1) - k) / k
    assert np.all(err <= 2e-6 * scale[:, 0] * num_experts), err
    np.testing.assert_array_equal(z.sum(-1), k)
    for s in range(8):
      ref_z, ref_m, _ = brute(logits[s], k, k)
      np.testing.assert_allclose(log_z[s], ref_z, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(m[s], ref_m, atol=1e-5)


def test_every_sample_has_exactly_k_members():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(512, 16)) * rng.choice([0.1, 3.0, 30.0],
                                                   size=(512, 1))
  x = jnp.asarray(logits, jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  for k in (1, 5, 16):
    @jax.jit
    def run(v):
      one = lambda key: (probmoe.sample_subsets(v, k, k, key),
                         routing.exact_k(v, k, rng=key).routing.gates)
      return jax.vmap(one)(keys)
    z, gates = run(x)
    assert z.dtype == jnp.bool_
    np.testing.assert_array_equal(z.sum(-1), k)
    np.testing.assert_array_equal(gates != 0, z)
    if k == 5:  # three different draws: not a deterministic rule
      assert len({np.asarray(z[i]).tobytes() for i in range(3)}) == 3


def chi_square_pvalue(counts, probs):
  counts = np.asarray(counts, np.float64)
  expected = probs * counts.sum()
  assert expected.min() >= 5  # the test's validity condition
  stat = np.sum((counts - expected) ** 2 / expected)
  return stats.chi2.sf(stat, df=len(probs) - 1)


@pytest.mark.parametrize("k_min,k_max", [(2, 2), (1, 3)])
def test_sampled_subset_frequencies_match_enumeration(k_min, k_max):
  logits = np.array([1.2, -0.3, 0.5, -1.0, 0.0], np.float64)
  num = 40000
  x = jnp.asarray(np.broadcast_to(logits, (num, 5)), jnp.float32)
  z = np.asarray(sample(x, k_min, k_max, jax.random.PRNGKey(42)))
  subsets, logw = enumerate_subsets(logits, range(k_min, k_max + 1))
  probs = np.exp(logw - np.logaddexp.reduce(logw))
  code = {s: i for i, s in enumerate(subsets)}
  counts = np.zeros(len(subsets))
  for row in z:
    counts[code[tuple(np.flatnonzero(row))]] += 1  # KeyError = wrong size
  assert chi_square_pvalue(counts, probs) > 1e-3
  # Sample mean of z agrees with the exact marginals (5 standard errors).
  m = brute(logits, k_min, k_max)[1]
  se = np.sqrt(m * (1 - m) / num)
  assert np.all(np.abs(z.mean(0) - m) < 5 * se + 1e-9)


def test_dynamic_k_size_frequencies_match_partition_ratios():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=6) * 1.5 - 0.5
  num = 30000
  x = jnp.asarray(np.broadcast_to(logits, (num, 6)), jnp.float32)
  k_min, k_max = 1, 5
  key = jax.random.PRNGKey(9)
  run = jax.jit(lambda v: (probmoe.sample_subsets(v, k_min, k_max, key),
                           routing.dynamic_k(v, k_min, k_max,
                                             rng=key).routing.gates))
  z, gates = run(x)
  z = np.asarray(z)
  sizes = z.sum(-1)
  assert sizes.min() >= k_min and sizes.max() <= k_max
  log_zk = np.array([brute(logits, k, k)[0] for k in range(k_min, k_max + 1)])
  probs = np.exp(log_zk - np.logaddexp.reduce(log_zk))
  counts = np.bincount(sizes, minlength=k_max + 1)[k_min:]
  assert chi_square_pvalue(counts, probs) > 1e-3
  # The router's training path uses the same draws.
  np.testing.assert_array_equal(np.asarray(gates) != 0, z)


def test_dynamic_k_map_matches_brute_force():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(64, 7)) * 2
  x = jnp.asarray(logits, jnp.float32)
  probs = np.asarray(jax.nn.softmax(x))
  for k_min, k_max in [(1, 7), (2, 4), (3, 3)]:
    gates = np.asarray(jax.jit(lambda v: routing.dynamic_k(
        v, k_min, k_max).routing.gates)(x))
    for s in range(64):
      subsets, logw = enumerate_subsets(logits[s], range(k_min, k_max + 1))
      best = list(subsets[int(np.argmax(logw))])
      assert set(np.flatnonzero(gates[s])) == set(best)
      np.testing.assert_allclose(gates[s, best], probs[s, best], rtol=1e-6)


def test_exact_k_inference_is_unnormalised_top_k():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(32, 8)),
                       jnp.float32)
  out = jax.jit(lambda v: (routing.exact_k(v, 3).routing.gates,
                           routing.top_k(v, 3, normalize=False).routing.gates))
  gates, ref = out(logits)
  np.testing.assert_array_equal(gates, ref)
  assert not np.allclose(np.sum(gates, -1), 1.0)


def test_straight_through_gates_value_and_gradient():
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(6, 7)) * 1.5
  c = rng.normal(size=(6, 7))
  x = jnp.asarray(logits, jnp.float32)
  key = jax.random.PRNGKey(3)

  @jax.jit
  def run(v):
    gates = lambda u: routing.exact_k(u, 3, rng=key).routing.gates
    grad = jax.grad(lambda u: jnp.sum(gates(u) * c))(v)
    return gates(v), probmoe.sample_subsets(v, 3, 3, key), grad

  gates, z, grad = map(np.asarray, run(x))
  probs = np.asarray(jax.nn.softmax(x))
  np.testing.assert_array_equal(gates != 0, z)
  assert np.all(gates[~z] == 0.0)
  np.testing.assert_allclose(gates[z], probs[z], rtol=1e-5)
  for s in range(6):
    _, m, cov = brute(logits[s], 3, 3)
    v = c[s] * z[s]
    through_m = cov @ (v * probs[s])        # d m, times the softmax weight
    through_softmax = probs[s] * (v - np.sum(probs[s] * v))  # value of g = 1
    np.testing.assert_allclose(grad[s], through_m + through_softmax, atol=1e-5)


def test_validation_errors_name_the_argument():
  x = jnp.zeros((4, 6))
  with pytest.raises(ValueError, match="k=7"):
    routing.exact_k(x, 7)
  with pytest.raises(ValueError, match="k=0"):
    routing.exact_k_marginals(x, 0)
  with pytest.raises(ValueError, match="k_max=2"):
    routing.dynamic_k(x, 3, 2)
  with pytest.raises(ValueError, match="k_max=9"):
    routing.dynamic_k(x, 1, 9)
  with pytest.raises(ValueError, match="k_min"):
    DynamicK(k=2, k_min=3, k_max=4)
  with pytest.raises(ValueError, match="k=5"):
    DynamicK(k=5, k_min=1, k_max=3)
  with pytest.raises(ValueError, match="k_max=9"):
    MoEConfig(num_experts=8, router=DynamicK(k=2, k_min=1, k_max=9))


def test_methods_registered_and_built_from_flags():
  assert {"exact_k", "dynamic_k"} <= set(routing.available())
  m = routing.build("dynamic_k", {"k": 2, "k_min": 1, "k_max": 3, "p": 0.5})
  assert m == DynamicK(k=2, k_min=1, k_max=3)
  assert m.uses_rng and m.max_fanout(8) == 3 and m.target_fanout == 2.0
  assert DynamicK(k=8) == DynamicK(k=8, k_min=6, k_max=8)
  e = routing.build("exact_k", {"k": 4})
  assert e == ExactK(k=4) and e.uses_rng and e.max_fanout(16) == 4


def test_methods_route_groups_with_rng():
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 6))

  @jax.jit
  def run(logits, key):
    outs = {}
    for method in (ExactK(k=2), DynamicK(k=2, k_min=1, k_max=3)):
      train = method.route_groups(logits, {}, rng=key, train=True)
      evals = method.route_groups(logits, {}, rng=None, train=False)
      outs[method.name] = (train.routing.gates, evals.routing.gates)
    return outs

  a = run(logits, jax.random.PRNGKey(1))
  b = run(logits, jax.random.PRNGKey(1))
  c = run(logits, jax.random.PRNGKey(2))
  fan = lambda g: np.asarray(g != 0).sum(-1)
  np.testing.assert_array_equal(fan(a["exact_k"][0]), 2)
  np.testing.assert_array_equal(fan(a["exact_k"][1]), 2)
  assert fan(a["dynamic_k"][0]).min() >= 1 and fan(a["dynamic_k"][0]).max() <= 3
  assert len(np.unique(fan(a["dynamic_k"][0]))) > 1
  for name in a:  # same key: same draw; another key: another draw
    np.testing.assert_array_equal(a[name][0], b[name][0])
    assert not np.array_equal(a[name][0], c[name][0])
    np.testing.assert_array_equal(a[name][1], c[name][1])  # eval: no rng
  # Groups get different draws.
  assert not np.array_equal(a["exact_k"][0][0] != 0, a["exact_k"][0][1] != 0)
  # Training routes all groups' tokens in one pass: the same as exact_k /
  # dynamic_k on the flattened tokens with the same key.
  flat = logits.reshape(-1, 6)
  ref = jax.jit(lambda v, key: (
      routing.exact_k(v, 2, rng=key).routing.gates,
      routing.dynamic_k(v, 1, 3, rng=key).routing.gates))(
          flat, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a["exact_k"][0], ref[0].reshape(3, 16, 6))
  np.testing.assert_array_equal(a["dynamic_k"][0], ref[1].reshape(3, 16, 6))


def test_train_steps_with_dynamic_k_are_reproducible_and_resumable():
  """The layer draws make_rng("router"); the train step folds the step into
  the state's key: the state alone fixes the draws (a resumed run repeats
  them, tests/test_train.py checks the checkpoint round trip), and the draws
  change from step to step."""
  model = TransformerLM(LMConfig(
      num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=16,
      moe=MoEConfig(num_experts=4, expert_width=16,
                    router=DynamicK(k=2, k_min=1, k_max=3))))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 17), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((4, 16), jnp.float32)}
  variables = jax.jit(lambda x: model.init(
      {"params": jax.random.PRNGKey(1)}, x, train=False))(batch["inputs"])
  optim = OptimConfig(learning_rate=3e-3, warmup_steps=1, total_steps=4)
  state = create_train_state(variables["params"], {}, optim.optimizer(),
                             jax.random.PRNGKey(2))
  step = make_train_step(model, optim.optimizer(), model.config.moe.router,
                         donate=False)
  run = []
  for _ in range(3):
    state, metrics = step(state, batch)
    run.append((state, metrics))
  # Resume from the host copy of the state after step 1.
  saved = jax.tree.map(np.asarray, run[0][0])
  again, _ = step(jax.tree.map(jnp.asarray, saved), batch)
  again, metrics = step(again, batch)
  for a, b in zip(jax.tree.leaves(run[2][0]), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert metrics["loss"] == run[2][1]["loss"]
  fan = [float(m["experts_per_token"]) for _, m in run]
  assert all(1.0 <= f <= 3.0 for f in fan) and len(set(fan)) == 3
