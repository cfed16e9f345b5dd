"""The MaxText side by side's rows and report: compiles extrapolated over
depth, the markdown tables, the report around them.

Axis legend:
  L  layers (depth)
"""
from __future__ import annotations

import json

from peer_shapes import REMAT, SHAPES, spec_key



# Rows of an earlier run of the same comparison (MaxText 0.2.5 on jax
# 0.12.0.1 + libtpu 0.0.50.1, the settings above; moejax on jax 0.10.2 +
# libtpu 0.0.42.1, before FSDP, chunked loss and "recompute_attention"),
# shown where this run did not compile the row: (library, path, remat) ->
# params + opt GiB, temp GiB, peak GiB, TFLOP, bytes accessed GiB, step ms.
EARLIER = {
    ("maxtext", "capacity", "full"): (9.67, 9.4, 19.1, 328.2, 3447, 1339),
    ("maxtext", "capacity", "none"): (9.67, 68.1, 77.8, 259.7, 3115, 1210),
    ("maxtext", "megablox (dropless)", "full"): (9.67, 233.8, 243.5, 908.9,
                                                  11484, 4460),
    ("moejax", "top_k, data:4,expert:8", "full"): (14.31, 12.6, 26.9, 195.8,
                                                   1815, 705),
    ("moejax", "top_k, data:4,expert:8", "none"): (14.31, 100.6, 114.9,
                                                   149.4, 1304, 506),
}


def extrapolate(a, b, da: int, db: int, depth: int):
  """Numbers of `a` (depth da) and `b` (depth db) extended linearly."""
  if isinstance(b, dict):
    return {k: extrapolate(a.get(k) if isinstance(a, dict) else None, v, da,
                            db, depth) for k, v in b.items()}
  if isinstance(b, (int, float)) and not isinstance(b, bool) and isinstance(
      a, (int, float)):
    return b + (b - a) * (depth - db) / (db - da)
  return b


def row_of(compiles: dict[str, dict], first: dict,
           depths: list[int]) -> dict:
  """One table row from its compiles at `depths` (one depth: that depth's
  numbers, not extrapolated)."""
  from moejax import aot
  shape = SHAPES[first["shape"]]
  depths = sorted(int(d) for d in depths)
  got = [compiles.get(spec_key({**first, "depth": d})) for d in depths]
  base = {k: first[k] for k in ("library", "topology", "shape", "remat",
                                "variant", "data", "expert", "loss_chunk",
                                "strategy") if k in first}
  if got[0] is not None and got[0]["ok"] and (any(g is None for g in got) or
                                             len(depths) == 1):
    one = got[0]
    return {**base, "status": f"only {depths[0]} layer compiled",
            "error": f"at {depths[0]} layer: params + opt "
                     f"{one['state_bytes'] / 2**30:.2f}, temp "
                     f"{one['temp_bytes'] / 2**30:.2f}, peak "
                     f"{one['peak_bytes'] / 2**30:.2f} GiB, "
                     f"{one['flops'] / 1e12:.1f} TFLOP, "
                     f"{one['bytes_accessed'] / 2**30:.0f} GiB accessed"}
  if any(g is None for g in got):
    return {**base, "status": "not compiled"}
  bad = [g for g in got if not g["ok"]]
  if bad:
    return {**base, "status": "failed", "error": bad[0]["error"][:300]}
  a, b = got[0], got[-1]
  keys = ("state_bytes", "temp_bytes", "peak_bytes", "flops",
          "bytes_accessed", "ici_traffic_bytes", "model_flops")
  full = extrapolate({k: a[k] for k in keys}, {k: b[k] for k in keys},
                      depths[0], depths[-1], shape.layers)
  memory = "extrapolated"
  scanned = compiles.get(spec_key({**first, "depth": shape.layers,
                                   "scan": True}))
  if scanned is not None and scanned["ok"]:
    # the scanned full-depth compile's memory is the program's own (its
    # FLOPs and bytes count the loop body once: those stay extrapolated)
    for k in ("temp_bytes", "peak_bytes"):
      full["extrapolated_" + k] = full[k]
      full[k] = scanned[k]
    memory = "scanned"
  chip = aot.CHIPS[aot.TOPOLOGIES[first["topology"]][0]]
  est = aot.estimate_step(full["flops"], full["bytes_accessed"],
                          full["ici_traffic_bytes"], full["model_flops"], chip)
  return {**base, "status": "ok", "mesh": b["mesh"], **full, "memory": memory,
          "fits": full["peak_bytes"] <= chip.hbm_bytes,
          "hbm_capacity_bytes": chip.hbm_bytes, "estimate": est,
          "compile_s": sum(g["compile_s"] for g in got),
          "versions": b["versions"], "depths": depths,
          "per_layer": {k: b[k] - a[k] for k in keys}}


def scan_mark(row: dict) -> str:
  """" (s)" after a peak from the scanned full-depth compile, with the
  extrapolated one beside it."""
  if row.get("memory") != "scanned":
    return ""
  return f" (s; extrapolated {row['extrapolated_peak_bytes'] / 2**30:.2f})"


