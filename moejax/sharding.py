"""Device meshes, logical-axis sharding rules, activation constraints, multi-host.

Axis legend:
  B  batch (global)
  L  sequence length
  G  routing groups
  E  experts
  C  capacity (slots per expert)
  D  model width
  F  expert / MLP width
  V  vocabulary

Mesh axes: `data` (batch), `expert` (experts; the batch is also split over it
outside the expert layers, so no device idles), `model` (tensor-parallel
widths). Parameters and activations carry logical axis names; `LOGICAL_RULES`
maps them onto mesh axes:

  logical name    mesh axes           used by
  batch           (data, expert)      activations' B, groups' G
  length          None                activations' L
  embed           None                D of params and activations
  mlp             model               F of dense and expert weights, hidden acts
  heads           model               attention heads
  kv              None                head width
  vocab           model               V of the embedding, head and logits
  expert          expert              E of expert weights and expert buffers
  expert_group    data                G of the expert-major [G, E, C, D] buffers
  capacity        None                C

Tokens live batch-split over `data x expert`; the expert buffers live
G-over-`data`, E-over-`expert`, so moving between the two layouts is an
all-to-all over `expert` (GSPMD inserts it from the constraints of
`constrain`; the shard_map path of `moejax.nn.expert_parallel` calls
`jax.lax.all_to_all` itself).

The same code runs on one CPU, forced host devices, a GPU or a TPU pod;
multi-host runs call `maybe_initialize_distributed()` before anything else
touches jax, and feed each process its slice of the global batch
(`process_batch_rows`, `put_batch`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("expert_group", "data"),
    ("expert", "expert"),
    ("capacity", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
)

# Logical names of the activations at block boundaries and in the MoE layer.
ACT_BLD = ("batch", "length", "embed")          # float[B, L, D]
ACT_GSD = ("batch", "length", "embed")          # float[G, S, D] (groups)
ACT_GECD = ("expert_group", "expert", "capacity", "embed")  # float[G, E, C, D]
ACT_GECF = ("expert_group", "expert", "capacity", "mlp")    # float[G, E, C, F]
ACT_TOKENS_GECD = ("batch", None, "capacity", "embed")  # [G, E, C, D] token side
# The same buffers expert-major, with G split as (data, expert, Gl) into
# float[X, E, Gd, Gl, C, D] (the "gather" plans of expert parallelism; X and
# Gd: the sizes of the mesh's `expert` and `data` axes): the token side holds
# X over `expert` and Gd over `data`, the expert side E over `expert` and Gd
# over `data`, so that an expert-side shard [X, El, 1, Gl, C, D] is what an
# all-to-all over `expert` delivers (source-major).
ACT_XEGCD = (None, "expert", "expert_group", None, "capacity", "embed")
ACT_XEGCF = (None, "expert", "expert_group", None, "capacity", "mlp")
ACT_TOKENS_XEGCD = ("expert", None, "expert_group", None, "capacity", "embed")


# ----------------------------------------------------------------------------
# Meshes.


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """'data:2,expert:4' -> {'data': 2, 'expert': 4, 'model': 1}.

  An empty spec puts every device on `data`. Raises ValueError when an axis is
  unknown or repeated, a size is not a positive integer, or the sizes do not
  multiply to the number of devices.
  """
  sizes = {axis: 1 for axis in MESH_AXES}
  if not spec:
    sizes["data"] = num_devices
    return sizes
  seen = set()
  for part in spec.split(","):
    name, colon, size = part.strip().partition(":")
    if name not in MESH_AXES:
      raise ValueError(f"mesh axis {name!r} in --mesh={spec!r} is unknown; "
                       f"allowed: {', '.join(MESH_AXES)}")
    if name in seen:
      raise ValueError(f"mesh axis {name!r} appears twice in --mesh={spec!r}; "
                       "name each axis at most once")
    seen.add(name)
    if not colon:
      raise ValueError(f"mesh axis {name!r} in --mesh={spec!r} has no size; "
                       f"write {name}:SIZE, e.g. data:2,expert:4")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise ValueError(f"mesh axis size {size!r} in --mesh={spec!r} is not an "
                       "integer") from None
    if sizes[name] < 1:
      raise ValueError(f"mesh axis {name}={sizes[name]} in --mesh={spec!r} is "
                       "out of range; allowed: >= 1")
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(f"--mesh={spec!r} uses {total} devices but {num_devices} "
                     f"are available; the axis sizes must multiply to "
                     f"{num_devices}")
  return sizes


def make_mesh(spec: str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, expert, model) mesh over `devices` (default: all, every process).

  Devices keep `jax.devices()` order (process-major), so each process holds a
  contiguous block of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_spec(mesh: Mesh) -> str:
  """The spec string of a mesh, e.g. 'data:2,expert:4,model:1'."""
  return ",".join(f"{a}:{mesh.shape[a]}" for a in MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over data (and expert) axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def param_shardings(boxed_params: Any, mesh: Mesh,
                    rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a pytree with logical axis names (boxed params)."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["expert"]
  if batch_size % shards:
    raise ValueError(f"batch_size={batch_size} must be divisible by the "
                     f"data*expert mesh size {shards} (mesh "
                     f"{mesh_spec(mesh)})")


def check_model(model_config: Any, mesh: Mesh) -> None:
  """Checks that the mesh splits the model's sharded axes evenly.

  `model_config` is an `LMConfig`-like object (num_heads, d_ff, vocab_size,
  moe with num_experts/expert_width). Raises ValueError naming the field.
  """
  model, expert = mesh.shape["model"], mesh.shape["expert"]
  checks = [("num_heads", getattr(model_config, "num_heads", None), model)]
  moe = getattr(model_config, "moe", None)
  dense_layers = (getattr(model_config, "num_layers", 1)
                  - getattr(model_config, "num_moe_layers", 0))
  if moe is None or dense_layers > 0:
    checks.append(("d_ff", getattr(model_config, "d_ff", None), model))
  if moe is not None:
    checks += [("num_experts", moe.num_experts, expert),
               ("expert_width", moe.expert_width, model)]
    if moe.num_shared:
      checks.append(("num_shared * shared_width",
                     moe.num_shared * (moe.shared_width or moe.expert_width),
                     model))
  for name, value, size in checks:
    if value is not None and size > 1 and value % size:
      axis = "expert" if name == "num_experts" else "model"
      raise ValueError(f"{name}={value} must be divisible by the {axis} mesh "
                       f"axis size {size} (mesh {mesh_spec(mesh)})")


# ----------------------------------------------------------------------------
# Logical names -> specs, activation constraints.


def current_mesh():
  """The mesh set by `jax.set_mesh` (concrete or abstract), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  return mesh


