"""Attention implementations at the paper shapes on a TPU slice, ahead of time.

Each paper config's train step is compiled for the slice (libtpu, no TPU) with
`LMConfig.attention` = each of --attention, on the first plan of
experiments/reports/tpu_aot.json for that config and slice (its mesh, batch
per shard and remat), at one and two repeats of the block pattern, and the
numbers are extrapolated linearly to the full depth (as paper_configs.py
does). Per chip: XLA's temporaries and the HBM peak, XLA's FLOPs and bytes;
and, from the shapes, the attention matmuls' FLOPs, which XLA's cost model
does not see inside the splash kernel (a Pallas custom call).

  nice -n 10 python experiments/attention_aot.py --configs=paper_dtop_p \\
      --topology=v5p-64 --out=/tmp/attention_aot.json
  python experiments/attention_aot.py --tables_from=/tmp/a.json,/tmp/b.json \\
      --out=experiments/reports/attention_aot.json \\
      --markdown=experiments/reports/tpu_aot.md   # (re)writes its section

Axis legend: none (whole-step numbers per chip).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices: libtpu's

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import argparse  # noqa: E402

from peer_report import extrapolate  # noqa: E402

MARK = "## Attention implementations: splash against xla"


def plan_of(config: str, topology: str, plans_from: str) -> dict:
  """The first plan row of `config` on `topology` in `plans_from`."""
  with open(plans_from) as f:
    rows = [r for r in json.load(f)["tpu"]
            if r["config"] == config and r["topology"] == topology]
  if not rows:
    raise ValueError(f"configs={config} has no {topology} row in "
                     f"{plans_from}; allowed: configs with one")
  r = rows[0]
  return {"mesh": r["mesh"], "shard_batch": r["shard_batch"],
          "remat": r["remat"]}


def kernel_flops(model, batch_per_device: int, heads_per_device: int,
                 seq_len: int, block: int = 512) -> dict[str, float]:
  """Attention matmul FLOPs per device and step from the shapes.

  Per layer of T tokens (L, or C in a routed MoD block), with K the head
  width: one matmul over all query/key pairs is 2 B H T^2 K. "xla" computes
  every pair (the mask is applied after): forward 2 matmuls (QK^T, PV),
  backward 4 (dP, dV, dQ, dK). The splash kernel computes only the blocks
  at or below the diagonal, a fraction (n + 1) / 2n of them with n = T /
  block, forward 2 matmuls, backward 7 (its dQ and dKV kernels each recompute
  QK^T, and both recompute dP). Block remat adds one forward.
  """
  width = model.d_model // model.num_heads
  out = {"xla": 0.0, "splash": 0.0}
  for i in range(model.num_layers):
    tokens = (model.mod.num_selected(seq_len) if model.is_mod_layer(i)
              else seq_len)
    pair = 2.0 * batch_per_device * heads_per_device * tokens ** 2 * width
    n = max(1, -(-tokens // block))
    remat = 2 if model.remat != "none" else 0
    out["xla"] += pair * (2 + 4 + remat)
    out["splash"] += pair * (n + 1) / (2 * n) * (2 + 7 + remat)
  return out


def compile_row(config: str, impl: str, topology: str,
                plans_from: str) -> dict:
  """One config x implementation: the extrapolated report row."""
  from moejax import aot, configs, sharding
  plan = plan_of(config, topology, plans_from)
  entry = configs.REGISTRY[config]
  chip, devices = aot.topology_devices(topology)
  mesh = aot.topology_mesh(plan["mesh"], devices)
  sizes = sharding.parse_mesh(plan["mesh"], len(devices))
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  full = entry.config(batch_size=plan["shard_batch"] * shards,
                      remat=plan["remat"])
  full = dataclasses.replace(full, model=dataclasses.replace(
      full.model, attention=impl))
  depth = full.model.num_layers
  period = full.model.mod_every if full.model.mod is not None else 1
  reports, start = [], time.perf_counter()
  for shallow in (dataclasses.replace(full, model=dataclasses.replace(
      full.model, num_layers=d)) for d in (period, 2 * period)):
    report = aot.tpu_report(
        shallow, aot.lower_train_step(shallow, mesh).compile(), mesh, chip)
    reports.append(report)
    print(f"{config} {impl} depth {shallow.model.num_layers}: temp "
          f"{report['temp_bytes'] / 2**30:.2f} GiB, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
  seconds = time.perf_counter() - start
  report = extrapolate(reports[0], reports[1], period, 2 * period, depth)
  report["fits"] = report["hbm_peak_bytes"] <= chip.hbm_bytes
  heads = full.model.num_heads
  heads_dev = heads // sizes["model"] if heads % sizes["model"] == 0 else heads
  kernel = kernel_flops(full.model, plan["shard_batch"], heads_dev,
                        full.seq_len)
  import jax
  from importlib import metadata
  versions = (f"jax {jax.__version__}, libtpu "
              f"{metadata.version('libtpu')}")
  return {"config": config, "attention": impl, "topology": topology,
          "versions": versions,
          **plan, "layers": depth, "compiled_depths": [period, 2 * period],
          "compile_s": seconds, "attention_flops_from_shapes": kernel[impl],
          **{k: report[k] for k in ("params_bytes", "optimizer_bytes",
                                    "temp_bytes", "hbm_peak_bytes", "fits",
                                    "flops_per_device", "hbm_bytes_accessed")}}


def markdown(rows: list[dict], command: str) -> str:
  """The section: one line per config x implementation."""
  gib = lambda x: f"{x / 2**30:.1f}"
  lines = [
      MARK, "", f"`{command}`", "",
      "The same train steps with `--model.attention=splash` (the Pallas TPU "
      "splash kernel, `moejax.nn.attention.splash_attend`, per device in a "
      "`shard_map`) against `xla` (einsums around materialised scores "
      "`[B, H, L, T]` in the activation dtype, bfloat16 here), on each "
      "config's first plan above (jax and libtpu: the rows' `versions`), "
      "compiled "
      "at one and two repeats of the block pattern and extrapolated to the "
      "full depth. XLA's cost model does not see inside the splash kernel "
      "(a Pallas custom call): its FLOPs and bytes are missing from the "
      "`splash` rows' XLA columns, so the attention matmul FLOPs are also "
      "counted from the shapes (`kernel_flops`: `xla` computes every "
      "query/key pair, 6 matmuls forward + backward, 8 with block remat; "
      "splash only the causal blocks, about (n + 1) / 2n of them, 9 matmuls, "
      "11 with block remat, since its backward recomputes the scores).", "",
      "| config | attention | mesh | batch/shard | remat | temp GiB | "
      "HBM peak GiB | fits | XLA TFLOP/dev | XLA GB accessed/dev | "
      "attention TFLOP/dev (shapes) |",
      "| --- " * 11 + "|"]
  for r in rows:
    lines.append(
        f"| {r['config']} | {r['attention']} | {r['mesh']} | "
        f"{r['shard_batch']} | {'yes' if r['remat'] else 'no'} | "
        f"{gib(r['temp_bytes'])} | {gib(r['hbm_peak_bytes'])} | "
        f"{'yes' if r['fits'] else '**no**'} | "
        f"{r['flops_per_device'] / 1e12:.1f} | "
        f"{r['hbm_bytes_accessed'] / 1e9:.0f} | "
        f"{r['attention_flops_from_shapes'] / 1e12:.1f} |")
  by = {(r["config"], r["attention"]): r for r in rows}
  notes = []
  for (config, impl), r in by.items():
    base = by.get((config, "xla"))
    if impl != "xla" and base is None:
      notes.append(f"- {config}: {impl} only, its xla row is not compiled "
                   f"yet; {r.get('versions', '')}.")
    if impl == "xla" or base is None:
      continue
    diff = lambda key, unit=2**30: (r[key] - base[key]) / unit
    notes.append(
        f"- {config}, {impl} - xla per chip: temporaries "
        f"{diff('temp_bytes'):+.1f} GiB, HBM peak {diff('hbm_peak_bytes'):+.1f}"
        f" GiB, XLA FLOPs {diff('flops_per_device', 1e12):+.1f} TFLOP (the "
        f"attention matmuls leave XLA's count: {impl} computes "
        f"{r['attention_flops_from_shapes'] / 1e12:.1f} TFLOP of them in the "
        f"kernel, xla {base['attention_flops_from_shapes'] / 1e12:.1f}), XLA "
        f"bytes accessed {diff('hbm_bytes_accessed', 1e9):+.0f} GB (the "
        "kernel's own reads of q, k, v and writes of the output are not in "
        f"it); {r.get('versions', '')}.")
  from moejax import configs
  missing = [c for c in configs.PAPER_CONFIGS
             if c not in {r["config"] for r in rows}]
  if missing:
    notes.append(f"- Not compiled yet: {', '.join(missing)} (about 15-30 "
                 "minutes per config and implementation on a loaded 2-core "
                 "host).")
  compile_cmd = ("Each row: `nice -n 10 python experiments/attention_aot.py "
                 "--configs=CONFIG --attention=IMPL "
                 "--out=runs/aot/attention_CONFIG_IMPL.json`.")
  return "\n".join(lines + ["", compile_cmd, ""] + notes) + "\n"


def write_section(path: str, section: str) -> None:
  """Replaces the text from MARK to the end of `path` (or appends)."""
  with open(path) as f:
    text = f.read()
  head = text.split(MARK, 1)[0].rstrip("\n")
  with open(path, "w") as f:
    f.write(head + "\n\n" + section)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="paper_dtop_p,paper_mod",
                      help="paper configs, comma-separated")
  parser.add_argument("--attention", default="splash,xla",
                      help="implementations compiled, comma-separated")
  parser.add_argument("--topology", default="v5p-64", help="TPU slice")
  parser.add_argument("--plans_from",
                      default="experiments/reports/tpu_aot.json",
                      help="report whose first row per config and slice "
                      "gives the plan (mesh, batch per shard, remat)")
  parser.add_argument("--tables_from", default="",
                      help="earlier outputs whose rows join (no compiles)")
  parser.add_argument("--out", default="", help="JSON output path")
  parser.add_argument("--markdown", default="", help="markdown file whose "
                      "attention section (from MARK to the end) is written")
  args = parser.parse_args(argv)
  rows = []
  for path in filter(None, args.tables_from.split(",")):
    with open(path) as f:
      rows += json.load(f)["rows"]
  for config in [] if rows else args.configs.split(","):
    for impl in args.attention.split(","):
      rows.append(compile_row(config, impl, args.topology, args.plans_from))
      if args.out:
        with open(args.out, "w") as f:
          json.dump({"rows": rows}, f, indent=2)
  section = markdown(rows, "python " + " ".join(sys.argv))
  print(section)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows}, f, indent=2)
  if args.markdown:
    write_section(args.markdown, section)
  return 0


if __name__ == "__main__":
  sys.exit(main())
