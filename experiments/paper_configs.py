"""The registry's pod-scale configs (`moejax.configs`: the papers' shapes by
default, `--configs=mixtral_8x7b` etc.): parameter counts, the all-to-all
bytes of their pod mesh layouts from shapes, and the train step
compiled either on 8 forced host devices standing in for the pod mesh or, with
libtpu installed, ahead of time for a real TPU slice.

  python experiments/paper_configs.py                 # counts + bytes
  python experiments/paper_configs.py --compile --compile_layers=1
  python experiments/paper_configs.py --topology=v5p-64,v5e-256 \
      --out=/tmp/tpu_aot.json                         # TPU AOT report

Counts take seconds; --compile a few minutes; --topology about 15-25 min per
slice for the four paper configs on 2 CPU cores (one line per plan tried).
JSON goes to --out only when given (the committed reports are regenerated
with an explicit --out=experiments/reports/...).

With --topology, each config is compiled for each slice (TPU HLO from
`jax.experimental.topologies`, no TPU needed) on the mesh of its registry entry
(`tpu_mesh(chips)`) with its per-device batch, trying in order: no remat,
remat of every block, remat at the per-device batch halved and halved again
(--max_tries plans at most), until the compiled step fits the chip's HBM.
Each try compiles the step at two depths (one and two repeats of the block
pattern) and extrapolates memory, FLOPs and collectives linearly to the full
depth (the blocks are identical; a plan that does not fit at the first depth
is not compiled further, and when the parameters and optimizer state alone
exceed the HBM no later plan is tried); --first_plan resumes a run (the
--max_tries plans are counted from it);
--full_depth compiles the full depth instead (slow on a small CPU host).
Writes JSON and a markdown report (--markdown).
"""
from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                  ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402

from moejax import configs as configs_lib  # noqa: E402

# The registry entries with a pod layout (`moejax.configs.NamedConfig`).
CONFIGS = {name: entry for name, entry in configs_lib.REGISTRY.items()
           if entry.pod_mesh is not None}

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", list(configs_lib.PAPER_CONFIGS),
                  "Config names: " + ", ".join(CONFIGS))
flags.DEFINE_bool("compile", False, "Also lower + compile one train step on "
                  "the 8-device stand-in mesh (the entry's test_mesh).")
flags.DEFINE_integer("compile_layers", 1, "Depth of the compiled step (the "
                     "block repeats; 0 = the full depth, slow on a CPU).")
flags.DEFINE_list("topology", [], "TPU slices to compile for ahead of time "
                  "(e.g. v5p-64,v5e-256,v6e-256; needs libtpu).")
flags.DEFINE_bool("full_depth", False, "With --topology: compile the full "
                  "depth instead of extrapolating from two shallow compiles.")
flags.DEFINE_integer("max_tries", 4, "With --topology: plans tried per config "
                     "and slice, counted from --first_plan, until one fits.")
flags.DEFINE_integer("first_plan", 0, "With --topology: index of the first "
                     "plan tried (resumes a run whose earlier plans' rows are "
                     "in --tables_from).")
flags.DEFINE_string("out", "", "JSON output path ('' = none; e.g. "
                    "experiments/reports/paper_configs.json to regenerate "
                    "the committed one).")
flags.DEFINE_string("markdown", "", "With --topology: markdown report path.")
flags.DEFINE_string("mesh", "", "With --topology: this mesh (e.g. "
                    "fsdp:4,expert:8) instead of the entry's tpu_mesh(chips).")
flags.DEFINE_integer("shard_batch", 0, "With --topology: sequences per batch "
                     "shard (data x fsdp x expert) of the first plan instead "
                     "of the entry's shard_batch (0).")
flags.DEFINE_bool("keep_going", False, "With --topology: compile the later "
                  "plans (up to --max_tries) also after one fits.")
