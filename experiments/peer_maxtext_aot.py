"""moejax and MaxText compiled ahead of time for the same TPU slice, mesh,
shape and batch: per-chip memory, XLA's FLOPs and bytes, and a roofline step.

Axis legend:
  L  layers (depth)
  E  experts
  D  model width

Run from a Python 3.12 virtual environment that has MaxText from PyPI (a peer
to measure against, never a dependency of moejax; the set-up is in
experiments/reports/tpu_peer.md), with this repository on PYTHONPATH, so that
both libraries compile with the same jax and libtpu:

  PYTHONPATH=. /work/venv-maxtext/bin/python experiments/peer_maxtext_aot.py \
      --topology=v5p-64 --remat=full,selective,none \
      --out=experiments/reports/tpu_peer.json \
      --markdown=experiments/reports/tpu_peer.md

Each row is one (library, slice, mesh, remat) compiled at 1 and 2 layers
(each compile in its own process, niced) and extrapolated linearly to the
shape's depth (the blocks are identical; MaxText with `scan_layers=false`, so
XLA counts every layer). Compiles are cached in the JSON (`compiles`, keyed by
their spec): a rerun compiles only what is missing (`--recompile` to redo).

The roofline, per chip: step = max(XLA FLOPs / peak FLOP/s, XLA bytes
accessed / HBM bandwidth, ICI traffic / ICI bandwidth) (`moejax.aot`).

MaxText settings for a like-for-like compare: its `mixtral` decoder block
(MoE in every layer), `attention=dot_product` (its default flash kernel is a
custom call XLA does not count), `scan_layers=false`, the capacity path
(`sparse_matmul=false`, `megablox=false`, `capacity_factor`), no dropout.
`remat_policy=none` on MaxText's command line is parsed to None, which its
unrolled decoder treats as full remat: the string is set back after parsing.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined when it runs, not when a test imports it:
  another module loaded into the same process may own `--out`)."""
  flags.DEFINE_list("libraries", ["maxtext", "moejax"], "maxtext, moejax.")
  flags.DEFINE_list("topology", ["v5p-64"], "TPU slices (moejax.aot.TOPOLOGIES).")
  flags.DEFINE_list("remat", ["full", "none"], "Remat settings: full, "
                    "selective, none (REMAT maps each to both libraries).")
  flags.DEFINE_string("shape", "paper", "Model shape: " + ", ".join(
      ("paper", "mixtral")))
  flags.DEFINE_list("moejax_variants", ["ep"], "moejax layouts (VARIANTS).")
  flags.DEFINE_integer("loss_chunk", 256, "moejax LMConfig.loss_chunk (0 = "
                       "the plain cross-entropy).")
  flags.DEFINE_list("depths", ["1", "2"], "Compiled depths (extrapolated).")
  flags.DEFINE_string("out", "experiments/reports/tpu_peer.json", "JSON path.")
  flags.DEFINE_string("markdown", "", "Markdown report path ('' = none).")
  flags.DEFINE_bool("recompile", False, "Compile again what the JSON has.")
  flags.DEFINE_bool("compile", True, "Compile what the JSON lacks (False: "
                    "write the report from the JSON's compiles alone).")
  flags.DEFINE_integer("nice", 10, "Niceness of the compile processes.")
  flags.DEFINE_integer("top_ops", 25, "Largest HLO instructions kept per "
                       "compile (by bytes accessed).")
  flags.DEFINE_string("one", "", "Internal: compile one spec (JSON) and print "
                      "its result as the last line.")


@dataclasses.dataclass(frozen=True)
class Shape:
  """A decoder-only MoE LM shape both libraries build.

  Attributes: layers, d_model, heads (head width d_model / heads), experts E,
  expert_width, top_k, vocab, seq_len, batch (global sequences),
  capacity_factor, moejax_config (the registry name whose builder moejax
  uses, with top-k routing swapped in).
  """
  name: str
  layers: int
  d_model: int
  heads: int
  experts: int
  expert_width: int
  top_k: int
  vocab: int
  seq_len: int
  batch: int
  capacity_factor: float
  moejax_config: str


