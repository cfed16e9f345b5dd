"""MoE layer forward+backward vs the dense FFN of the same active FLOPs.

Axis legend:
  T  tokens (one routing group of T tokens unless --group_size)
  D  model width
  F  expert width
  E  experts
  k  experts per token (target mean fanout of variable-fanout routers)
  C  capacity (slots per expert)

For each size (T, D, F, E, k), payload dtype, router and dispatch strategy it
times one jitted value-and-gradient step of a pure MoE function

  logits = x @ router (float32) -> method.route_groups -> dispatch.plan
         -> moejax.experts.ffn (SwiGLU) -> loss (+ weighted aux losses)

with gradients for x, the router and the expert weights, and divides it by the
same step of a dense SwiGLU FFN of width k*F (the same active FLOPs) timed in
the same rounds: each round runs every function of a (size, dtype) block once,
round-robin, and the ratio is the median over rounds of t_moe / t_dense of the
same round (the machine is shared: interleaving cancels slow phases); "cpu"
is the same median ratio of process CPU time (all threads), a second view
that load from other processes disturbs less. Routing
math is float32; `--dtype=bfloat16` casts tokens and expert weights (float32
master params, as in the layer with dtype=bfloat16). Peak memory is XLA's
compiled `memory_analysis()` (temporaries + arguments + outputs).

  python experiments/bench_moe.py                       # the default table
  python experiments/bench_moe.py --sizes=4096x512x1024x8x2 --strategies=gather \
      --routers=top_k,dtop_p --dtype=bfloat16 --repeats=5

Default matrix: top_k x {index, gather, sorted} at every size in float32 and
{gather, sorted} in bfloat16; the other registered routers with "gather" at
the first size (--router_sizes=all for every size); top_k "gather" with one
routing group per sequence of 2048 and 512 tokens (--seq_groups; capacity
per group, the layer's grouping); and those per-sequence rows again on
meshes, each in a subprocess with as many forced host devices as the mesh
has: data-parallel (data:2, data:8) and expert-parallel (expert:2,
data:2,expert:4) (--meshes, --expert_parallel). Every MoE row runs the
layer's expert path (`nn.expert_parallel.routed_experts`): one plan over all
groups on one device, each device's groups at once on a mesh. A mesh row's
"vs 1 dev" is its ratio over the one-device row of the same size and group:
the cost of the multi-device path per device (a mesh of as many devices as
cores measures it fairly; 8 devices on fewer cores share them).
Nothing is pinned: run it as a user does (prefix `taskset -c N` to pin). The one-hot "einsum" and
"ragged" run only when named in --strategies, and are skipped (with a note)
above --einsum_max_experts / --ragged_max_experts experts.

Variable-fanout routers are calibrated to a mean fanout of k on the benchmark
batch (top-p/DTop-p threshold by bisection, ET thresholds = each expert's
T*k/E-th largest logit, count past warm-up); top-p/DTop-p get max_k =
min(E, --max_k_factor * k).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

from absl import app, flags  # noqa: E402
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import dispatch, routing  # noqa: E402
from moejax import sharding  # noqa: E402
from moejax.experiment import timing  # noqa: E402
from moejax.experts import ffn as expert_ffn  # noqa: E402
from moejax.nn.expert_parallel import routed_experts  # noqa: E402
from moejax.routing.base import Routing  # noqa: E402

SIZES = "4096x512x1024x8x2,4096x512x256x64x8,8192x256x128x128x8"
ROUTERS = ("top_k", "expert_choice", "top_p", "dtop_p", "expert_threshold",
           "exact_k")

flags.DEFINE_string("sizes", SIZES, "comma list of TxDxFxExk")
flags.DEFINE_list("strategies", ["index", "gather", "sorted"],
                  "dispatch strategies for the top_k router (see "
                  "moejax.dispatch.STRATEGIES; add einsum for the one-hot "
                  "reference, ragged for lax.ragged_dot)")
flags.DEFINE_list("routers", list(ROUTERS),
                  "routers (those not registered in moejax.routing are "
                  "skipped with a note)")
flags.DEFINE_list("router_strategies", ["gather"],
                  "strategies run for the routers other than top_k")
flags.DEFINE_string("router_sizes", "first",
                    "sizes at which the routers other than top_k run: "
                    "'first', 'all', or comma list of 0-based size indices")
flags.DEFINE_list("dtype", ["float32", "bfloat16"], "payload dtypes")
flags.DEFINE_list("bf16_strategies", ["gather", "sorted"],
                  "strategies run in bfloat16 (top_k only; 'all' = every one)")
timing.define_flags(repeats=3, warmup=1)  # the median round is reported
flags.DEFINE_float("capacity_factor", 1.25, "training capacity factor")
flags.DEFINE_integer("group_size", None, "tokens per routing group (default T)")
flags.DEFINE_list("seq_groups", ["2048", "512"],
                  "extra top_k rows (float32, --seq_strategies) with one "
                  "routing group per sequence of this many tokens, capacity "
                  "per group (the layer's grouping); empty = none")
flags.DEFINE_list("seq_strategies", ["gather"],
                  "strategies of the --seq_groups rows")
flags.DEFINE_string("meshes", "data:2;expert:2;data:8;data:2,expert:4",
                    "';'-separated meshes on which the --seq_groups rows run "
                    "again, each in a subprocess with as many forced host "
                    "devices as the mesh has (XLA_FLAGS="
                    "--xla_force_host_platform_device_count=N); empty = none")
flags.DEFINE_string("expert_parallel", "gspmd",
                    "expert-parallel mode of the mesh rows: gspmd or "
                    "shard_map")
flags.DEFINE_string("mesh", None, "internal: run only the --seq_groups rows "
                    "under this mesh")
flags.DEFINE_integer("block_size", None, "'sorted' block rows (default auto)")
flags.DEFINE_integer("einsum_max_experts", 8,
                     "skip the one-hot 'einsum' strategy above this E (its "
                     "cost grows like T*E*C*D)")
flags.DEFINE_integer("ragged_max_experts", 8,
                     "on CPU, skip 'ragged' above this E (XLA:CPU lowers "
                     "ragged_dot to a dense matmul over every expert)")
flags.DEFINE_float("max_k_factor", 2.0, "top_p/dtop_p max_k = factor * k")
flags.DEFINE_bool("aux", True, "add the routers' weighted aux losses")
flags.DEFINE_integer("seed", 0, "seed of the random inputs")
flags.DEFINE_string("out", "experiments/reports/bench_moe.json", "JSON path")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Size:
  tokens: int
  d_model: int
  width: int
  experts: int
  k: int

  @classmethod
  def parse(cls, text: str) -> "Size":
    parts = text.lower().split("x")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"size={text!r} is not TxDxFxExk with positive "
                       f"integers")
    return cls(*map(int, parts))

  def __str__(self):
    return (f"{self.tokens},{self.d_model},{self.width},{self.experts},"
            f"{self.k}")


def swiglu(x, w_in, w_gate, w_out):
  return (jax.nn.silu(x @ w_gate) * (x @ w_in)) @ w_out


def make_inputs(size: Size, seed: int):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  t, d, f, e, k = (size.tokens, size.d_model, size.width, size.experts,
                   size.k)
  x = jax.random.normal(ks[0], (t, d), jnp.float32)
  cot = jax.random.normal(ks[1], (t, d), jnp.float32)
  dense = {"w_in": jax.random.normal(ks[2], (d, k * f)) / np.sqrt(d),
           "w_gate": jax.random.normal(ks[3], (d, k * f)) / np.sqrt(d),
           "w_out": jax.random.normal(ks[4], (k * f, d)) / np.sqrt(k * f)}
  experts = {"w_in": jax.random.normal(ks[5], (e, d, f)) / np.sqrt(d),
             "w_gate": jax.random.normal(ks[6], (e, d, f)) / np.sqrt(d),
             "w_out": jax.random.normal(ks[7], (e, f, d)) / np.sqrt(f)}
  # Router logits with std ~2 (a peaked, trained-like router).
  router = jax.random.normal(ks[1], (d, e)) * (2.0 / np.sqrt(d))
  return x, cot, dense, {"router": router, "experts": experts}


def dense_step(dtype):
  def loss(params, x, cot):
    w = {n: v.astype(dtype) for n, v in params.items()}
    y = swiglu(x.astype(dtype), w["w_in"], w["w_gate"], w["w_out"])
    return jnp.vdot(y.astype(jnp.float32), cot)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


# ----------------------------------------------------------------- routers ---
def build_method(name: str, size: Size):
  options = {"k": size.k}
  if name in ("top_p", "dtop_p"):
    options["max_k"] = min(size.experts, int(FLAGS.max_k_factor * size.k))
  return routing.build(name, options)


def method_state(method, size: Size, logits: jax.Array) -> dict:
  """Controller state + router params, calibrated to mean fanout k."""
  e = size.experts
  state = dict(method.init_state(e))
  state.update({n: jnp.asarray(v, jnp.float32)
                for n, v in method.router_params(e).items()})
  if method.name == "expert_threshold":
    flat = logits.reshape(-1, e)
    per_expert = max(1, int(round(flat.shape[0] * size.k / e)))
    cutoffs = jnp.sort(flat, axis=0)[-per_expert]
    state.update(ema=cutoffs.astype(jnp.float32),
                 count=jnp.asarray(10 ** 6, jnp.int32))
  if method.name == "dtop_p":
    fanout = jax.jit(lambda p, l: method.route_groups(
        l, {**state, "p": p}, rng=None, train=True
    ).routing.routed.sum(-1).mean())
    state["p"] = jnp.asarray(
        bisect_p(lambda p: fanout(p, logits), size.k), jnp.float32)
  return state


def bisect_p(fanout, target: float, steps: int = 14) -> float:
  """p in (0, 1] whose mean fanout is closest to target (fanout increasing)."""
  low, high = 1e-3, 1.0
  for _ in range(steps):
    mid = 0.5 * (low + high)
    if float(fanout(jnp.float32(mid))) < target:
      low = mid
    else:
      high = mid
  return 0.5 * (low + high)


def calibrated_method(name: str, size: Size, logits: jax.Array):
  method = build_method(name, size)
  if name == "top_p":
    fanout = jax.jit(lambda p, logits: jax.vmap(lambda l: routing.top_p(
        l, p, max_k=method.max_k).routing.routed.sum(-1).mean())(logits).mean())
    method = dataclasses.replace(
        method, p=round(bisect_p(lambda p: fanout(p, logits), size.k), 4))
  return method, method_state(method, size, logits)


def moe_step(method, size: Size, strategy: str, dtype, group: int,
             mode: str | None = None):
  """The layer's expert path (`nn.expert_parallel.routed_experts`): one plan
  over all groups on one device, each device's groups at once on a mesh.
  `mode` is the expert-parallel mode (default: --expert_parallel under
  --mesh, else "gspmd")."""
  e = size.experts
  cap = method.capacity(group, e, FLAGS.capacity_factor)
  max_fanout = min(method.max_fanout(e), e)
  aux_weights = dict(method.aux_weights) if FLAGS.aux else {}
  if mode is None:
    mode = FLAGS.expert_parallel if FLAGS.mesh else "gspmd"

  def loss(params, x, cot, rng, state):
    groups = x.reshape(-1, group, x.shape[-1])
    logits = jnp.einsum("gsd,de->gse", groups, params["router"])
    out = method.route_groups(logits, state, rng=rng, train=True)
    weights = {n: v.astype(dtype) for n, v in params["experts"].items()}
    if FLAGS.block_size and groups.shape[0] == 1 and not FLAGS.mesh:
      plan = dispatch.plan(Routing(out.routing.gates[0],
                                   out.routing.priority[0]), cap,
                           strategy=strategy, max_fanout=max_fanout,
                           block_size=FLAGS.block_size)
      y = expert_ffn(plan, groups[0].astype(dtype), weights)
    else:
      y, _ = routed_experts(out.routing, groups.astype(dtype), weights,
                            capacity=cap, strategy=strategy,
                            max_fanout=max_fanout, mode=mode)
    value = jnp.vdot(y.reshape(x.shape).astype(jnp.float32), cot)
    for key, w in aux_weights.items():
      if w and key in out.aux:
        value = value + w * jnp.mean(out.aux[key])
    return value
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), cap


# ------------------------------------------------------------------ timing ---
def peak_memory(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    total = (m.temp_size_in_bytes + m.argument_size_in_bytes +
             m.output_size_in_bytes - m.alias_size_in_bytes)
    return total / 2 ** 20
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def time_block(entries, repeats: int, warmup: int):
  """entries: list of dicts with 'fn' and 'args'; fills 'times' (seconds)."""
  for entry in entries:
    t0 = time.perf_counter()
    with (jax.set_mesh(sharding.make_mesh(FLAGS.mesh)) if FLAGS.mesh
          else contextlib.nullcontext()):
      compiled = entry["fn"].lower(*entry["args"]).compile()
    entry["compile_s"] = time.perf_counter() - t0
    entry["peak_mib"] = peak_memory(compiled)
    entry["fn"] = compiled
  timings = timing.interleaved(
      {i: functools.partial(e["fn"], *e["args"]) for i, e in enumerate(entries)},
      repeats, warmup=warmup)
  for i, entry in enumerate(entries):
    entry["times"], entry["cpu_times"] = timings[i].wall, timings[i].cpu


def skip_reason(strategy: str, size: Size) -> str | None:
  if strategy == "einsum" and size.experts > FLAGS.einsum_max_experts:
    return (f"einsum skipped: E={size.experts} > --einsum_max_experts="
            f"{FLAGS.einsum_max_experts} (one-hot cost ~T*E*C*D)")
  if (strategy in ("ragged", "dropless") and
      dispatch.resolve_strategy(strategy) == "ragged" and
      jax.default_backend() == "cpu" and
      size.experts > FLAGS.ragged_max_experts):
    return (f"ragged skipped on CPU: E={size.experts} > "
            f"--ragged_max_experts={FLAGS.ragged_max_experts}")
  return None


def run(sizes, routers, dtypes):
  rows, notes = [], []
  available = set(routing.available())
  for name in routers:
    if name not in available:
      notes.append(f"router {name} not registered: skipped")
  routers = [r for r in routers if r in available]
  if FLAGS.router_sizes == "all":
    router_sizes = set(range(len(sizes)))
  elif FLAGS.router_sizes == "first":
    router_sizes = {0}
  else:
    router_sizes = {int(i) for i in FLAGS.router_sizes.split(",") if i}
  for index, size in enumerate(sizes):
    x, cot, dense_params, moe_params = make_inputs(size, FLAGS.seed)
    group = FLAGS.group_size or size.tokens
    if size.tokens % group:
      raise ValueError(f"group_size={group} must divide tokens={size.tokens}")
    logits = jnp.einsum("gsd,de->gse", x.reshape(-1, group, size.d_model),
                        moe_params["router"])
    size_routers = [r for r in routers
                    if r == "top_k" or index in router_sizes]
    calibrated = {}
    for name in size_routers:
      calibrated[name] = calibrated_method(name, size, logits)
    rng = jax.random.PRNGKey(FLAGS.seed + 1)
    for dtype_name in dtypes:
      dtype = jnp.dtype(dtype_name)
      entries = [{"router": "dense", "strategy": "-", "fn": dense_step(dtype),
                  "args": (dense_params, x, cot)}]
      for name in size_routers:
        if FLAGS.mesh:  # the mesh run times only the --seq_groups rows
          break
        if name == "top_k":
          strategies = FLAGS.strategies
        else:
          strategies = FLAGS.router_strategies
        if dtype_name != "float32" and FLAGS.bf16_strategies != ["all"]:
          strategies = [s for s in strategies if s in FLAGS.bf16_strategies]
          if name != "top_k":
            strategies = []
        for strategy in strategies:
          reason = skip_reason(strategy, size)
          if reason:
            note = f"{size} {dtype_name} {name}: {reason}"
            if note not in notes:
              notes.append(note)
            continue
          method, state = calibrated[name]
          fn, cap = moe_step(method, size, strategy, dtype, group)
          fanout = float(jax.jit(lambda l, s, r, m=method: m.route_groups(
              l, s, rng=r, train=True).routing.routed.sum(-1).mean())(
                  logits, state, rng))
          entries.append({"router": name, "strategy": strategy, "fn": fn,
                          "args": (moe_params, x, cot, rng, state),
                          "capacity": cap, "group": group,
                          "fanout": fanout})
      if dtype_name == "float32" and "top_k" in size_routers:
        entries += seq_entries(size, dtype, calibrated["top_k"], moe_params,
                               x, cot, rng, notes)
      if FLAGS.mesh:
        entries = place_on_mesh(entries, size)
      print(f"[{size} {dtype_name}] timing {len(entries)} functions x "
            f"{FLAGS.repeats} rounds", flush=True)
      time_block(entries, FLAGS.repeats, FLAGS.warmup)
      dense_times = entries[0]["times"]
      dense_cpu = entries[0]["cpu_times"]
      for entry in entries:
        ratios = [t / d for t, d in zip(entry["times"], dense_times)]
        cpu_ratios = [t / d for t, d in zip(entry["cpu_times"], dense_cpu)]
        median = statistics.median(entry["times"])
        row = {"size": str(size), "tokens": size.tokens,
               "d_model": size.d_model, "width": size.width,
               "experts": size.experts, "k": size.k, "dtype": dtype_name,
               "router": entry["router"], "strategy": entry["strategy"],
               "ms": 1e3 * median,
               "ratio": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios),
               "cpu_ratio": statistics.median(cpu_ratios),
               "tokens_per_s": size.tokens / median,
               "peak_mib": entry["peak_mib"],
               "compile_s": entry["compile_s"],
               "capacity": entry.get("capacity"),
               "group": entry.get("group"), "mesh": FLAGS.mesh or "-",
               "expert_parallel": (FLAGS.expert_parallel if FLAGS.mesh
                                   else "-"),
               "fanout": entry.get("fanout")}
        rows.append(row)
        print_row(row)
  return rows, notes


def seq_entries(size: Size, dtype, calibrated, moe_params, x, cot, rng,
                notes):
  """top_k rows with one routing group per sequence (--seq_groups)."""
  entries = []
  method, state = calibrated
  for text in FLAGS.seq_groups:
    group = int(text)
    if size.tokens % group or group >= size.tokens:
      notes.append(f"{size}: seq group {group} skipped (must divide and be "
                   f"below T={size.tokens})")
      continue
    if FLAGS.mesh:
      shards = math.prod(v for a, v in sharding.parse_mesh(
          FLAGS.mesh, jax.device_count()).items() if a in sharding.BATCH_AXES)
      if (size.tokens // group) % shards:
        notes.append(f"{size} mesh {FLAGS.mesh}: seq group {group} skipped "
                     f"({size.tokens // group} groups do not split over "
                     f"{shards} devices, as a layer's batch must)")
        continue
    for strategy in FLAGS.seq_strategies:
      fn, cap = moe_step(method, size, strategy, dtype, group)
      entries.append({"router": "top_k", "strategy": strategy, "fn": fn,
                      "args": (moe_params, x, cot, rng, state),
                      "capacity": cap, "group": group})
  return entries


def arg_shardings(entry, size: Size, mesh) -> tuple:
  """Shardings of an entry's args on `mesh` (a pytree prefix of each arg):
  tokens and cotangents split over the batch axes, expert weights over
  `expert`, everything else replicated."""
  named = jax.sharding.NamedSharding
  spec = jax.sharding.PartitionSpec
  replicated = named(mesh, spec())
  tokens = sharding.batch_sharding(mesh)
  args = entry["args"]
  params = replicated
  if entry["router"] != "dense":
    experts = named(mesh, spec(
        "expert" if size.experts % mesh.shape["expert"] == 0 else None))
    params = {n: experts if n == "experts" else replicated for n in args[0]}
  return (params, tokens, tokens) + (replicated,) * (len(args) - 3)


def place_on_mesh(entries, size: Size):
  """Tokens split over the batch axes, expert weights over `expert`; each
  function runs under the mesh."""
  mesh = sharding.make_mesh(FLAGS.mesh)
  return [{**entry, "args": jax.device_put(entry["args"],
                                           arg_shardings(entry, size, mesh))}
          for entry in entries]


def run_meshes(argv, notes: list[str]) -> list[dict]:
  """The --seq_groups rows on each of --meshes, each in a subprocess with as
  many forced host devices as the mesh has (CPU; on an accelerator a mesh
  needs that many real devices, else it is skipped with a note); returns
  their rows."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  rows = []
  for mesh in [m for m in FLAGS.meshes.split(";") if m]:
    devices = math.prod(int(part.partition(":")[2])
                        for part in mesh.split(",") if part.strip())
    if jax.default_backend() != "cpu" and devices > jax.device_count():
      notes.append(f"mesh {mesh} skipped: it needs {devices} devices, the "
                   f"{jax.default_backend()} backend has {jax.device_count()}")
      continue
    env = dict(os.environ, XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={devices}").strip())
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "mesh.json")
      args = [a for a in argv[1:] if not a.startswith(
          ("--out", "--mesh", "--routers", "--dtype"))]
      cmd = [sys.executable, argv[0], *args, f"--mesh={mesh}", f"--out={out}",
             "--routers=top_k", "--dtype=float32"]
      print(f"[mesh {mesh}] {' '.join(cmd[1:])}", flush=True)
      subprocess.run(cmd, env=env, check=True)
      with open(out) as fh:
        rows += json.load(fh)["rows"]
  return rows