def markdown_table(rows: list[dict]) -> str:
  """One line per row of this run (v5p-64 and any other slice)."""
  gib = lambda x: f"{x / 2**30:.2f}"
  lines = ["| slice (shape if not paper) | library | layout | remat | "
           "params + opt GiB | temp GiB "
           "| peak GiB | fits | TFLOP | bytes accessed GiB | ICI GiB | "
           "est. step ms (compute / HBM / ICI) |",
           "| --- " * 12 + "|"]
  for r in rows:
    layout = r.get("mesh", r["variant"])
    if r["library"] == "moejax" and r.get("loss_chunk"):
      layout += f", loss_chunk {r['loss_chunk']}"
    if r["library"] == "moejax" and r.get("strategy"):
      layout += f", strategy {r['strategy']}"
    if r.get("depths", [1, 2]) != [1, 2]:
      layout += ", from {} layers".format(" and ".join(map(str, r["depths"])))
    policy = REMAT[r["remat"]][0 if r["library"] == "maxtext" else 1]
    shape = "" if r.get("shape", "paper") == "paper" else f", {r['shape']}"
    head = (f"| {r['topology']}{shape} | {r['library']} | {layout} | "
            f"{r['remat']} ({policy}) |")
    if r["status"] != "ok":
      lines.append(head + f" {r['status']}: {r.get('error', '')[:160]} |" +
                   " - |" * 7)
      continue
    e = r["estimate"]
    lines.append(
        head + f" {gib(r['state_bytes'])} | {gib(r['temp_bytes'])} | "
        f"{gib(r['peak_bytes'])}{scan_mark(r)} | "
        f"{'yes' if r['fits'] else '**no**'} | "
        f"{r['flops'] / 1e12:.1f} | {r['bytes_accessed'] / 2**30:.0f} | "
        f"{r['ici_traffic_bytes'] / 2**30:.1f} | {e['step_s'] * 1e3:.0f} "
        f"({e['compute_s'] * 1e3:.0f} / {e['hbm_s'] * 1e3:.0f} / "
        f"{e['ici_s'] * 1e3:.0f}) |")
  return "\n".join(lines)


def earlier_table() -> str:
  lines = ["| library | path | remat | params + opt GiB | temp GiB | peak GiB "
           "| TFLOP | bytes accessed GiB | est. step ms |",
           "| --- " * 9 + "|"]
  for (library, path, remat), v in EARLIER.items():
    lines.append(f"| {library} | {path} | {remat} | " +
                 " | ".join(f"{x:g}" for x in v) + " |")
  return "\n".join(lines)


def top_ops_markdown(compiles: dict[str, dict], key: str,
                     n: int = 15) -> str:
  """The `n` largest instructions of one compile by bytes touched."""
  c = compiles.get(key)
  if not c or not c.get("ok"):
    return f"(`{key}` not compiled)"
  lines = [f"`{key}`:", "", "| GiB | opcode | result | source (op_name) |",
           "| --- | --- | --- | --- |"]
  for op in c["top_ops"][:n]:
    lines.append(f"| {op['bytes'] / 2**30:.2f} | {op['opcode']} | "
                 f"{op['result'][:70]} | {op['op_name'][-80:]} |")
  return "\n".join(lines)


NOTES_MARK = "<!-- notes: kept when the script rewrites the report -->"

SETUP = """\
    ~/.pyenv/versions/3.12.1/bin/python -m venv ~/venv-maxtext
    ~/venv-maxtext/bin/pip install maxtext==0.2.5 'jax[tpu]==0.12.0.1' \\
        libtpu==0.0.50.1
    # MaxText's wheel pulls in jax alone; its train step imports these
    # (jax, jaxlib and libtpu pinned by a constraints file):
    ~/venv-maxtext/bin/pip install -c constraints.txt absl-py flax optax \\
        orbax-checkpoint chex omegaconf pydantic pyyaml ml-collections \\
        tensorboardx tensorboard-plugin-profile etils jaxtyping einshape \\
        qwix aqtp drjax tokamax pathwaysutils tiktoken sentencepiece \\
        transformers tabulate psutil grain cloud-accelerator-diagnostics \\
        ml-goodput-measurement google-cloud-storage jsonlines jinja2 pillow \\
        sympy
    # constraints.txt: jax==0.12.0.1 jaxlib==0.12.0.1 libtpu==0.0.50.1
    # moejax itself imports on this jax (flax 0.12.12, optax 0.2.8); run with
    # the repository on PYTHONPATH."""