SHAPES = {
    "paper": Shape("paper (6.9B, DTop-p-like)", 16, 2048, 16, 64, 1024, 8,
                   50304, 2048, 256, 1.25, "paper_dtop_p"),
    "mixtral": Shape("mixtral (8x7B-like, MHA)", 32, 4096, 32, 8, 14336, 2,
                     32000, 2048, 64, 1.25, "mixtral_8x7b"),
}

# remat setting -> (MaxText remat_policy, moejax LMConfig.remat).
REMAT = {"full": ("full", "block"), "selective": ("minimal", "recompute_attention"),
         "none": ("none", "none")}

# moejax layouts: (mesh on a slice of n chips with E experts, fields).
VARIANTS = {
    "ep": "data:{data},expert:{expert},model:1",
    "fsdp": "fsdp:{data},expert:{expert},model:1",
}


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


def _expert_axis(shape: Shape, chips: int) -> int:
  return min(shape.experts, 8, chips)


def specs(topology: str, chips: int) -> list[dict]:
  """Compile specs of every row (library x remat x variant) x depth."""
  shape = SHAPES[FLAGS.shape]
  expert = _expert_axis(shape, chips)
  data = chips // expert
  out = []
  for remat in FLAGS.remat:
    for library in FLAGS.libraries:
      variants = FLAGS.moejax_variants if library == "moejax" else ["ep"]
      for variant in variants:
        for depth in FLAGS.depths:
          spec = {"library": library, "topology": topology,
                  "shape": FLAGS.shape, "remat": remat, "variant": variant,
                  "data": data, "expert": expert, "depth": int(depth)}
          if library == "moejax":
            spec["loss_chunk"] = FLAGS.loss_chunk
          out.append(spec)
  return out


def spec_key(spec: dict) -> str:
  key = ("{library}/{topology}/{shape}/{variant}/data{data}xexpert{expert}/"
         "remat={remat}".format(**spec))
  if spec.get("loss_chunk"):
    key += f"/loss_chunk={spec['loss_chunk']}"
  return key + f"/L{spec['depth']}"


# ----------------------------------------------------------------------------
# Reading a compiled step (both libraries).

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s([a-z][\w-]*)\((.*)$")


def _bytes(text: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) *
             _DTYPE_BYTES[dt] for dt, dims in _SHAPE.findall(text))


def largest_instructions(hlo: str, top: int) -> list[dict]:
  """The `top` instructions of the scheduled computations (not fusion
  bodies) by bytes touched: result + operand shapes as printed in the HLO
  text (an estimate of what XLA's `bytes accessed` counts per op)."""
  fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo))
  rows, skip = [], False
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      skip = head.group(1) in fused
      continue
    if skip:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, result, opcode, rest = m.groups()
    if opcode in ("parameter", "constant", "get-tuple-element", "tuple",
                  "bitcast"):
      continue
    args = rest.split("), ")[0] if "), " in rest else rest
    source = re.search(r'op_name="([^"]*)"', line)
    rows.append({"name": name, "opcode": opcode,
                 "bytes": _bytes(result) + _bytes(args),
                 "result": " ".join(f"{d}[{s}]" for d, s in
                                    _SHAPE.findall(result))[:120],
                 "op_name": source.group(1)[-160:] if source else ""})
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:top]


def _shard_bytes(leaves) -> int:
  import numpy as np
  total = 0
  for x in leaves:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      continue
    try:
      itemsize = np.dtype(x.dtype).itemsize
    except TypeError:  # PRNG key arrays (a few bytes)
      continue
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    total += math.prod(shape) * itemsize
  return total


