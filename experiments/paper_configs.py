"""Parameter counts of the papers' shapes (experiments/configs/paper_*.py), the
all-to-all bytes of their pod mesh layouts from shapes, and optionally one
train step compiled abstractly on 8 forced host devices standing in for the
pod mesh.

  python experiments/paper_configs.py                 # counts + bytes
  python experiments/paper_configs.py --compile --compile_layers=1

Writes a table and JSON (default experiments/reports/paper_configs.json).
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                  ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from moejax.experiment import load_module  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["paper_dtop_p", "paper_et"],
                  "Modules under experiments/configs/.")
flags.DEFINE_bool("compile", False, "Also lower + compile one train step on "
                  "the 8-device stand-in mesh (TEST_MESH).")
flags.DEFINE_integer("compile_layers", 1, "Depth of the compiled step (the "
                     "block repeats; 0 = the full depth, slow on a CPU).")
flags.DEFINE_string("out", "experiments/reports/paper_configs.json",
                    "JSON output path ('' = none).")


def main(argv):
  del argv
  from moejax import aot, sharding
  rows = []
  for name in FLAGS.configs:
    mod = load_module(os.path.join(HERE, "configs", f"{name}.py"))
    cfg = mod.config()
    count = aot.count_params(cfg)
    pod = sharding.parse_mesh(mod.POD_MESH, mod.POD_DEVICES)
    a2a = aot.all_to_all_bytes(cfg, pod)
    m = cfg.model
    row = {"name": name, "layers": m.num_layers, "d_model": m.d_model,
           "heads": m.num_heads, "vocab": m.vocab_size,
           "experts": m.moe.num_experts, "shared": m.moe.num_shared,
           "expert_width": m.moe.expert_width,
           "router": m.moe.router.name,
           "target_fanout": m.moe.router.target_fanout,
           "batch": cfg.batch_size, "seq_len": cfg.seq_len,
           "pod_mesh": mod.POD_MESH, **count.as_dict(),
           "pod_a2a_bytes_per_step_per_device": a2a["per_step_per_device"],
           "pod_a2a_bytes_per_step_total": a2a["per_step_total"],
           "capacity": a2a["capacity"]}
    if FLAGS.compile:
      import jax
      mesh = sharding.make_mesh(mod.TEST_MESH)
      shards = mesh.shape["data"] * mesh.shape["expert"]
      pod_shards = pod["data"] * pod["expert"]
      per_shard = max(1, cfg.batch_size // pod_shards)  # the pod's per-device batch
      small = mod.config(batch_size=per_shard * shards,
                         num_layers=FLAGS.compile_layers or m.num_layers)
      t0 = time.perf_counter()
      lowered = aot.lower_train_step(small, mesh)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      row.update({"compiled_mesh": mod.TEST_MESH,
                  "compiled_layers": small.model.num_layers,
                  "compiled_batch": small.batch_size,
                  "lower_s": t1 - t0, "compile_s": t2 - t1,
                  **{f"compiled_{k}": v for k, v in
                     aot.compiled_summary(compiled).items()},
                  "jax": jax.__version__})
    rows.append(row)

  lines = ["| config | layers | D | E (+shared) | fanout | total params | "
           "active params | pod mesh | a2a GB/step/device (pod) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(
        f"| {r['name']} | {r['layers']} | {r['d_model']} | {r['experts']}"
        f" (+{r['shared']}) | {r['target_fanout']:g} | {r['total'] / 1e6:,.1f}M"
        f" | {r['active'] / 1e6:,.1f}M | {r['pod_mesh']} | "
        f"{r['pod_a2a_bytes_per_step_per_device'] / 1e9:.2f} |")
  if FLAGS.compile:
    lines += ["", "| config | compiled on | layers | batch | lower s | compile s "
              "| args MB/device | temp MB/device |", "| --- " * 8 + "|"]
    for r in rows:
      lines.append(
          f"| {r['name']} | {r['compiled_mesh']} | {r['compiled_layers']} | "
          f"{r['compiled_batch']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} |"
          f" {r.get('compiled_argument_size_in_bytes', 0) / 2**20:,.0f} | "
          f"{r.get('compiled_temp_size_in_bytes', 0) / 2**20:,.0f} |")
  table = "\n".join(lines)
  print(table)
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"configs": rows, "table": table}, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
