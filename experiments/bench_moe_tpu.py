"""The MoE layer's multi-device path per TPU chip, ahead of time (no TPU).

Axis legend:
  T  tokens (--sizes gives them per chip; the mesh programs get T x chips)
  D  model width
  F  expert width
  E  experts
  k  experts per token
  G  routing groups (one per --seq_groups tokens)
  C  capacity (slots per expert and group)
  N  chips of the topology

For each TPU topology (`moejax.aot.topology_devices`: libtpu's compiler, no
TPU hardware), size, routing group and dtype it compiles the forward+backward
steps of `bench_moe.py` (`moe_step`: top_k router -> the layer's expert path
`nn.expert_parallel.routed_experts`; `dense_step`: the dense SwiGLU FFN of
width k*F, the same active FLOPs) for

  dense        the dense FFN, N x T tokens split over all N chips;
  moe          the MoE layer, N x T tokens, on each of --meshes ("data:N",
               "expert:N", "data:N/2,expert:2"; expert meshes in each of
               --expert_parallel's modes), expert weights split over
               `expert`;
  single chip  the same two steps at T tokens on a mesh of one chip (the
               single-plan path: what one chip runs with no mesh)

and reads back, per chip: XLA's FLOPs and bytes accessed
(`compiled.cost_analysis()`), the collectives of the compiled HLO
(`aot.hlo_collectives`), peak memory (`memory_analysis()`) and a roofline
(`aot.estimate_step` with the chip's public peaks). These are XLA's cost
model and a roofline, not measurements. "vs single" is a mesh row's on-chip
estimate (compute + HBM time) over the single-chip row's at the same tokens
per chip (1.0: the mesh path costs a chip what the single-plan path does);
"vs dense" is a MoE row's over the dense FFN's on the same chips.

  PYTHONPATH=$PWD JAX_PLATFORMS=cpu python experiments/bench_moe_tpu.py
  ... --topology=v5e:2x2,v5e:2x4 --dtype=bfloat16,float32

Writes a markdown table to stdout and JSON to --out.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import jax
import jax.numpy as jnp

from moejax import aot, flops
from moejax.experiment import load_module

# bench_moe's steps, inputs and flags (experiments/ is not a package).
bench_moe = load_module(os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "bench_moe.py"))

flags.DEFINE_list("topology", ["v5e:2x2"],
                  "TPU topologies (moejax.aot.topology_devices names, e.g. "
                  "v5e:2x2, v5e:2x4, v5p:2x2x1)")
flags.DEFINE_bool("single_chip", True, "also compile the single-chip rows")
flags.DEFINE_string("hlo_dir", None, "write each row's compiled HLO here")
FLAGS = flags.FLAGS
FLAGS.set_default("sizes", "4096x512x1024x8x2,8192x256x128x128x8")
FLAGS.set_default("dtype", ["bfloat16"])
FLAGS.set_default("meshes", "data:N;expert:N;data:N/2,expert:2")
FLAGS.set_default("expert_parallel", "gspmd,shard_map")
FLAGS.set_default("out", "experiments/reports/bench_moe_tpu.json")

COLUMNS = ("topology", "T/chip", "D,F,E,k", "group", "dtype", "mesh",
           "mode", "GFLOP", "GB HBM", "a2a n/MiB", "ag n/MiB", "ar n/MiB",
           "ICI MiB", "chip ms", "ICI ms", "peak MiB", "vs dense",
           "vs single (FLOP, bytes, chip)")


def mesh_specs(chips: int) -> list[str]:
  """--meshes with N = chips (N/2 = chips // 2), duplicates dropped."""
  specs = []
  for text in FLAGS.meshes.split(";"):
    spec = text.replace("N/2", str(chips // 2)).replace("N", str(chips))
    if spec and spec not in specs:
      specs.append(spec)
  return specs


def abstract(tree, shardings):
  """`ShapeDtypeStruct`s of `tree`'s leaves carrying `shardings` (a pytree
  prefix of `tree`)."""
  def leaf(s, x):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x)
  return jax.tree.map(leaf, shardings, tree,
                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def entries_for(size: bench_moe.Size, dtype, group: int, mode: str | None):
  """(dense entry, MoE entries by strategy) of bench_moe at `size`; `args`
  are shapes (nothing is computed). `mode` is the expert-parallel mode."""
  shapes = jax.eval_shape(lambda: bench_moe.make_inputs(size, FLAGS.seed))
  x, cot, dense_params, moe_params = shapes
  method, state = bench_moe.calibrated_method("top_k", size, None)
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  dense = {"router": "dense", "strategy": "-",
           "fn": bench_moe.dense_step(dtype), "args": (dense_params, x, cot)}
  moe = []
  for strategy in FLAGS.seq_strategies:
    fn, cap = bench_moe.moe_step(method, size, strategy, dtype, group, mode)
    moe.append({"router": "top_k", "strategy": strategy, "fn": fn,
                "args": (moe_params, x, cot, rng, state), "capacity": cap})
  return dense, moe


def compile_row(entry, size, mesh, chip, label: str) -> dict:
  """Compiles one entry on `mesh` and reads its per-chip cost (`label`: the
  file name of its HLO under --hlo_dir)."""
  args = abstract(entry["args"], bench_moe.arg_shardings(entry, size, mesh))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = entry["fn"].lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  if FLAGS.hlo_dir:
    os.makedirs(FLAGS.hlo_dir, exist_ok=True)
    with open(os.path.join(FLAGS.hlo_dir, label + ".hlo"), "w") as fh:
      fh.write(hlo)
  coll = aot.hlo_collectives(hlo)
  traffic = sum(c["traffic"] for c in coll.values())
  chips = mesh.devices.size
  model_flops = 3 * size.tokens * flops.mlp_flops(
      size.d_model, size.k * size.width) / chips
  est = aot.estimate_step(float(cost.get("flops", 0.0)),
                          float(cost.get("bytes accessed", 0.0)), traffic,
                          model_flops, chip)
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "collectives": coll, "ici_traffic_bytes": traffic,
          "estimate": est, "chip_s": est["compute_s"] + est["hbm_s"],
          "peak_mib": bench_moe.peak_memory(compiled),
          "compile_s": compile_s}


def run_topology(name: str, sizes, dtypes) -> list[dict]:
  chip, devices = aot.topology_devices(name)
  chips = len(devices)
  rows = []
  layouts = [(spec, None) for spec in mesh_specs(chips)]
  if FLAGS.single_chip:
    layouts.append(("chip", None))
  for per_chip in sizes:
    scaled = bench_moe.Size(per_chip.tokens * chips, per_chip.d_model,
                            per_chip.width, per_chip.experts, per_chip.k)
    for dtype_name in dtypes:
      dtype = jnp.dtype(dtype_name)
      dense_s = {}
      for spec, _ in layouts:
        one = spec == "chip"
        mesh = aot.topology_mesh("data:1" if one else spec,
                                 devices[:1] if one else devices)
        size = per_chip if one else scaled
        modes = ["gspmd"]
        if not one and mesh.shape["expert"] > 1:
          modes = FLAGS.expert_parallel.split(",")
        for group in [int(g) for g in FLAGS.seq_groups]:
          if size.tokens % group or (size.tokens // group) % (
              mesh.shape["data"] * mesh.shape["expert"]):
            print(f"note: {name} {spec} group {group} skipped (groups do not "
                  "split over the batch axes)", file=sys.stderr)
            continue
          for mode in modes:
            dense, moe = entries_for(size, dtype, group, mode)
            todo = moe
            key = (spec == "chip", dtype_name)
            if key not in dense_s:
              todo = [dense] + moe
            for entry in todo:
              row = {"topology": name, "chip": chip.name, "chips": chips,
                     "size": str(per_chip), "tokens_per_chip":
                     per_chip.tokens, "tokens": size.tokens,
                     "d_model": size.d_model, "width": size.width,
                     "experts": size.experts, "k": size.k,
                     "dtype": dtype_name, "mesh": spec,
                     "router": entry["router"],
                     "strategy": entry["strategy"],
                     "group": None if entry["router"] == "dense" else group,
                     "mode": "-" if (entry["router"] == "dense" or one or
                                     len(modes) == 1) else mode,
                     "capacity": entry.get("capacity"),
                     **compile_row(entry, size, mesh, chip, "_".join(
                         str(p) for p in (name, per_chip, dtype_name, spec,
                                          mode, entry["strategy"], group)
                     ).replace(":", "").replace(",", "x"))}
              if entry["router"] == "dense":
                dense_s[key] = row
              row["vs_dense"] = row["chip_s"] / dense_s[key]["chip_s"]
              rows.append(row)
              print(f"[{name} {size} {dtype_name} {spec} {row['mode']} "
                    f"{entry['router']} {entry['strategy']} group "
                    f"{row['group']}] compiled in {row['compile_s']:.1f} s",
                    file=sys.stderr, flush=True)
  vs_single(rows)
  return rows


def vs_single(rows):
  """Sets each mesh row's ratios over the single-chip row of the same size,
  dtype, router, strategy and group (FLOPs, bytes accessed, compute + HBM
  time)."""
  single = {(r["size"], r["dtype"], r["router"], r["strategy"], r["group"]): r
            for r in rows if r["mesh"] == "chip"}
  for row in rows:
    ref = single.get((row["size"], row["dtype"], row["router"],
                      row["strategy"], row["group"]))
    if ref is None or row["mesh"] == "chip":
      continue
    row["vs_single"] = {"flops": row["flops"] / ref["flops"],
                        "bytes": row["bytes_accessed"] /
                                 ref["bytes_accessed"],
                        "chip_s": row["chip_s"] / ref["chip_s"]}


def table(rows) -> str:
  def coll(row, kind):
    c = row["collectives"][kind]
    return f"{c['count']}/{c['bytes'] / 2**20:.1f}" if c["count"] else "-"
  lines = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for r in rows:
    name = r["router"] if r["router"] == "dense" else (
        f"{r['strategy']}" + ("" if r["strategy"] == "gather" else " (vmap)"))
    ratio = r.get("vs_single")
    cells = [r["topology"], str(r["tokens_per_chip"]),
             f"{r['d_model']},{r['width']},{r['experts']},{r['k']}",
             "-" if r["group"] is None else str(r["group"]), r["dtype"],
             r["mesh"] + ("" if r["router"] == "top_k" else " dense"),
             r["mode"] if r["router"] == "dense" or name == "gather" else
             f"{r['mode']} {name}",
             f"{r['flops'] / 1e9:.1f}", f"{r['bytes_accessed'] / 1e9:.3f}",
             coll(r, "all-to-all"), coll(r, "all-gather"),
             coll(r, "all-reduce"), f"{r['ici_traffic_bytes'] / 2**20:.1f}",
             f"{1e3 * r['chip_s']:.3f}", f"{1e3 * r['estimate']['ici_s']:.3f}",
             f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-",
             "-" if r["router"] == "dense" else f"{r['vs_dense']:.2f}",
             "-" if ratio is None else
             f"{ratio['flops']:.2f}, {ratio['bytes']:.2f}, "
             f"{ratio['chip_s']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sizes = [bench_moe.Size.parse(s) for s in FLAGS.sizes.split(",") if s]
  start = time.time()
  rows = []
  for name in FLAGS.topology:
    rows += run_topology(name, sizes, FLAGS.dtype)
  wall = time.time() - start
  print(table(rows))
  print(f"\nwall {wall:.0f} s")
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as fh:
      json.dump({"command": " ".join(sys.argv), "jax": jax.__version__,
                 "capacity_factor": FLAGS.capacity_factor, "wall_s": wall,
                 "rows": rows}, fh, indent=1)
    print(f"wrote {FLAGS.out}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