def summarize(compiled, chip, devices: int, state_bytes: int,
              model_flops: float) -> dict:
  """Memory, cost, collectives and roofline of one compiled step."""
  from moejax import aot
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  hlo = compiled.as_text()
  coll = aot.hlo_collectives(hlo)
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes +
          mem.output_size_in_bytes - mem.alias_size_in_bytes)
  traffic = sum(c["traffic"] for c in coll.values())
  flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  return {"state_bytes": int(state_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "peak_bytes": int(peak), "flops": flops,
          "bytes_accessed": accessed, "ici_traffic_bytes": traffic,
          "model_flops": model_flops, "collectives": coll,
          "top_ops": largest_instructions(hlo, FLAGS.top_ops),
          "estimate": aot.estimate_step(flops, accessed, traffic,
                                        model_flops, chip)}


def _versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("jax", "jaxlib", "libtpu", "flax", "maxtext"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


# ----------------------------------------------------------------------------
# moejax


def moejax_config(spec: dict):
  """The moejax TrainConfig of a spec: the shape's registry config with
  top-k routing, the spec's depth, batch and remat."""
  from moejax import configs, routing
  shape = SHAPES[spec["shape"]]
  cfg = configs.get(shape.moejax_config, batch_size=shape.batch,
                    num_layers=spec["depth"],
                    remat=REMAT[spec["remat"]][1])
  if spec.get("loss_chunk"):
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss_chunk=spec["loss_chunk"]))
  moe = dataclasses.replace(cfg.model.moe, router=routing.build(
      "top_k", {"k": shape.top_k}), capacity_factor=shape.capacity_factor)
  model = dataclasses.replace(cfg.model, moe=moe)
  return dataclasses.replace(cfg, model=model, seq_len=shape.seq_len)


def compile_moejax(spec: dict) -> dict:
  from moejax import aot
  from moejax import flops as flops_lib
  cfg = moejax_config(spec)
  chip, devices = aot.topology_devices(spec["topology"])
  mesh_spec = VARIANTS[spec["variant"]].format(**spec)
  mesh = aot.topology_mesh(mesh_spec, devices)
  t0 = time.perf_counter()
  compiled = aot.lower_train_step(cfg, mesh).compile()
  seconds = time.perf_counter() - t0
  state = aot.state_bytes(cfg, mesh)
  model_flops = flops_lib.train_flops(cfg.model, cfg.batch_size,
                                      cfg.seq_len) / len(devices)
  return {"mesh": mesh_spec, "compile_s": seconds,
          **summarize(compiled, chip, len(devices),
                      state["params_bytes"] + state["optimizer_bytes"],
                      model_flops)}


# ----------------------------------------------------------------------------
# MaxText


def maxtext_argv(spec: dict) -> list[str]:
  """MaxText's command line for a spec (base.yml + overrides)."""
  import maxtext
  shape = SHAPES[spec["shape"]]
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs",
                      "base.yml")
  chips = spec["data"] * spec["expert"]
  head = shape.d_model // shape.heads
  policy = REMAT[spec["remat"]][0]
  return [sys.argv[0], base,
          "run_name=peer", "base_output_directory=/tmp/peer_maxtext",
          f"compile_topology={spec['topology']}",
          "compile_topology_num_slices=1",
          "decoder_block=mixtral", "model_name=default",
          f"base_emb_dim={shape.d_model}",
          f"base_num_query_heads={shape.heads}",
          f"base_num_kv_heads={shape.heads}", f"head_dim={head}",
          f"base_mlp_dim={shape.expert_width}",
          f"base_moe_mlp_dim={shape.expert_width}",
          f"base_num_decoder_layers={spec['depth']}",
          f"num_experts={shape.experts}",
          f"num_experts_per_tok={shape.top_k}",
          f"vocab_size={shape.vocab}", f"max_target_length={shape.seq_len}",
          f"per_device_batch_size={shape.batch / chips:g}",
          "dtype=bfloat16", "weight_dtype=float32",
          "attention=dot_product", "scan_layers=false",
          "sparse_matmul=false", "megablox=false",
          f"capacity_factor={shape.capacity_factor}",
          f"remat_policy={policy}", "enable_dropout=false",
          "enable_checkpointing=false", "dataset_type=synthetic",
          "logits_via_embedding=false", "opt_type=adamw",
          "ici_fsdp_parallelism=1", f"ici_data_parallelism={spec['data']}",
          f"ici_expert_parallelism={spec['expert']}",
          "ici_tensor_parallelism=1"]