def logical_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                 mesh=None, rules=LOGICAL_RULES) -> P:
  """PartitionSpec of logical axis names under `rules`.

  With `shape` and `mesh`, a dimension that the mesh axes do not divide evenly
  (or whose mesh axes are absent from the mesh) stays unsharded; each mesh axis
  is used at most once (first come).
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size:
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None],
              rules=LOGICAL_RULES) -> jax.Array:
  """`with_sharding_constraint` of x by logical axis names on the current mesh.

  A no-op outside `jax.set_mesh(...)` or on a one-device mesh, so the same
  model code runs unsharded. Dimensions that the mesh does not divide stay
  unsharded.
  """
  mesh = current_mesh()
  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} logical names {tuple(names)} for "
                     f"an array of rank {x.ndim}")
  return jax.lax.with_sharding_constraint(
      x, logical_spec(names, x.shape, mesh, rules))


# ----------------------------------------------------------------------------
# Multi-host.

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                    "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                    "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 env: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` for a multi-process launch.

  Explicit arguments win; otherwise `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` are read from the environment, and
  cluster launches (SLURM, TPU pods, Open MPI) are left to jax's own
  auto-detection. Must run before any other jax call touches the devices.
  Returns whether it initialised (False for a single-process run, or if it is
  already initialised). Raises ValueError when only some of the explicit
  settings are given or they are out of range.
  """
  env = os.environ if env is None else env
  if coordinator_address is None:
    coordinator_address = env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  explicit = (coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    return False
  if any(v is not None for v in explicit):
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"num_processes={num_processes} is out of range; "
                       "allowed: >= 1")
    if num_processes == 1 and coordinator_address is None:
      return False
    if None in explicit:
      cluster = any(env.get(k) for k in _DISTRIBUTED_ENV[1:])
      if not cluster:
        missing = [n for n, v in zip(
            ("coordinator_address", "num_processes", "process_id"), explicit)
                   if v is None]
        raise ValueError(
            "a multi-process launch needs coordinator_address, num_processes "
            f"and process_id (flags or JAX_* env vars); missing: "
            f"{', '.join(missing)}")
    if (process_id is not None and num_processes is not None
        and not 0 <= process_id < num_processes):
      raise ValueError(f"process_id={process_id} is out of range; allowed: "
                       f"[0, {num_processes - 1}]")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return True
  if any(env.get(k) for k in _DISTRIBUTED_ENV[1:]):
    jax.distributed.initialize()  # cluster auto-detection
    return True
  return False


def process_batch_rows(global_batch: int, sharding: NamedSharding
                       ) -> tuple[int, int]:
  """[start, stop) of the rows of a global batch this process feeds.

  The rows held by this process's devices under `sharding` (batch-major);
  they form one contiguous block with `make_mesh`'s process-major order.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts, stops = [], []
  for idx in index_map.values():
    sl = idx[0]
    start, stop, _ = sl.indices(global_batch)
    starts.append(start)
    stops.append(stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(hi - lo, bool)
  for a, b in zip(starts, stops):
    covered[a - lo:b - lo] = True
  if not covered.all():
    raise ValueError("this process's devices hold a non-contiguous part of "
                     "the batch; build the mesh with make_mesh (process-major "
                     "device order)")
  return lo, hi


def put_batch(batch: Mapping[str, Any], sharding: NamedSharding,
              local: bool = False) -> dict[str, jax.Array]:
  """Global jax arrays of a batch, sharded on axis 0.

  Args:
    batch: numpy arrays; the global batch ([B, ...]) when `local` is False
      (each process slices its rows), else this process's rows only.
    sharding: the batch sharding (e.g. `batch_sharding(mesh)`).
  Single-process runs take the fast `device_put` path.
  """
  if jax.process_count() == 1:
    return jax.device_put({k: np.asarray(v) for k, v in batch.items()},
                          sharding)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if local:
      global_shape = (value.shape[0] * _process_share(sharding),
                      *value.shape[1:])
    else:
      global_shape = value.shape
      lo, hi = process_batch_rows(value.shape[0], sharding)
      value = value[lo:hi]
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      global_shape)
  return out


def _process_share(sharding: NamedSharding) -> int:
  """Global batch rows per local row (processes feeding distinct rows)."""
  probe = 1
  for axis in BATCH_AXES:
    probe *= sharding.mesh.shape.get(axis, 1)
  lo, hi = process_batch_rows(probe, sharding)
  return probe // (hi - lo)


def is_main_process() -> bool:
  """True on process 0 (the one that writes logs, plots and reports)."""
  return jax.process_index() == 0
