"""Compile time and step time of one train step per mesh layout, 1 vs 8 devices,
and the all-to-all bytes per step computed from shapes.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python experiments/bench_sharding.py --config=small --steps=5

Layouts: one device; 8 devices as data:8, data:2,expert:4 and
data:2,expert:2,model:2, each expert layout with GSPMD constraints and with the
shard_map all-to-all. Every layout starts from the same initial state and
batch (synthetic tokens), so the losses agree and are printed as a check.
Writes a table and JSON (default experiments/reports/bench_sharding.json).
Forced host devices share the machine's CPU cores: 8 "devices" are not 8x
the compute, so the 8-device numbers measure partitioning overhead, not
speed-up.
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                  ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Preset (moejax.configs).")
flags.DEFINE_integer("steps", 5, "Timed steps per layout (after one warm-up).")
flags.DEFINE_integer("batch_size", None, "Global batch (default: preset).")
flags.DEFINE_integer("num_layers", None, "Override the preset's depth.")
flags.DEFINE_list("layouts", ["1", "data:8", "data:2,expert:4",
                              "data:2,expert:2,model:2"],
                  "Mesh layouts; '1' = one device.")
flags.DEFINE_list("expert_parallel", ["gspmd", "shard_map"],
                  "Expert-parallel modes for layouts with an expert axis > 1.")
flags.DEFINE_string("strategy", "index", "Dispatch strategy of the MoE layers.")
flags.DEFINE_string("out", "experiments/reports/bench_sharding.json",
                    "JSON output path.")


def build_config(preset_name, batch_size, num_layers, mode):
  from moejax import configs, routing
  from moejax.models.lm import LMConfig
  from moejax.nn.moe import MoEConfig
  from moejax.tasks.lm import TrainConfig
  from moejax.train.state import OptimConfig
  pre = configs.preset(preset_name)
  moe = MoEConfig(num_experts=pre["num_experts"],
                  expert_width=pre["expert_width"],
                  router=routing.build("top_k", {"k": pre["k"]}),
                  strategy=FLAGS.strategy, expert_parallel=mode)
  model = LMConfig(num_layers=num_layers or pre["num_layers"],
                   d_model=pre["d_model"], num_heads=pre["num_heads"],
                   d_ff=pre["d_ff"], max_len=pre["seq_len"], moe=moe,
                   moe_every=pre["moe_every"])
  return TrainConfig(model=model, batch_size=batch_size or pre["batch_size"],
                     seq_len=pre["seq_len"], steps=100,
                     optim=OptimConfig(learning_rate=pre["learning_rate"],
                                       warmup_steps=10, total_steps=100))


def main(argv):
  del argv
  import jax
  import numpy as np
  from moejax import aot, sharding
  from moejax.experiment import timing
  from moejax.models.lm import TransformerLM
  from moejax.train.loop import build_state, state_shardings
  from moejax.train.step import make_train_step

  base = build_config(FLAGS.config, FLAGS.batch_size, FLAGS.num_layers,
                      "gspmd")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (base.batch_size, base.seq_len + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32),
           "targets": tokens[:, 1:].astype(np.int32),
           "mask": np.ones((base.batch_size, base.seq_len), np.float32)}
  mesh1 = sharding.make_mesh(None, jax.devices()[:1])
  with jax.set_mesh(mesh1):
    init = jax.device_get(build_state(base, TransformerLM(base.model), mesh1))
  count = aot.count_params(base)

  runs = []
  for layout in FLAGS.layouts:
    devices = jax.devices()[:1] if layout == "1" else jax.devices()
    mesh = sharding.make_mesh(None if layout == "1" else layout, devices)
    sizes = dict(mesh.shape)
    modes = FLAGS.expert_parallel if sizes["expert"] > 1 else ["gspmd"]
    for mode in modes:
      cfg = build_config(FLAGS.config, FLAGS.batch_size, FLAGS.num_layers,
                         mode)
      model = TransformerLM(cfg.model)
      load0 = os.getloadavg()[0]
      with jax.set_mesh(mesh):
        state = jax.device_put(init, state_shardings(cfg, model, mesh))
        step = make_train_step(model, cfg.optim.optimizer(),
                               cfg.model.moe.router, donate=False)
        b = sharding.put_batch(batch, sharding.batch_sharding(mesh))
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = step.lower(state, b).compile()
        compile_s = time.perf_counter() - t0
        compile_cpu_s = time.process_time() - c0
        hlo = compiled.as_text()
        _, metrics = jax.block_until_ready(compiled(state, b))  # warm-up
        times = timing.time_calls(compiled, state, b, repeats=FLAGS.steps,
                                  warmup=0)
      a2a = aot.all_to_all_bytes(cfg, sizes)
      run = {
          "layout": "1 device" if layout == "1" else layout,
          "devices": len(devices), "expert_parallel": mode,
          "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
          "step_s_median": statistics.median(times),
          "step_s_min": min(times), "steps_timed": len(times),
          "loss": float(metrics["loss"]),
          "all_to_all_ops_in_hlo": hlo.count("all-to-all-start") +
                                   hlo.count(" all-to-all("),
          "a2a_bytes_per_step_per_device": a2a["per_step_per_device"],
          "a2a_bytes_per_step_total": a2a["per_step_total"],
          "capacity": a2a.get("capacity"),
          "load_avg_1m_before": load0,
      }
      runs.append(run)
      print(f"{run['layout']:<26} {mode:<9} compile {compile_s:6.1f}s "
            f"step {run['step_s_median']:.3f}s loss {run['loss']:.5f}",
            flush=True)

  ref = runs[0]
  lines = [
      f"config={FLAGS.config} layers={base.model.num_layers} "
      f"D={base.model.d_model} E={base.model.moe.num_experts} "
      f"k={base.model.moe.router.k} batch={base.batch_size}x{base.seq_len} "
      f"strategy={FLAGS.strategy} "
      f"params={count.total / 1e6:.2f}M (active {count.active / 1e6:.2f}M)",
      "",
      "| layout | devices | expert parallel | compile s | step s (median) "
      "| step / 1-device | all-to-all MB/step/device (shapes) | a2a ops in HLO "
      "| loss |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in runs:
    lines.append(
        f"| {r['layout']} | {r['devices']} | {r['expert_parallel']} | "
        f"{r['compile_s']:.1f} | {r['step_s_median']:.3f} | "
        f"{r['step_s_median'] / ref['step_s_median']:.2f} | "
        f"{r['a2a_bytes_per_step_per_device'] / 2**20:.2f} | "
        f"{r['all_to_all_ops_in_hlo']} | {r['loss']:.5f} |")
  table = "\n".join(lines)
  print(table)
  result = {"config": FLAGS.config, "num_layers": base.model.num_layers,
            "strategy": FLAGS.strategy,
            "batch_size": base.batch_size, "seq_len": base.seq_len,
            "params": count.as_dict(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "runs": runs, "table": table}
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