flags.DEFINE_bool("scan_layers", False, "With --topology: the model's blocks "
                  "as one layer scan (model.scan_layers): memory from the "
                  "full-depth scanned compile; FLOPs, bytes and collectives "
                  "(which XLA counts once for a loop body) from the "
                  "matching unrolled row of --tables_from, else from "
                  "unrolled compiles at one and two periods, extrapolated.")
flags.DEFINE_list("tables_from", [], "JSON outputs of earlier --topology runs "
                  "whose rows join this report (e.g. one run per slice).")


def count_row(name: str, mod) -> dict:
  """Shape, parameter counts and pod all-to-all bytes of one config."""
  from moejax import aot, sharding
  cfg = mod.config()
  count = aot.count_params(cfg)
  pod = sharding.parse_mesh(mod.pod_mesh, mod.pod_devices)
  a2a = aot.all_to_all_bytes(cfg, pod)
  m = cfg.model
  moe = m.moe
  return {"name": name, "layers": m.num_layers, "d_model": m.d_model,
          "heads": m.num_heads, "vocab": m.vocab_size,
          "experts": moe.num_experts if moe else 0,
          "shared": moe.num_shared if moe else 0,
          "expert_width": moe.expert_width if moe else 0,
          "router": moe.router.name if moe else
                    f"mod {m.mod.capacity:g} every {m.mod_every}",
          "target_fanout": moe.router.target_fanout if moe else 0,
          "batch": cfg.batch_size, "seq_len": cfg.seq_len,
          "pod_mesh": mod.pod_mesh, **count.as_dict(),
          "pod_a2a_bytes_per_step_per_device": a2a["per_step_per_device"],
          "pod_a2a_bytes_per_step_total": a2a["per_step_total"],
          "capacity": a2a.get("capacity", 0)}


def stand_in_compile(mod, row: dict) -> dict:
  """One train step compiled on the 8 forced host devices (test_mesh)."""
  import jax
  from moejax import aot, sharding
  mesh = sharding.make_mesh(mod.test_mesh)
  shards = sharding.batch_shards(mesh)
  pod = sharding.parse_mesh(mod.pod_mesh, mod.pod_devices)
  per_shard = max(1, row["batch"] // (pod["data"] * pod["fsdp"] *
                                      pod["expert"]))
  small = mod.config(batch_size=per_shard * shards,
                     num_layers=FLAGS.compile_layers or row["layers"])
  t0 = time.perf_counter()
  lowered = aot.lower_train_step(small, mesh)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"compiled_mesh": mod.test_mesh,
          "compiled_layers": small.model.num_layers,
          "compiled_batch": small.batch_size,
          "lower_s": t1 - t0, "compile_s": t2 - t1,
          **{f"compiled_{k}": v for k, v in
             aot.compiled_summary(compiled).items()},
          "jax": jax.__version__}


# ----------------------------------------------------------------------------
# Ahead-of-time compilation for TPU slices.


def plans(mod, chips: int, hbm_bytes: int) -> list[dict]:
  """Plans tried in order for one config on a slice of `chips` chips: no
  remat, remat, then remat at the batch per shard halved again and again
  (down to 1); on chips with less than 32 GiB of HBM the first is skipped
  (block remat is the usual choice there). --mesh and --shard_batch replace
  the entry's mesh and batch per shard."""
  mesh = FLAGS.mesh or mod.tpu_mesh(chips)
  batch = FLAGS.shard_batch or mod.shard_batch
  base = {"mesh": mesh, "shard_batch": batch, "remat": False,
          "expert_parallel": "gspmd"}
  if FLAGS.scan_layers:
    base["scan_layers"] = True
  tries = [base, {**base, "remat": True}]
  while batch > 1:
    batch //= 2
    tries.append({**base, "remat": True, "shard_batch": batch})
  return tries[1:] if hbm_bytes < 32 * 2**30 else tries


