"""Exact-k (ProbMoE) routing cost as a fraction of the MoE layer's fwd+bwd.

Axis legend:
  S  tokens (one group)
  E  experts
  K  subset sizes 0..k
  D  model width
  F  expert width

  python experiments/bench_probmoe.py            # S=4096, D=512, F=256, E=64, k=8

Times (jit, value + gradient of a random linear function of the gates, with
sampling) in the same process, interleaved, min and median over repetitions:

  fast        moejax.routing.probmoe: one scan building prefix and suffix
              tables, closed-form marginals, exact covariance VJP
              (multiply-add scan), tables shared with the sampler.
  scan        the plain formulation: scan over experts, carry [K, S],
              jnp.logaddexp; m = grad(log Z) + p by autodiff; the router's
              gradient by autodiff of that (reverse over reverse); sampling
              from its own table.
  top_k       the top-k router (same k), for scale.
  layer_top_k / layer_exact_k   the MoE layer (--strategy, default the layer's "gather";
              cf 1.25) fwd+bwd
              with each router.

Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import jax
import jax.numpy as jnp
import numpy as np

from moejax import routing
from moejax.experiment import timing
from moejax.routing import ExactK, TopK, probmoe
from moejax.nn.moe import MoE, MoEConfig


flags.DEFINE_integer("tokens", 4096, "Tokens S (one group).")
flags.DEFINE_integer("d_model", 512, "Model width D.")
flags.DEFINE_integer("expert_width", 256, "Expert width F.")
flags.DEFINE_integer("num_experts", 64, "Experts E.")
flags.DEFINE_integer("k", 8, "Subset size k.")
timing.define_flags(repeats=15)
flags.DEFINE_string("strategy", "gather", "Dispatch strategy of the layer.")
flags.DEFINE_string("out", "experiments/reports/probmoe_bench.json",
                    "JSON output path ('' = none).")
FLAGS = flags.FLAGS


# ----------------------------- the plain scan -----------------------------
def plain_prefix(logits: jax.Array, k: int) -> jax.Array:
  """float32[E+1, K, S] prefix table by a plain scan with jnp.logaddexp."""
  rt = logits.T
  lp, lq = jax.nn.log_sigmoid(rt), jax.nn.log_sigmoid(-rt)
  # A finite log 0 (-inf gives NaN gradients through logaddexp).
  init = jnp.full((k + 1, rt.shape[1]), probmoe.NEG).at[0].set(0.0)

  def step(a, x):
    p, q = x
    shifted = jnp.concatenate([jnp.full_like(a[:1], probmoe.NEG), a[:-1]])
    new = jnp.logaddexp(shifted + p, a + q)
    return new, a

  last, seen = jax.lax.scan(step, init, (lp, lq))
  return jnp.concatenate([seen, last[None]])


def walk(prefix, lp, k, rng):
  """Backward-walk sample from a prefix table [E+1, K, S]. bool[E, S]."""
  rho = jnp.exp(jnp.concatenate([jnp.full_like(prefix[:-1, :1], probmoe.NEG),
                                 prefix[:-1, :-1]], axis=1)
                + lp[:, None, :] - prefix[1:])
  u = jax.random.uniform(jax.random.split(rng)[1], lp.shape)  # as the library
  rows = jnp.arange(k + 1)[:, None]

  def step(j, x):
    rho_i, u_i, i = x
    p = jnp.sum(jnp.where(rows == j[None, :], rho_i, 0.0), axis=0)
    take = (j > 0) & ((j > i) | (u_i < p))
    return j - take, take

  size = jnp.full(lp.shape[1:], k, jnp.int32)
  return jax.lax.scan(step, size, (rho, u, jnp.arange(lp.shape[0])),
                      reverse=True)[1]


def plain_route(logits, k, rng):
  """Straight-through gates with autodiff marginals. float32[S, E]."""
  log_z = lambda x: jnp.sum(plain_prefix(x, k)[-1, k])
  m = jax.grad(log_z)(logits) + jax.nn.sigmoid(logits)
  z = walk(jax.lax.stop_gradient(plain_prefix(logits, k)),
           jax.nn.log_sigmoid(jax.lax.stop_gradient(logits)).T, k, rng).T
  probs = jax.nn.softmax(logits, axis=-1)
  g = jnp.where(z, jax.lax.stop_gradient(z - m) + m, 0.0)
  return g * probs


# ------------------------------- timing -----------------------------------
def timed(fns: dict, repeats: int) -> dict:
  """Interleaved timing: {name: (wall min ms, wall median ms, cpu min ms)}.

  CPU = process time (all threads); on a shared, overloaded machine it is the
  steadier measure of the work done.
  """
  res = timing.interleaved(fns, repeats, warmup=1)
  return {n: (1e3 * min(t.wall), 1e3 * float(np.median(t.wall)),
              1e3 * min(t.cpu)) for n, t in res.items()}


def main(argv):
  del argv
  s, d, f, e, k = (FLAGS.tokens, FLAGS.d_model, FLAGS.expert_width,
                   FLAGS.num_experts, FLAGS.k)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  logits = jax.random.normal(keys[0], (s, e))
  cot = jax.random.normal(keys[1], (s, e))
  rng = keys[2]

  def vg(route):
    fn = jax.jit(jax.value_and_grad(lambda x, r: jnp.sum(route(x, r) * cot)))
    return lambda: fn(logits, rng)

  fast = vg(lambda x, r: routing.exact_k(x, k, rng=r).routing.gates)
  plain = vg(lambda x, r: plain_route(x, k, r))
  topk = vg(lambda x, r: routing.top_k(x, k, normalize=False).routing.gates)
  fwd_fn = jax.jit(lambda x, r: routing.exact_k(x, k, rng=r).routing.gates)
  fast_fwd = lambda: fwd_fn(logits, rng)

  # Correctness of the two formulations against each other (same sample).
  g_fast = jax.grad(lambda x: jnp.sum(
      routing.exact_k(x, k, rng=rng).routing.gates * cot))(logits)
  g_plain = jax.grad(lambda x: jnp.sum(plain_route(x, k, rng) * cot))(logits)
  grad_rel = float(jnp.max(jnp.abs(g_fast - g_plain)) /
                   jnp.max(jnp.abs(g_plain)))

  x = jax.random.normal(keys[3], (1, s, d))
  dy = jax.random.normal(keys[4], (1, s, d))

  def layer_vg(method):
    cfg = MoEConfig(num_experts=e, expert_width=f, router=method,
                    strategy=FLAGS.strategy, capacity_factor=1.25)
    layer = MoE(cfg, d_model=d)
    params = layer.init({"params": keys[5]}, x, train=False)["params"]

    def loss(p, xx, r):
      y, _ = layer.apply({"params": p}, xx, train=True, rngs={"router": r},
                         mutable=["router"])
      return jnp.sum(y * dy)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: fn(params, x, rng)

  res = timed({"fast": fast, "fast_forward_only": fast_fwd, "scan": plain,
               "top_k": topk, "layer_top_k": layer_vg(TopK(k=k)),
               "layer_exact_k": layer_vg(ExactK(k=k))}, FLAGS.repeats)
  layer, layer_cpu = res["layer_top_k"][0], res["layer_top_k"][2]
  rows = []
  for name, (best, med, cpu) in res.items():
    rows.append({"variant": name, "wall_min_ms": best, "wall_median_ms": med,
                 "cpu_min_ms": cpu, "wall_fraction": best / layer,
                 "cpu_fraction": cpu / layer_cpu})
  print(f"S={s} D={d} F={f} E={e} k={k}  device={jax.devices()[0].platform}  "
        f"reps={FLAGS.repeats}; min over interleaved reps; fractions of the "
        f"top-k MoE layer fwd+bwd")
  print(f"{'variant':<20}{'wall min':>10}{'wall med':>10}{'cpu min':>10}"
        f"{'wall %':>8}{'cpu %':>8}")
  for r in rows:
    print(f"{r['variant']:<20}{r['wall_min_ms']:>10.1f}"
          f"{r['wall_median_ms']:>10.1f}{r['cpu_min_ms']:>10.1f}"
          f"{100 * r['wall_fraction']:>8.1f}{100 * r['cpu_fraction']:>8.1f}")
  extra = res["layer_exact_k"][0] - layer
  print(f"exact-k routing (value+grad, with sampling): fast "
        f"{100 * res['fast'][0] / layer:.1f}% wall / "
        f"{100 * res['fast'][2] / layer_cpu:.1f}% cpu, plain scan "
        f"{100 * res['scan'][0] / layer:.1f}% / "
        f"{100 * res['scan'][2] / layer_cpu:.1f}%; layer(exact_k) - "
        f"layer(top_k) = {extra:.1f} ms wall; max |grad fast - grad scan| / "
        f"max |grad| = {grad_rel:.1e}")
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as fh:
      json.dump({"config": {"tokens": s, "d_model": d, "expert_width": f,
                            "num_experts": e, "k": k, "reps": FLAGS.repeats,
                            "device": jax.devices()[0].device_kind},
                 "rows": rows, "grad_rel_diff_fast_vs_scan": grad_rel,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "load_average": os.getloadavg(),
                 "layer_exact_minus_top_k_ms": extra}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