def compile_maxtext(spec: dict) -> dict:
  import jax
  from flax.core.spmd import logical_axis_rules as axis_rules
  from maxtext.configs import pyconfig
  from maxtext.trainers.pre_train import train, train_compile
  from maxtext.utils import maxtext_utils, sharding
  from moejax import aot

  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  os.environ["LIBTPU_INIT_ARGS"] = (
      os.environ.get("LIBTPU_INIT_ARGS", "") +
      " --xla_tpu_spmd_rng_bit_generator_unsafe=true")
  config = pyconfig.initialize(maxtext_argv(spec))
  policy = REMAT[spec["remat"]][0]
  if config.remat_policy != policy:
    # "none" parses to None, which the unrolled decoder treats as full remat.
    object.__getattribute__(config, "_flat_config")["remat_policy"] = policy
  train_compile.validate_config(config)
  mesh = train_compile.get_topology_mesh(config)
  (args, kwargs, state_shardings, _, model) = train_compile.get_shaped_inputs(
      mesh, config)
  params_shardings, state_shardings = (
      sharding.maybe_update_params_sharding_with_opt(config, state_shardings))
  in_state = sharding.build_zero1_input_state_mesh_shardings(
      config, state_shardings, params_shardings)
  data_sharding = sharding.get_input_data_sharding(config, mesh)
  fn, in_shard, out_shard, static, donate = (
      maxtext_utils.get_functional_train_with_signature(
          train.train_step, data_sharding, in_state, model, config,
          params_shardings))
  t0 = time.perf_counter()
  compiled = train_compile.jit_and_compile(
      fn, args, kwargs, mesh, in_shard, out_shard, static, donate, config,
      axis_rules(config.logical_axis_rules))
  seconds = time.perf_counter() - t0
  chip_name = aot.TOPOLOGIES[spec["topology"]][0]
  chip = aot.CHIPS[chip_name]
  state_leaves = jax.tree.leaves(args[0])
  shard_leaves = jax.tree.leaves(in_state)
  if len(state_leaves) == len(shard_leaves):
    state_leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                    for x, s in zip(state_leaves, shard_leaves)]
  model_flops = _model_flops(spec) / mesh.devices.size
  return {"mesh": f"data:{spec['data']},expert:{spec['expert']}",
          "compile_s": seconds,
          **summarize(compiled, chip, mesh.devices.size,
                      _shard_bytes(state_leaves), model_flops)}


def _model_flops(spec: dict) -> float:
  """moejax's model FLOPs of the same shape at the spec's depth (the
  MoE FLOPs of the active experts, 3 x forward), for an MFU on one scale."""
  from moejax import flops as flops_lib
  cfg = moejax_config(spec)
  return flops_lib.train_flops(cfg.model, cfg.batch_size, cfg.seq_len)


def compile_one(spec: dict) -> dict:
  t0 = time.perf_counter()
  fn = compile_maxtext if spec["library"] == "maxtext" else compile_moejax
  try:
    out = {"ok": True, **fn(spec)}
  except Exception as e:  # noqa: BLE001 - a spec that does not compile
    out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
  return {**out, "wall_s": time.perf_counter() - t0, "versions": _versions()}


# ----------------------------------------------------------------------------
# Rows: extrapolation over depth, table.


def _extrapolate(a, b, da: int, db: int, depth: int):
  """Numbers of `a` (depth da) and `b` (depth db) extended linearly."""
  if isinstance(b, dict):
    return {k: _extrapolate(a.get(k) if isinstance(a, dict) else None, v, da,
                            db, depth) for k, v in b.items()}
  if isinstance(b, (int, float)) and not isinstance(b, bool) and isinstance(
      a, (int, float)):
    return b + (b - a) * (depth - db) / (db - da)
  return b


def row_of(compiles: dict[str, dict], first: dict) -> dict:
  """One table row from its compiles at the flag depths."""
  from moejax import aot
  shape = SHAPES[first["shape"]]
  depths = sorted(int(d) for d in FLAGS.depths)
  got = [compiles.get(spec_key({**first, "depth": d})) for d in depths]
  base = {k: first[k] for k in ("library", "topology", "shape", "remat",
                                "variant", "data", "expert", "loss_chunk")
          if k in first}
  if got[0] is not None and got[0]["ok"] and any(g is None for g in got):
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
  full = _extrapolate({k: a[k] for k in keys}, {k: b[k] for k in keys},
                      depths[0], depths[-1], shape.layers)
  chip = aot.CHIPS[aot.TOPOLOGIES[first["topology"]][0]]
  est = aot.estimate_step(full["flops"], full["bytes_accessed"],
                          full["ici_traffic_bytes"], full["model_flops"], chip)
  return {**base, "status": "ok", "mesh": b["mesh"], **full,
          "fits": full["peak_bytes"] <= chip.hbm_bytes,
          "hbm_capacity_bytes": chip.hbm_bytes, "estimate": est,
          "compile_s": sum(g["compile_s"] for g in got),
          "versions": b["versions"],
          "per_layer": {k: b[k] - a[k] for k in keys}}


