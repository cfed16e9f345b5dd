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

  fast        moejax.routing.exact_k: one scan building prefix and suffix
              tables, closed-form marginals, exact covariance VJP
              (multiply-add scan), tables shared with the sampler.
  scan        the plain formulation: scan over experts, carry [K, S],
              jnp.logaddexp; m = grad(log Z) + p by autodiff; the router's
              gradient by autodiff of that (reverse over reverse); sampling
              from its own table.
  top_k       the top-k router (same k), for scale.
  layer_top_k / layer_exact_k   the MoE layer (index dispatch, cf 1.25) fwd+bwd
              with each router.

Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import routing  # noqa: E402
from moejax.methods import ExactK, TopK  # noqa: E402
from moejax.nn.moe import MoE, MoEConfig  # noqa: E402

ek = importlib.import_module("moejax.routing.exact_k")

flags.DEFINE_integer("tokens", 4096, "Tokens S (one group).")
flags.DEFINE_integer("d_model", 512, "Model width D.")
flags.DEFINE_integer("expert_width", 256, "Expert width F.")
flags.DEFINE_integer("num_experts", 64, "Experts E.")
flags.DEFINE_integer("k", 8, "Subset size k.")
flags.DEFINE_integer("reps", 15, "Timed repetitions per variant.")
flags.DEFINE_string("out", "experiments/reports/bench_probmoe.json",
                    "JSON output path ('' = none).")
FLAGS = flags.FLAGS


# ----------------------------- the plain scan -----------------------------
def plain_prefix(logits: jax.Array, k: int) -> jax.Array:
  """float32[E+1, K, S] prefix table by a plain scan with jnp.logaddexp."""
  rt = logits.T
  lp, lq = jax.nn.log_sigmoid(rt), jax.nn.log_sigmoid(-rt)
  init = jnp.full((k + 1, rt.shape[1]), -jnp.inf).at[0].set(0.0)

  def step(a, x):
    p, q = x
    shifted = jnp.concatenate([jnp.full_like(a[:1], -jnp.inf), a[:-1]])
    new = jnp.logaddexp(shifted + p, a + q)
    return new, a

  last, seen = jax.lax.scan(step, init, (lp, lq))
  return jnp.concatenate([seen, last[None]])


def plain_route(logits, k, rng):
  """Straight-through gates with autodiff marginals. float32[S, E]."""
  log_z = lambda x: jnp.sum(plain_prefix(x, k)[-1, k])
  m = jax.grad(log_z)(logits) + jax.nn.sigmoid(logits)
  prefix = jax.lax.stop_gradient(plain_prefix(logits, k))
  lp = jax.nn.log_sigmoid(jax.lax.stop_gradient(logits)).T
  prefix = jnp.maximum(prefix, ek.NEG)  # the walk expects finite log 0
  size = jnp.full(logits.shape[:1], k, jnp.int32)
  z = ek._walk(ek._inclusion(prefix[:-1], prefix[1:], lp), size, rng).T
  probs = jax.nn.softmax(logits, axis=-1)
  g = jnp.where(z, jax.lax.stop_gradient(z - m) + m, 0.0)
  return g * probs


# ------------------------------- timing -----------------------------------
def timed(fns: dict, reps: int) -> dict:
  """Interleaved timing; {name: (min_ms, median_ms)}."""
  for f in fns.values():
    jax.block_until_ready(f())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[name].append(1e3 * (time.perf_counter() - t0))
  return {n: (float(np.min(t)), float(np.median(t))) for n, t in times.items()}


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
                    strategy="index", capacity_factor=1.25)
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
               "layer_exact_k": layer_vg(ExactK(k=k))}, FLAGS.reps)
  layer = res["layer_top_k"][0]
  rows = []
  for name, (best, med) in res.items():
    rows.append({"variant": name, "min_ms": best, "median_ms": med,
                 "fraction_of_layer_top_k": best / layer})
  print(f"S={s} D={d} F={f} E={e} k={k}  device={jax.devices()[0].platform}  "
        f"reps={FLAGS.reps} (min over interleaved reps; the CPU is shared)")
  print(f"{'variant':<20}{'min ms':>10}{'median ms':>12}{'/ layer':>10}")
  for r in rows:
    print(f"{r['variant']:<20}{r['min_ms']:>10.1f}{r['median_ms']:>12.1f}"
          f"{100 * r['fraction_of_layer_top_k']:>9.1f}%")
  extra = res["layer_exact_k"][0] - layer
  print(f"routing fraction (fast, value+grad with sampling): "
        f"{100 * res['fast'][0] / layer:.1f}% of the top-k layer fwd+bwd; "
        f"scan: {100 * res['scan'][0] / layer:.1f}%; "
        f"layer with exact_k - layer with top_k: {extra:.1f} ms; "
        f"max |grad fast - grad scan| / max |grad| = {grad_rel:.1e}")
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as fh:
      json.dump({"config": {"tokens": s, "d_model": d, "expert_width": f,
                            "num_experts": e, "k": k, "reps": FLAGS.reps,
                            "device": jax.devices()[0].device_kind},
                 "rows": rows, "grad_rel_diff_fast_vs_scan": grad_rel,
                 "layer_exact_minus_top_k_ms": extra}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