def plan_window(tries: list[dict], name: str,
                topology: str) -> list[tuple[int, dict]]:
  """(index, plan) of the plans to compile: --max_tries of them from
  --first_plan on. ValueError (one line) where that window is empty."""
  first, count = FLAGS.first_plan, FLAGS.max_tries
  if not 0 <= first < len(tries):
    raise ValueError(f"first_plan={first} compiles nothing: {name} on "
                     f"{topology} has {len(tries)} plans; allowed: 0 to "
                     f"{len(tries) - 1}")
  return list(enumerate(tries))[first:first + count]


def compile_plan(mod, topology: str, plan: dict) -> dict:
  """Compiles (or extrapolates) one config x slice x plan; returns its row."""
  from moejax import aot, sharding
  chip, devices = aot.topology_devices(topology)
  mesh = aot.topology_mesh(plan["mesh"], devices)
  sizes = sharding.parse_mesh(plan["mesh"], len(devices))
  batch = plan["shard_batch"] * sizes["data"] * sizes["fsdp"] * sizes["expert"]
  full = mod.config(batch_size=batch, remat=plan["remat"],
                    expert_parallel=plan["expert_parallel"])
  if plan.get("scan_layers"):
    return compile_scanned(mod, topology, plan, full, mesh, chip, devices)
  depth = full.model.num_layers
  period = full.model.mod_every if full.model.mod is not None else 1
  if FLAGS.full_depth:
    depths = [depth]
  else:
    depths = [period, 2 * period]
  reports, seconds = [], 0.0
  for d in depths:
    cfg = dataclasses.replace(full, model=dataclasses.replace(full.model,
                                                              num_layers=d))
    t0 = time.perf_counter()
    compiled = aot.lower_train_step(cfg, mesh).compile()
    seconds += time.perf_counter() - t0
    reports.append(aot.tpu_report(cfg, compiled, mesh, chip))
    if not reports[-1]["fits"]:
      break  # memory only grows with depth: the full depth cannot fit
  depths = depths[:len(reports)]
  if len(reports) == 1:
    report = reports[0]
  else:
    report = aot.extrapolate(copy.deepcopy(reports[0]), reports[1], depths[0],
                          depths[1], depth)
    # fits / estimate follow from the extrapolated numbers
    report["fits"] = report["hbm_peak_bytes"] <= chip.hbm_bytes
    report["model_flops_per_device"] = aot.flops_lib.train_flops(
        full.model, batch, full.seq_len) / len(devices)
    traffic = sum(c["traffic"] for c in report["collectives"].values())
    report["ici_traffic_bytes"] = traffic
    report["estimate"] = aot.estimate_step(
        report["flops_per_device"], report["hbm_bytes_accessed"], traffic,
        report["model_flops_per_device"], chip)
  return {"config": mod.name, "topology": topology, "chip": chip.name,
          "chips": len(devices), **plan, "global_batch": batch,
          "seq_len": full.seq_len, "layers": depth,
          "compiled_depths": depths, "compile_s": seconds, **report}


def _unrolled_row(name: str, topology: str, plan: dict) -> dict | None:
  """The row of --tables_from compiled for the same config, slice, mesh,
  batch and remat without a layer scan, or None."""
  keys = ("mesh", "shard_batch", "remat", "expert_parallel")
  for path in FLAGS.tables_from:
    with open(path) as f:
      for row in json.load(f).get("tpu", []):
        if (row["config"] == name and row["topology"] == topology
            and row.get("compiles") and not row.get("scan_layers")
            and all(row.get(k) == plan[k] for k in keys)):
          return row
  return None