def markdown_table(rows: list[dict]) -> str:
  """One line per row of this run (v5p-64 and any other slice)."""
  gib = lambda x: f"{x / 2**30:.2f}"
  lines = ["| slice | library | layout | remat | params + opt GiB | temp GiB "
           "| peak GiB | fits | TFLOP | bytes accessed GiB | ICI GiB | "
           "est. step ms (compute / HBM / ICI) |",
           "| --- " * 12 + "|"]
  for r in rows:
    layout = r.get("mesh", r["variant"])
    if r["library"] == "moejax" and r.get("loss_chunk"):
      layout += f", loss_chunk {r['loss_chunk']}"
    policy = REMAT[r["remat"]][0 if r["library"] == "maxtext" else 1]
    head = (f"| {r['topology']} | {r['library']} | {layout} | {r['remat']} "
            f"({policy}) |")
    if r["status"] != "ok":
      lines.append(head + f" {r['status']}: {r.get('error', '')[:160]} |" +
                   " - |" * 7)
      continue
    e = r["estimate"]
    lines.append(
        head + f" {gib(r['state_bytes'])} | {gib(r['temp_bytes'])} | "
        f"{gib(r['peak_bytes'])} | {'yes' if r['fits'] else '**no**'} | "
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


def top_ops_markdown(compiles: dict[str, dict], key: str, n: int = 15) -> str:
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
    ~/.pyenv/versions/3.12.1/bin/python -m venv /work/venv-maxtext
    /work/venv-maxtext/bin/pip install maxtext==0.2.5 'jax[tpu]==0.12.0.1' \\
        libtpu==0.0.50.1
    # MaxText's wheel pulls in jax alone; its train step imports these
    # (jax, jaxlib and libtpu pinned by a constraints file):
    /work/venv-maxtext/bin/pip install -c constraints.txt absl-py flax optax \\
        orbax-checkpoint chex omegaconf pydantic pyyaml ml-collections \\
        tensorboardx tensorboard-plugin-profile etils jaxtyping einshape \\
        qwix aqtp drjax tokamax pathwaysutils tiktoken sentencepiece \\
        transformers tabulate psutil grain cloud-accelerator-diagnostics \\
        ml-goodput-measurement google-cloud-storage jsonlines jinja2 pillow \\
        sympy
    # constraints.txt: jax==0.12.0.1 jaxlib==0.12.0.1 libtpu==0.0.50.1
    # moejax itself imports on this jax (flax 0.12.12, optax 0.2.8); run with
    # the repository on PYTHONPATH."""


def report_markdown(result: dict, command: str, notes: str) -> str:
  from moejax import aot
  compiles = result["compiles"]
  versions = sorted({json.dumps(c.get("versions", {}), sort_keys=True)
                     for c in compiles.values() if c.get("ok")})
  tops = [k for k in compiles if k.startswith("moejax/") and
          k.endswith("/L1")]
  maxtext_tops = [k for k in compiles if k.startswith("maxtext/") and
                  k.endswith("/L1")]
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
{SHAPES[FLAGS.shape].name}: {SHAPES[FLAGS.shape].layers} layers, D
{SHAPES[FLAGS.shape].d_model}, {SHAPES[FLAGS.shape].heads} heads,
{SHAPES[FLAGS.shape].experts} experts x {SHAPES[FLAGS.shape].expert_width},
top-{SHAPES[FLAGS.shape].top_k}, vocab {SHAPES[FLAGS.shape].vocab},
{SHAPES[FLAGS.shape].batch} sequences x {SHAPES[FLAGS.shape].seq_len} tokens,
bf16 activations, float32 params and AdamW state, capacity factor
{SHAPES[FLAGS.shape].capacity_factor}.

- MaxText 0.2.5: `mixtral` decoder block (MoE in every layer),
  `attention=dot_product`, `scan_layers=false`, capacity path
  (`sparse_matmul=false`, `megablox=false`), mesh `ici_data_parallelism` x
  `ici_expert_parallelism`; its `remat_policy` is set back to the string
  after parsing (`none` on the command line parses to None, which its
  unrolled decoder treats as full remat). Remat settings: full = `full`,
  selective = `minimal` (saves the projections and MLP matmul outputs,
  recomputes attention), none = `none`.
- moejax: the registry config (`{SHAPES[FLAGS.shape].moejax_config}`) with
  `top_k` routing, GSPMD expert parallelism; layouts `ep` =
  data x expert, `fsdp` = fsdp x expert (params and AdamW state sharded over
  `fsdp` too); `LMConfig.loss_chunk` (chunked cross-entropy); remat full =
  `remat="block"` (every block), selective = `remat="recompute_attention"`
  (everything kept but the attention scores and probabilities), none.
- Depth: each row compiled at {" and ".join(FLAGS.depths)} layers, each
  compile in its own process, and extrapolated linearly to the full depth.
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

{chr(10).join(top_ops_markdown(compiles, k) + chr(10) for k in tops + maxtext_tops)}

## Set-up of the MaxText environment

{SETUP}

{NOTES_MARK}
{notes}"""


def run_compile(spec: dict) -> dict:
  """Compiles one spec in its own (niced) process; returns its result."""
  cmd = ["nice", "-n", str(FLAGS.nice), sys.executable,
         os.path.abspath(__file__), f"--one={json.dumps(spec)}",
         f"--top_ops={FLAGS.top_ops}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  last = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if not last:
    return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:],
            "versions": {}}
  return json.loads(last[-1])


def main(argv):
  del argv
  if FLAGS.one:
    print(json.dumps(compile_one(json.loads(FLAGS.one))), flush=True)
    return
  from moejax import aot
  result = {"compiles": {}}
  if FLAGS.out and os.path.exists(FLAGS.out):
    with open(FLAGS.out) as f:
      result = json.load(f)
  compiles = result.setdefault("compiles", {})

  def save():
    if FLAGS.out:
      os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
      with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)

  firsts = []
  for topology in FLAGS.topology:
    chips = len(aot.topology_devices(topology)[1])
    for spec in specs(topology, chips):
      key = spec_key(spec)
      if spec["depth"] == int(FLAGS.depths[0]):
        firsts.append(spec)
      if not FLAGS.compile or (key in compiles and compiles[key].get("ok")
                               and not FLAGS.recompile):
        continue
      print(f"compiling {key} ...", flush=True)
      compiles[key] = run_compile(spec)
      c = compiles[key]
      print(f"  {'ok' if c['ok'] else 'FAILED ' + c['error'][-300:]} "
            f"{c.get('wall_s', 0):.0f} s" + (
                f", peak {c['peak_bytes'] / 2**30:.2f} GiB, "
                f"{c['bytes_accessed'] / 2**30:.0f} GiB accessed"
                if c["ok"] else ""), flush=True)
      save()
  row_key = lambda r: spec_key({**r, "depth": 0})
  new_rows = [row_of(compiles, f) for f in firsts]
  replaced = {row_key(r) for r in new_rows}
  result["rows"] = [r for r in result.get("rows", [])
                    if row_key(r) not in replaced] + new_rows
  result["table"] = markdown_table(result["rows"])
  save()
  print(result["table"])
  if FLAGS.markdown:
    notes = ""
    if os.path.exists(FLAGS.markdown):
      with open(FLAGS.markdown) as f:
        old = f.read()
      if NOTES_MARK in old:
        notes = old.split(NOTES_MARK, 1)[1].lstrip("\n")
    with open(FLAGS.markdown, "w") as f:
      f.write(report_markdown(result, "PYTHONPATH=. python " + " ".join(
          sys.argv), notes))
    print(f"wrote {FLAGS.markdown}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
