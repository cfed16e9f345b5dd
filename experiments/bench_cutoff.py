"""Benchmark: per-expert k-th largest score (Expert Threshold's cutoff) forms.

Axis legend:
  N  tokens in the pool
  E  experts
  k  tokens per expert (N f / E)

  python experiments/bench_cutoff.py --out=experiments/reports/bench_cutoff.json

Times (ms, median of --repeats calls of the jitted function on float32[E, N])
and ratios to `lax.top_k` (values and indices, the whole top-k) in the same
run. `moejax` is `routing.threshold.expert_cutoffs` (32-step bisection
on sortable integer keys, exact); `select` rows time the training selection
(`top_per_expert`, a per-expert m) against `lax.top_k` + scatter.
"""
from __future__ import annotations

import json
import os

from absl import app, flags
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import jax
import jax.numpy as jnp
import numpy as np

from moejax.experiment import timing
from moejax.routing import threshold  # noqa: E402

flags.DEFINE_string("out", "experiments/reports/bench_cutoff.json", "JSON path.")
flags.DEFINE_integer("repeats", 20, "Timed calls per form.")
FLAGS = flags.FLAGS

SIZES = [(2048, 8, 2), (4096, 16, 4), (16384, 64, 8)]


def timeit(fn, *args, repeats):
  """Median milliseconds per call."""
  return 1e3 * float(np.median(timing.time_calls(fn, *args, repeats=repeats)))


def forms(k):
  def scatter_select(x):
    _, idx = jax.lax.top_k(x, k)
    return jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None],
                                       idx].set(True)
  return {
      "top_k (values+indices)": lambda x: jax.lax.top_k(x, k),
      "top_k(x, k)[0][:, -1]": lambda x: jax.lax.top_k(x, k)[0][:, -1],
      "min(top_k(x, k)[0])": lambda x: jnp.min(jax.lax.top_k(x, k)[0], -1),
      "sort(x)[:, N-k]": lambda x: jnp.sort(x, -1)[:, x.shape[1] - k],
      "moejax bisection": lambda x: threshold.expert_cutoffs(x.T, k),
      "select: top_k + scatter": scatter_select,
      "select: moejax top_per_expert": lambda x: threshold.top_per_expert(x.T, k),
  }


def main(argv):
  del argv
  rows = []
  for n, e, f in SIZES:
    k = n * f // e
    x = jax.random.normal(jax.random.PRNGKey(0), (e, n))
    ref = np.sort(np.asarray(x), -1)[:, n - k]
    assert np.array_equal(np.asarray(threshold.expert_cutoffs(x.T, k)), ref)
    base = None
    for name, fn in forms(k).items():
      ms = timeit(jax.jit(fn), x, repeats=FLAGS.repeats)
      base = ms if base is None else base
      rows.append({"N": n, "E": e, "k": k, "form": name, "ms": ms,
                   "ratio_to_top_k": ms / base})
  print(f"{'N':>6} {'E':>3} {'k':>5}  {'form':32} {'ms':>9} {'/top_k':>7}")
  for r in rows:
    print(f"{r['N']:6d} {r['E']:3d} {r['k']:5d}  {r['form']:32} "
          f"{r['ms']:9.3f} {r['ratio_to_top_k']:7.2f}")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as fh:
    json.dump({"device": str(jax.devices()[0]), "rows": rows}, fh, indent=1)
  print("wrote", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