def compile_scanned(mod, topology: str, plan: dict, full, mesh, chip,
                    devices) -> dict:
  """A plan with a layer scan: the full depth compiled scanned (memory);
  FLOPs, bytes and collectives from the matching unrolled row (or compiles,
  `aot.step_cost`), each number's source in "cost_source"."""
  from moejax import aot
  full = dataclasses.replace(full, model=dataclasses.replace(
      full.model, scan_layers=True))
  t0 = time.perf_counter()
  compiled = aot.lower_train_step(full, mesh).compile()
  seconds = time.perf_counter() - t0
  unrolled = _unrolled_row(mod.name, topology, plan)
  compile_fn = None
  if unrolled is None:
    compile_fn = lambda c: aot.lower_train_step(c, mesh).compile()
  report = aot.tpu_report(full, compiled, mesh, chip, compile_fn)
  if unrolled is not None:
    source = (f"the unrolled row of {','.join(FLAGS.tables_from)} (compiled "
              f"at depths {unrolled['compiled_depths']}, extrapolated to "
              f"{unrolled['layers']})")
    for key in ("flops_per_device", "hbm_bytes_accessed", "collectives",
                "ici_traffic_bytes"):
      report[key] = unrolled[key]
      report["cost_source"][key] = source
    report["estimate"] = aot.estimate_step(
        report["flops_per_device"], report["hbm_bytes_accessed"],
        report["ici_traffic_bytes"], report["model_flops_per_device"], chip)
  report["memory_source"] = (f"the full depth ({full.model.num_layers} "
                             "layers) compiled with the layer scan")
  return {"config": mod.name, "topology": topology, "chip": chip.name,
          "chips": len(devices), **plan, "global_batch": full.batch_size,
          "seq_len": full.seq_len, "layers": full.model.num_layers,
          "compiled_depths": [full.model.num_layers], "compile_s": seconds,
          **report}


def topology_rows(names: list[str], topologies: list[str],
                  save=lambda rows: None) -> list[dict]:
  """Rows of every config x slice x plan tried; `save(rows)` after each."""
  from moejax import aot
  rows = []
  for topology in topologies:
    chip, devices = aot.topology_devices(topology)
    for name in names:
      mod = CONFIGS[name]
      tries = plans(mod, len(devices), chip.hbm_bytes)
      for i, plan in plan_window(tries, name, topology):
        print(f"compiling {name} for {topology}: plan {i + 1}/{len(tries)} "
              f"(remat {'on' if plan['remat'] else 'off'}, "
              f"{plan['shard_batch']} per shard)...", flush=True)
        try:
          row = compile_plan(mod, topology, plan)
        except Exception as e:  # noqa: BLE001 - a plan that does not compile
          row = {"config": name, "topology": topology, **plan,
                 "compiles": False, "error": f"{type(e).__name__}: {e}"[:500]}
        else:
          row["compiles"] = True
        rows.append(row)
        save(rows)
        print(_row_line(row), flush=True)
        if row.get("fits") and not FLAGS.keep_going:
          break
        if (row.get("compiles") and row["params_bytes"] +
            row["optimizer_bytes"] > chip.hbm_bytes):
          # remat and a smaller batch shrink only the temporaries: no later
          # plan can fit either
          row["later_plans_skipped"] = True
          save(rows)
          break
  return rows


def _gib(x: float) -> str:
  return f"{x / 2**30:.1f}"


def _row_line(r: dict) -> str:
  if not r.get("compiles"):
    return f"{r['config']} {r['topology']} {r['mesh']}: FAILED {r['error']}"
  e = r["estimate"]
  return (f"{r['config']} {r['topology']} {r['mesh']} remat={r['remat']} "
          f"b/shard={r['shard_batch']}: HBM {_gib(r['hbm_peak_bytes'])}/"
          f"{_gib(r['hbm_capacity_bytes'])} GiB, "
          f"{r['flops_per_device'] / 1e12:.1f} TFLOP/dev, step "
          f"~{e['step_s'] * 1e3:.0f} ms ({e['bound']}), MFU ~{e['mfu']:.2f}, "
          f"compile {r['compile_s']:.0f} s")


COLL_SHORT = {"all-to-all": "a2a", "all-gather": "ag", "reduce-scatter": "rs",
              "all-reduce": "ar", "collective-permute": "cp"}