HEADER = (f"{'size (T,D,F,E,k)':<22} {'dtype':<8} {'router':<17} "
          f"{'strategy':<8} {'group':>6} {'mesh':<16} {'ms':>8} {'ratio':>6} "
          f"{'(min-max)':>11} {'cpu':>5} {'tok/s':>8} {'peak MiB':>9} "
          f"{'fanout':>6}")


def print_row(row):
  peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
  fanout = "-" if row["fanout"] is None else f"{row['fanout']:.2f}"
  spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
  group = "-" if row["group"] is None else str(row["group"])
  mesh = row["mesh"] if row["mesh"] == "-" else (
      f"{row['mesh']} {row['expert_parallel'][:5]}")
  print(f"{row['size']:<22} {row['dtype']:<8} {row['router']:<17} "
        f"{row['strategy']:<8} {group:>6} {mesh:<16} {row['ms']:>8.1f} "
        f"{row['ratio']:>6.2f} {spread:>11} {row['cpu_ratio']:>5.2f} "
        f"{row['tokens_per_s']:>8.0f} {peak:>9} {fanout:>6}",
        flush=True)


def vs_one_device(rows):
  """Sets and prints each mesh row's "vs_one_device": its ratio over the
  one-device row of the same size, group and strategy (1.0 = the mesh path
  costs per device what the single-plan path costs)."""
  single = {(r["size"], r["group"], r["strategy"]): r["ratio"]
            for r in rows if r["mesh"] == "-" and r["group"] is not None}
  printed = False
  for row in rows:
    key = (row["size"], row["group"], row["strategy"])
    if row["mesh"] == "-" or key not in single:
      continue
    row["vs_one_device"] = row["ratio"] / single[key]
    if not printed:
      print("\nmesh path vs one device (ratio over the one-device ratio):")
      printed = True
    print(f"  {row['size']:<22} group {row['group']:>5} {row['mesh']:<16} "
          f"{row['ratio']:.2f} vs {single[key]:.2f}: "
          f"{row['vs_one_device']:.2f}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sizes = [Size.parse(s) for s in FLAGS.sizes.split(",") if s]
    for s in FLAGS.strategies + FLAGS.router_strategies:
      if s not in dispatch.STRATEGIES:
        raise ValueError(f"strategy={s!r} is not supported; allowed: "
                         f"{', '.join(dispatch.STRATEGIES)}")
    for d in FLAGS.dtype:
      if d not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={d!r} is not supported; allowed: float32, "
                         f"bfloat16")
    if FLAGS.repeats < 1:
      raise ValueError(f"repeats={FLAGS.repeats} is out of range; allowed: "
                       f">= 1")
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  start = time.time()
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"jax={jax.__version__}", flush=True)
  print(HEADER)
  rows, notes = run(sizes, FLAGS.routers,
                    ["float32"] if FLAGS.mesh else FLAGS.dtype)
  if not FLAGS.mesh and FLAGS.meshes and FLAGS.seq_groups:
    rows += run_meshes(sys.argv, notes)
  wall = time.time() - start
  print("\nbest strategy per size and dtype (top_k):")
  best = {}
  for row in rows:
    if row["router"] != "top_k" or row["mesh"] != "-" or (
        row["group"] != row["tokens"]):
      continue
    key = (row["size"], row["dtype"])
    if key not in best or row["ratio"] < best[key]["ratio"]:
      best[key] = row
  for (size, dtype), row in best.items():
    print(f"  {size:<22} {dtype:<8} {row['strategy']:<8} ratio "
          f"{row['ratio']:.2f}")
  vs_one_device(rows)
  for note in notes:
    print(f"note: {note}")
  print(f"wall {wall:.0f} s")
  result = {"command": " ".join(sys.argv), "backend": jax.default_backend(),
            "jax": jax.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "wall_s": wall,
            "capacity_factor": FLAGS.capacity_factor,
            "repeats": FLAGS.repeats, "rows": rows, "notes": notes,
            "best": {f"{s} {d}": r["strategy"] for (s, d), r in best.items()}}
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as fh:
      json.dump(result, fh, indent=1)
    print(f"wrote {FLAGS.out}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