def report_markdown(result: dict, command: str, notes: str, shape_name: str,
                    depths: list[str]) -> str:
  """The whole report: set-up, this run's table, the earlier run's, the
  largest instructions, the MaxText environment, then `notes`."""
  from moejax import aot
  shape = SHAPES[shape_name]
  compiles = result["compiles"]
  versions = sorted({json.dumps(c.get("versions", {}), sort_keys=True)
                     for c in compiles.values() if c.get("ok")})
  # the largest instructions of the rows' one-layer compiles (both
  # libraries, full remat and none, the first slice and shape of the rows)
  first = next((r for r in result["rows"] if r["status"] == "ok"), None)
  tops = [spec_key({**r, "depth": 1, "scan": False})
          for r in result["rows"] if first and r["status"] == "ok" and
          r["remat"] in ("full", "none") and
          (r["topology"], r["shape"]) == (first["topology"], first["shape"])]
  tops = sorted({k for k in tops if k in compiles},
                key=lambda k: (not k.startswith("moejax/"), k))
  chips = "\n".join(
      f"| {c.name} | {c.peak_flops / 1e12:.0f} | {c.hbm_bytes / 2**30:.0f} "
      f"| {c.hbm_bandwidth / 1e9:.0f} | {c.ici_bandwidth / 1e9:.0f} |"
      for c in aot.CHIPS.values())
  return f"""# moejax and MaxText compiled for the same TPU slice

`{command}`

Both libraries' full train step (forward, backward, AdamW) compiled by
XLA:TPU ahead of time for the devices of a TPU slice
(`jax.experimental.topologies`, libtpu, no TPU attached), in one Python
environment, so both use the same jax and libtpu. Shape
{shape.name}: {shape.layers} layers, D
{shape.d_model}, {shape.heads} heads,
{shape.experts} experts x {shape.expert_width},
top-{shape.top_k}, vocab {shape.vocab},
{shape.batch} sequences x {shape.seq_len} tokens,
bf16 activations, float32 params and AdamW state, capacity factor
{shape.capacity_factor}.

- MaxText 0.2.5: `mixtral` decoder block (MoE in every layer),
  `attention=dot_product`, `scan_layers=false`, capacity path
  (`sparse_matmul=false`, `megablox=false`); layouts `ep` = mesh
  `ici_data_parallelism` x `ici_expert_parallelism`, `fsdp` =
  `ici_fsdp_parallelism` x `ici_expert_parallelism` (all weights and
  optimizer state sharded); its `remat_policy` is set back to the string
  after parsing (`none` on the command line parses to None, which its
  unrolled decoder treats as full remat). Remat settings: full = `full`,
  selective* = `minimal` (saves the q / k / v / out projections and the
  expert up-projections and outputs, recomputes attention, dispatch and
  activation), none = `none`.
- moejax: the registry config (`{shape.moejax_config}`) with
  `top_k` routing, GSPMD expert parallelism; layouts `ep` =
  data x expert, `fsdp` = fsdp x expert (params and AdamW state sharded over
  `fsdp` too); `LMConfig.loss_chunk` (chunked cross-entropy); remat
  (`LMConfig.remat`): full = `block` (every block);
  selective_matmuls = `save_matmuls` (block remat keeping what MaxText's
  `minimal` keeps: the unbatched matmul outputs, i.e. q / k / v / out
  projections and router logits, and the expert up-projections and
  outputs); selective_dots = `save_dots` (block remat keeping the unbatched
  matmul outputs only); selective = `recompute_attention` (no block remat:
  everything kept but the attention scores and probabilities);
  selective_moe = `save_moe_operands` (that, and the MoE layer keeps only
  its expert matmuls' operands); none; `strategy` where a row names its
  capacity strategy (else the config's).
- Depth: each row compiled at {" and ".join(depths)} layers, each
  compile in its own process, and extrapolated linearly to the full depth.
  A peak marked (s) is the program's own: the row's full-depth compile with
  its layers scanned (MaxText `scan_layers=true`, moejax
  `LMConfig.scan_layers`; `--scan_peak`), whose FLOPs and bytes XLA counts
  once per loop body, so those stay extrapolated. Without remat a scan
  keeps every residual of its body stacked (MaxText's scanned no-remat is
  compiled with the policy "save everything"), more than the unrolled
  program keeps: no-remat rows use the extrapolated peak.
- Per chip: params + opt from the state's shard shapes; temp = XLA's
  temporaries; peak = arguments + temporaries + outputs not aliased to the
  donated state; FLOPs and bytes accessed from XLA's cost analysis;
  collectives (ICI) from the compiled HLO (`moejax.aot.hlo_collectives`).
- Step estimate, roofline: max(FLOPs / peak, bytes accessed / HBM
  bandwidth, ICI traffic / ICI bandwidth) (`moejax.aot.estimate_step`).

| chip | peak bf16 TFLOP/s | HBM GiB | HBM GB/s | ICI GB/s |
| --- | --- | --- | --- | --- |
{chips}

Versions of the compiles in this report: {"; ".join(versions)}.

## This run

{markdown_table(result["rows"])}

## The earlier run (rows this run did not compile)

{earlier_table()}

## Largest HLO instructions by bytes (one layer)

Per compiled instruction of the scheduled program (fusion bodies not listed
separately): the bytes of its result and operands as printed in the HLO,
the closest per-op reading of XLA's `bytes accessed`.

{chr(10).join(top_ops_markdown(compiles, k) + chr(10) for k in tops)}

## Set-up of the MaxText environment

{SETUP}

{NOTES_MARK}
{notes}"""