def topology_markdown(rows: list[dict]) -> str:
  """The per-(config, slice, plan) table and the largest fit per slice."""
  lines = [
      "| config | slice | mesh | batch/shard (global) | remat | compiles | "
      "params / opt / temp GiB | HBM peak / capacity GiB | fits | "
      "TFLOP/step/dev (XLA / model) | collectives: count, GiB/dev "
      "(a2a, ag, rs, ar, cp) | est. step ms (compute / HBM / ICI) | est. MFU |",
      "| --- " * 13 + "|"]
  for r in rows:
    head = (f"| {r['config']} | {r['topology']} | {r['mesh']} | "
            f"{r['shard_batch']} ({r.get('global_batch', '-')}) | "
            f"{'yes' if r['remat'] else 'no'}"
            f"{' + scan' if r.get('scan_layers') else ''} | ")
    if not r.get("compiles"):
      lines.append(head + "**no**: " + r["error"].replace("|", "/")[:120] +
                   " |" + " - |" * 7)
      continue
    e = r["estimate"]
    partial = ""
    if r["compiled_depths"][-1] < r["layers"] and len(r["compiled_depths"]) < 2:
      partial = f" (at {r['compiled_depths'][-1]} layers)"
    coll = ", ".join(
        f"{COLL_SHORT[k]} {c['count']}: {c['bytes'] / 2**30:.2f}"
        for k, c in r["collectives"].items() if c["count"])
    lines.append(
        head + f"yes | {_gib(r['params_bytes'])} / {_gib(r['optimizer_bytes'])}"
        f" / {_gib(r['temp_bytes'])} | {_gib(r['hbm_peak_bytes'])}{partial} /"
        f" {_gib(r['hbm_capacity_bytes'])} | {'yes' if r['fits'] else '**no**'}"
        f" | {r['flops_per_device'] / 1e12:.1f} / "
        f"{r['model_flops_per_device'] / 1e12:.1f} | {coll or '-'} | "
        f"{e['step_s'] * 1e3:.0f} ({e['compute_s'] * 1e3:.0f} / "
        f"{e['hbm_s'] * 1e3:.0f} / {e['ici_s'] * 1e3:.0f}) | {e['mfu']:.2f} |")
  lines += ["", "Largest config that fits per slice (total parameters):", ""]
  from moejax import aot
  totals = {n: aot.count_params(CONFIGS[n].config()).total
            for n in {r["config"] for r in rows}}
  for topology in dict.fromkeys(r["topology"] for r in rows):
    here = [r for r in rows if r["topology"] == topology]
    fit = [r for r in here if r.get("fits")]
    if not fit:
      line = f"- {topology}: none of the configs fits."
    else:
      best = max(fit, key=lambda r: totals[r["config"]])
      line = (
          f"- {topology}: {best['config']} ({totals[best['config']] / 1e9:.2f}B"
          f" parameters) on {best['mesh']}, remat "
          f"{'on' if best['remat'] else 'off'}, {best['shard_batch']} "
          f"sequences per batch shard; fitting: "
          + ", ".join(f"{r['config']} (remat {'on' if r['remat'] else 'off'},"
                      f" b/shard {r['shard_batch']})" for r in fit) + ".")
    lines.append(line + "".join(_misfit(here, name) for name in
                                dict.fromkeys(r["config"] for r in here)))
  return "\n".join(lines)


def _misfit(rows: list[dict], name: str) -> str:
  """' Not fitting: ...' for config `name` when none of its `rows` (one
  slice) fits: the plan that came closest and why no later one was tried."""
  rows = [r for r in rows if r["config"] == name]
  if any(r.get("fits") for r in rows):
    return ""
  compiled = [r for r in rows if r.get("compiles")]
  if not compiled:
    return f" {name} does not compile on this slice."
  r = min(compiled, key=lambda r: r["hbm_peak_bytes"])
  text = (f" {name} does not fit: closest plan remat "
          f"{'on' if r['remat'] else 'off'}, b/shard {r['shard_batch']} on "
          f"{r['mesh']}, HBM peak {_gib(r['hbm_peak_bytes'])} of "
          f"{_gib(r['hbm_capacity_bytes'])} GiB")
  if any(r.get("later_plans_skipped") for r in rows):
    text += (f"; params + optimizer alone take "
             f"{_gib(r['params_bytes'] + r['optimizer_bytes'])} GiB, so no "
             f"remat or smaller batch can fit (later plans not compiled)")
  return text + "."



