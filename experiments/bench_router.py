"""Train-step time of routers relative to top-k, measured in one process.

  python experiments/bench_router.py --config=tiny --routers="top_k;dtop_p;top_p"

Builds the same LM for each router (every `experiments/train_lm.py` flag is
accepted), compiles its train step, then times `--steps` steps per router, the
routers interleaved, `--repeats` times, on one fixed batch. Prints a table of
median step times and ratios to the first router (the baseline) and writes JSON.
Timings are ratios inside one run (shared, noisy machines): never a test assert.

Axis legend:
  B  batch
  L  sequence length
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys

from absl import app, flags, logging

from moejax.cli import lm_flags
from moejax.experiment import timing

lm_flags.define_flags()
flags.DEFINE_string("routers", "top_k;dtop_p;top_p",
                    "';'-separated [LABEL=]ROUTER[,FLAG=VALUE...]; the first is "
                    "the baseline.")
flags.DEFINE_integer("bench_steps", 10, "Timed steps per repeat.")
timing.define_flags(repeats=7)  # the median round is reported
flags.DEFINE_string("json_out", "experiments/out/bench_router.json",
                    "Where to write the JSON results.")
FLAGS = flags.FLAGS
OWN_FLAGS = ("routers", "bench_steps", "repeats", "json_out")


def build(values):
  """(jitted step, state, batch) for one router's config."""
  import jax
  import jax.numpy as jnp
  from moejax import sharding
  from moejax.models.lm import TransformerLM
  from moejax.train.loop import build_state
  from moejax.train.step import make_train_step

  cfg = lm_flags.build_train_config(values)
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  model = TransformerLM(cfg.model)
  method = cfg.model.moe.router if cfg.model.moe is not None else None
  with mesh:
    state = build_state(cfg, model, mesh)
  step = make_train_step(model, cfg.optim.optimizer(), method,
                         cfg.optim.schedule())
  tokens = jax.random.randint(jax.random.PRNGKey(0),
                              (cfg.batch_size, cfg.seq_len + 1), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((cfg.batch_size, cfg.seq_len), jnp.float32)}
  return cfg, mesh, step, state, batch


def time_routers(specs, base, runs):
  """Times each method's routing alone (forward + backward through the gates,
  as in training) on the model's router-logit shape, interleaved, and relates
  it to the baseline's train step: a less noisy view of router overhead."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  fns = {}
  for spec in specs:
    cfg = lm_flags.build_train_config(dict(base, router=spec.router,
                                           **spec.options))
    moe = cfg.model.moe
    if moe is None:
      continue
    method = moe.router
    num_experts = moe.num_experts
    state = {k: jnp.asarray(v) for k, v in method.init_state(
        num_experts).items()}
    state.update({k: jnp.asarray(v, jnp.float32) for k, v in
                  method.router_params(num_experts).items()})
    shape = (cfg.batch_size, cfg.seq_len, num_experts)
    logits = jax.random.normal(jax.random.PRNGKey(1), shape) * 0.3
    w = jax.random.normal(jax.random.PRNGKey(2), shape)

    def loss(lg, method=method, state=state, w=w):
      out = method.route_groups(lg, state, rng=None, train=True)
      return jnp.sum(out.routing.gates * w) + sum(
          jnp.mean(v) for v in out.aux.values())

    fn = jax.jit(jax.grad(loss))
    fns[spec.label] = (functools.partial(fn, logits), cfg.model.num_moe_layers)
  timings = timing.interleaved({label: fn for label, (fn, _) in fns.items()},
                               FLAGS.repeats, warmup=1,
                               calls=FLAGS.bench_steps * 4)
  fns = {label: (fn, layers, [layers * t for t in timings[label].wall])
         for label, (fn, layers) in fns.items()}
  base_label = specs[0].label
  base_step = statistics.median(runs[base_label]["times"])
  base_router = statistics.median(fns[base_label][2]) if base_label in fns else 0
  rows = []
  for label, (_, _, times) in fns.items():
    med = float(np.median(times))
    rows.append({"label": label, "median_s_per_step": med,
                 "fraction_of_base_step": med / base_step,
                 "added_fraction_over_base": (med - base_router) / base_step,
                 "times": times})
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax
  from moejax.experiment import parse_runs  # compare_routers' spec syntax

  specs = parse_runs(FLAGS.routers)
  base = {k: v for k, v in FLAGS.flag_values_dict().items()
          if k not in OWN_FLAGS}
  runs = {}
  for spec in specs:
    values = dict(base, router=spec.router, **spec.options)
    cfg, mesh, step, state, batch = build(values)
    with mesh:
      (state, metrics), compile_s = timing.timed(step, state, batch)
      state, metrics = jax.block_until_ready(step(state, batch))
    runs[spec.label] = {"step": step, "state": state, "batch": batch,
                        "mesh": mesh, "compile_s": compile_s,
                        "fanout": float(metrics.get("experts_per_token",
                                                    float("nan")))}

  def steps(r):
    """`--bench_steps` train steps of one router, advancing its state."""
    with r["mesh"]:
      out = r["state"], None
      for _ in range(FLAGS.bench_steps):
        out = r["step"](out[0], r["batch"])
      r["state"] = out[0]
      return out

  timings = timing.interleaved(
      {spec.label: functools.partial(steps, runs[spec.label]) for spec in specs},
      FLAGS.repeats, calls=1)
  for spec in specs:
    runs[spec.label]["times"] = [t / FLAGS.bench_steps
                                 for t in timings[spec.label].wall]
  router_only = time_routers(specs, base, runs)
  base_label = specs[0].label
  base_time = statistics.median(runs[base_label]["times"])
  rows = []
  for spec in specs:
    r = runs[spec.label]
    med = statistics.median(r["times"])
    rows.append({"label": spec.label, "router": spec.router,
                 "median_step_s": med, "min_step_s": min(r["times"]),
                 "ratio_to_" + base_label: med / base_time,
                 "min_ratio_to_" + base_label:
                     min(r["times"]) / min(runs[base_label]["times"]),
                 "compile_s": r["compile_s"], "fanout": r["fanout"],
                 "times": r["times"]})
  device = jax.devices()[0]
  out = {"device": f"{device.platform}:{device.device_kind}",
         "config": FLAGS.config, "bench_steps": FLAGS.bench_steps,
         "repeats": FLAGS.repeats, "argv": sys.argv, "rows": rows,
         "router_only": router_only}
  print(f"device {out['device']}, config {FLAGS.config}, "
        f"{FLAGS.repeats} x {FLAGS.bench_steps} steps per router")
  print(f"| router | median step (ms) | min step (ms) | median ratio to "
        f"{base_label} | min ratio | fanout |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['label']} | {1e3 * row['median_step_s']:.1f} | "
          f"{1e3 * row['min_step_s']:.1f} | "
          f"{row['ratio_to_' + base_label]:.3f} | "
          f"{row['min_ratio_to_' + base_label]:.3f} | {row['fanout']:.2f} |")
  print("\nrouter alone (forward + backward of one layer's routing over the "
        "batch's groups, x number of MoE layers), as a fraction of the "
        f"{base_label} train step:")
  print("| router | median (ms) per step | fraction of the step | added over "
        f"{base_label} |")
  print("|---|---|---|---|")
  for row in router_only:
    print(f"| {row['label']} | {1e3 * row['median_s_per_step']:.2f} | "
          f"{row['fraction_of_base_step']:.3f} | "
          f"{row['added_fraction_over_base']:+.3f} |")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
  with open(FLAGS.json_out, "w") as f:
    json.dump(out, f, indent=1)
  print("json:", FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
