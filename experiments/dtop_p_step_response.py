"""DTop-p controller step response on a real (frozen) tiny LM, on CPU.

  python experiments/dtop_p_step_response.py --out=experiments/reports/dtop_p

The `tiny` LM with DTop-p routing (weights frozen at their initialisation) routes
a new batch of `stdlib` text every step; after each forward pass the method's
own `DTopP.update` (the code the train step runs) moves p from the measured mean
fanout. The target steps from `--k` to `--k2` at `--switch`. Each gain pair runs
at gamma = 1 (p near 0.5) and at a large gamma on every layer (p near 0.9, where
d fanout / d p is large), showing that kp 0.5 / ki 0.2 rings there while the
defaults settle. Writes `step_response_cpu.png` and `.json`.

Axis legend:
  B  batch
  L  sequence length
"""
from __future__ import annotations

import functools
import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("out", "experiments/out/dtop_p", "Output directory.")
flags.DEFINE_integer("steps", 160, "Controller steps per run.")
flags.DEFINE_integer("switch", 80, "Step at which the target changes.")
flags.DEFINE_integer("k", 2, "First target fanout.")
flags.DEFINE_integer("k2", 3, "Target fanout after the switch.")
flags.DEFINE_float("high_gamma", 3.0, "gamma of the high-gain runs.")
flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
flags.DEFINE_string("gains", "0.1/0.1,0.5/0.2", "kp/ki pairs to compare.")
FLAGS = flags.FLAGS


def step_response(gains, gamma, *, steps, switch, k, k2, batch_size, seed=0):
  """Runs the closed loop; returns per-step fanout, p and per-layer fanout."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax import configs
  from moejax.data import get_lm_data
  from moejax.routing import DTopP
  from moejax.models.lm import LMConfig, TransformerLM
  from moejax.nn.moe import MoEConfig
  from moejax.train.step import router_outputs, router_states, update_router_state

  pre = configs.preset("tiny")
  kp, ki = gains
  methods = [DTopP(k=k, pi_kp=kp, pi_ki=ki), DTopP(k=k2, pi_kp=kp, pi_ki=ki)]
  moe = MoEConfig(num_experts=pre["num_experts"],
                  expert_width=pre["expert_width"], router=methods[0])
  model = TransformerLM(LMConfig(num_layers=pre["num_layers"],
                                 d_model=pre["d_model"],
                                 num_heads=pre["num_heads"], d_ff=pre["d_ff"],
                                 max_len=pre["seq_len"], moe=moe))
  data = get_lm_data("stdlib", seq_len=pre["seq_len"], batch_size=batch_size,
                     seed=seed, max_bytes=3_000_000)
  variables = model.init({"params": jax.random.PRNGKey(seed),
                          "router": jax.random.PRNGKey(seed)},
                         jnp.zeros((batch_size, pre["seq_len"]), jnp.int32))
  params = nn.meta.unbox(variables["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.full_like(v, gamma)
      if getattr(path[-1], "key", None) == "gamma" else v, params)
  router_state = variables["router_state"]

  @jax.jit
  def forward(router_state, tokens):
    _, coll = model.apply({"params": params, "router_state": router_state},
                          tokens, train=False, mutable=["router"])
    return {path: layer["metrics"]
            for path, layer in router_outputs(coll["router"]).items()}

  def control(method, router_state, metrics):
    layers = {path: {"metrics": m} for path, m in metrics.items()}
    return update_router_state(method, router_state, layers, jnp.int32(0))
  controls = [jax.jit(functools.partial(control, m)) for m in methods]

  fanout, p, layer_fanout = [], [], []
  for t in range(steps):
    metrics = forward(router_state, jnp.asarray(data.batch(t)["inputs"]))
    router_state = controls[int(t >= switch)](router_state, metrics)
    per_layer = [float(m["experts_per_token"]) for m in metrics.values()]
    layer_fanout.append(per_layer)
    fanout.append(float(np.mean(per_layer)))
    p.append(float(np.mean([float(s["p"]) for s in
                            router_states(router_state).values()])))
  return {"kp": kp, "ki": ki, "gamma": gamma, "fanout": fanout, "p": p,
          "layer_fanout": layer_fanout,
          "target": [k if t < switch else k2 for t in range(steps)]}


def summarize(run, switch, band=0.02):
  """Settling (steps after each target change) and the late step-to-step sd."""
  import numpy as np
  fan, target = np.array(run["fanout"]), np.array(run["target"], float)
  out = {}
  for name, lo, hi in (("first", 0, switch), ("second", switch, len(fan))):
    seg, tgt = fan[lo:hi], target[lo:hi]
    bad = np.nonzero(np.abs(seg - tgt) > band * tgt)[0]
    out[f"settle_{name}"] = (0 if bad.size == 0 else
                             int(bad[-1]) + 1 if bad[-1] + 1 < len(seg) else None)
    tail = seg[len(seg) // 2:]
    out[f"sd_{name}_tail"] = float(tail.std())
    out[f"p_{name}_end"] = float(run["p"][hi - 1])
  return out


def main(argv):
  del argv
  from moejax.experiment.plots import pyplot, save
  plt = pyplot()

  os.makedirs(FLAGS.out, exist_ok=True)
  gains = [tuple(float(x) for x in g.split("/")) for g in FLAGS.gains.split(",")]
  runs = []
  for gamma in (1.0, FLAGS.high_gamma):
    for g in gains:
      run = step_response(g, gamma, steps=FLAGS.steps, switch=FLAGS.switch,
                          k=FLAGS.k, k2=FLAGS.k2, batch_size=FLAGS.batch_size)
      run["summary"] = summarize(run, FLAGS.switch)
      print(f"gamma {gamma:g} kp {g[0]:g} ki {g[1]:g}: {run['summary']}",
            flush=True)
      runs.append(run)
  fig, axes = plt.subplots(2, 2, figsize=(12, 6.5), sharex=True)
  for col, gamma in enumerate((1.0, FLAGS.high_gamma)):
    for run in (r for r in runs if r["gamma"] == gamma):
      label = f"kp {run['kp']:g}, ki {run['ki']:g}"
      axes[0, col].plot(run["fanout"], lw=1, label=label)
      axes[1, col].plot(run["p"], lw=1, label=label)
    axes[0, col].plot(runs[0]["target"], "k--", lw=1, label="target")
    axes[0, col].set_title(f"gamma = {gamma:g} on every layer")
    axes[0, col].set_ylabel("mean experts per token")
    axes[1, col].set_ylabel("p")
    axes[1, col].set_xlabel("controller step (one batch each)")
    axes[0, col].legend(fontsize=8)
  fig.suptitle("DTop-p step response, tiny LM (frozen init weights), "
               f"{FLAGS.batch_size}x128 stdlib bytes per step, CPU")
  path = save(fig, os.path.join(FLAGS.out, "step_response_cpu.png"))
  with open(os.path.join(FLAGS.out, "step_response_cpu.json"), "w") as f:
    json.dump({"argv": sys.argv, "runs": runs}, f)
  print("plot:", path)


if __name__ == "__main__":
  app.run(main)