def report_markdown(rows: list[dict], command: str) -> str:
  """The TPU AOT report: method, chip figures, the table, the largest fit."""
  from moejax import aot
  chips = "\n".join(
      f"| {c.name} | {c.peak_flops / 1e12:.0f} | {c.hbm_bytes / 2**30:.0f} | "
      f"{c.hbm_bandwidth / 1e9:.0f} | {c.ici_bandwidth / 1e9:.0f} |"
      for c in aot.CHIPS.values())
  return f"""# The paper configs compiled for TPU slices, ahead of time

`{command}`

Each paper config's full train step (forward, backward, AdamW, controller
update; `moejax.aot.lower_train_step`) is compiled by XLA:TPU for the devices
of a TPU slice from `jax.experimental.topologies.get_topology_desc` (libtpu,
no TPU attached), on the mesh of its registry entry (`tpu_mesh(chips)`, or
the run's `--mesh`) with its sequences per batch shard (`shard_batch`, or
`--shard_batch`; batch shards = data x fsdp x expert; global batch = shards
x that), GSPMD expert parallelism. Plans are tried in order until one fits:
no remat, remat of every block (`LMConfig.remat`), remat at the batch per
shard halved and halved again, 4 plans at most (on chips with < 32 GiB of
HBM the no-remat plan is skipped);
when the parameters and optimizer state alone exceed the chip's HBM, the
later plans (which shrink only the temporaries) are not compiled.

How the numbers are obtained:
- **Depth.** Every try compiles the step at one and two repeats of the block
  pattern (1 and 2 layers; MoD: 2 and 4) and extrapolates each number
  linearly to the full depth (the blocks are identical). A try that does not
  fit at the first depth is not compiled further (its row shows that depth).
  Checked on a small model (3 layers, v5e:2x2): extrapolated vs full-depth
  compile: FLOPs and collectives equal, HBM peak within 5%.
- **HBM per device**: params and optimizer from the state's shard shapes;
  temp = XLA's temporaries (`memory_analysis().temp_size_in_bytes`: saved
  activations and every intermediate buffer); peak = arguments + temporaries
  + outputs not aliased to the donated state, against the chip's capacity.
- **FLOPs** per device from XLA's `cost_analysis()` (includes remat
  recomputation), beside the model FLOPs (`moejax.flops`, 3 x forward).
- **Collectives** parsed from the compiled HLO text (`aot.hlo_collectives`):
  one per channel id (XLA:TPU clones an async collective into several
  fusions), count and per-device result bytes, per kind (a2a all-to-all, ag
  all-gather, rs reduce-scatter, ar all-reduce, cp collective-permute).
- **Step time, roofline**: max(XLA FLOPs / peak FLOP/s, XLA bytes accessed /
  HBM bandwidth, ICI traffic / ICI bandwidth), i.e. perfect overlap; ICI
  traffic per device = (n-1)/n x bytes for all-gather and all-to-all, 2 (n-1)/n
  x bytes for all-reduce, (n-1) x output for reduce-scatter, the bytes for
  collective-permute (n = replica group size), over the chip's total ICI
  bandwidth (all links, both directions: optimistic for a ring on one torus
  axis). MFU = model FLOPs / (step time x peak). An estimate, not a
  measurement: it ignores latency, imperfect overlap and kernel efficiency.

| chip | peak bf16 TFLOP/s | HBM GiB | HBM GB/s | ICI GB/s |
| --- | --- | --- | --- | --- |
{chips}

{topology_markdown(rows)}
"""


def count_markdown(rows: list[dict]) -> str:
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
    lines += ["", "| config | compiled on | layers | batch | lower s | "
              "compile s | args MB/device | temp MB/device |",
              "| --- " * 8 + "|"]
    for r in rows:
      lines.append(
          f"| {r['name']} | {r['compiled_mesh']} | {r['compiled_layers']} | "
          f"{r['compiled_batch']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} |"
          f" {r.get('compiled_argument_size_in_bytes', 0) / 2**20:,.0f} | "
          f"{r.get('compiled_temp_size_in_bytes', 0) / 2**20:,.0f} |")
  return "\n".join(lines)


# Sections of the markdown report that other scripts write (from this heading
# to the end): kept when the report is regenerated.
KEPT_SECTION = "## Attention implementations"  # experiments/attention_aot.py


def kept_sections(path: str) -> str:
  """The text of `path` from `KEPT_SECTION` on ('' if none)."""
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    text = f.read()
  return "\n" + text[text.index(KEPT_SECTION):] if KEPT_SECTION in text else ""


def main(flag_values) -> int:
  """Exit code: 0, or 2 after one line on bad input or a missing libtpu."""
  del flag_values
  try:
    run()
  except (ValueError, ImportError, FileNotFoundError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  return 0


def run() -> None:
  if FLAGS.max_tries < 1:
    raise ValueError(f"max_tries={FLAGS.max_tries} compiles nothing; "
                     "allowed: >= 1")
  unknown = [n for n in FLAGS.configs if n not in CONFIGS]
  if unknown:
    raise ValueError(f"configs={','.join(unknown)} is unknown; allowed: "
                     f"{', '.join(CONFIGS)}")
  if FLAGS.topology:
    from moejax import aot
    for topology in FLAGS.topology:  # unknown names, no libtpu, no plan: now
      chip, devices = aot.topology_devices(topology)
      for name in FLAGS.configs:
        plan_window(plans(CONFIGS[name], len(devices), chip.hbm_bytes), name,
                    topology)
  rows = []
  for name in FLAGS.configs:
    row = count_row(name, CONFIGS[name])
    if FLAGS.compile:
      row.update(stand_in_compile(CONFIGS[name], row))
    rows.append(row)
  table = count_markdown(rows)
  print(table)
  result = {"configs": rows, "table": table}

  def save(result):
    if FLAGS.out:
      os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
      with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)

  tpu = []
  for path in FLAGS.tables_from:  # earlier runs' rows (e.g. one per slice)
    with open(path) as f:
      tpu += json.load(f).get("tpu", [])
  if FLAGS.topology or tpu:
    import jax
    result.update({"jax": jax.__version__, "full_depth": FLAGS.full_depth})
    tpu += topology_rows(
        FLAGS.configs, FLAGS.topology,
        save=lambda new: save({**result, "tpu": tpu + new}))
    tpu_table = topology_markdown(tpu)
    print(tpu_table)
    result.update({"tpu": tpu, "tpu_table": tpu_table})
    if FLAGS.markdown:
      os.makedirs(os.path.dirname(FLAGS.markdown) or ".", exist_ok=True)
      kept = kept_sections(FLAGS.markdown)
      with open(FLAGS.markdown, "w") as f:
        f.write(report_markdown(tpu, "python " + " ".join(sys.argv)) + kept)
      print(f"wrote {FLAGS.markdown}")
  save(result)
  if FLAGS.out:
    print(f"wrote {FLAGS.out}")


HELP_GROUPS = {"configs": ["configs", "out"],
               "stand-in compile": ["compile", "compile_layers"],
               "TPU ahead of time": ["topology", "full_depth", "max_tries",
                                     "first_plan", "markdown", "tables_from",
                                 "scan_layers"]}

if __name__ == "__main__":
  from moejax.cli import app as cli_app  # noqa: E402
  cli_app.run(main, __doc__, HELP_GROUPS)
