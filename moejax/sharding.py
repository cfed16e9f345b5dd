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

Mesh axes: `data` (batch), `fsdp` (batch, and every parameter and optimizer
state sharded along one dimension: fully sharded data parallelism), `expert`
(experts; the batch is also split over it outside the expert layers, so no
device idles), `model` (tensor-parallel widths). Parameters and activations
carry logical axis names; two rule tables map them onto mesh axes, because
the same name can mean a parameter dimension (sharded over `fsdp`) and an
activation dimension (never over `fsdp`):

  logical name    activations            parameters   used by
                  (LOGICAL_RULES)        (PARAM_RULES)
  batch           (data, fsdp, expert)   -            B, groups' G
  length          None                   -            L
  embed           None                   fsdp (x      D
                                         expert)
  mlp             model                  model        F of dense and expert weights, hidden acts
  heads           model                  model        attention heads
  kv              None                   None         head width
  vocab           model                  model        V of the embedding, head and logits
  expert          expert                 expert       E of expert weights and buffers
  expert_group    (data, fsdp)           -            G of the expert-major buffers
  capacity        None                   -            C
  layers          None                   None         stacked blocks of a layer scan

A dimension whose mesh axes do not divide it stays unsharded (each mesh axis
is used at most once per array, first come). The `fsdp` rule for parameters:
a parameter takes `fsdp` on its `embed` dimension (D: every weight matrix of
the LM has one, the expert weights `[E, D, F]` included, so those are split E
over `expert`, D over `fsdp`, F over `model`); when it has no `embed`
dimension, no logical names at all (e.g. an RMSNorm scale, the DiT's dense
layers), or `fsdp` does not divide it, `fsdp` goes on its largest
dimension that is still unsharded and divisible by the `fsdp` size (the
first of equal ones); when there is none (scalars, odd sizes) the parameter
stays replicated over `fsdp`. A parameter without an `expert` dimension (all
but the expert weights) is split over `fsdp x expert` on its fsdp dimension
where that product divides it: every device holds 1 / (fsdp x expert) of it,
as the batch is split over both, and no weight stays replicated over
`expert`. Optimizer moments have their parameter's names
and shape, so they follow their parameter. Controller state, the step, the
PRNG key and the data position stay replicated. GSPMD gathers the sharded
parameters where a matmul needs them whole and reduce-scatters their
gradients.

Tokens live batch-split over `data x fsdp x expert`; the expert buffers live
G-over-`data x fsdp`, E-over-`expert`, so moving between the two layouts is
an all-to-all over `expert` (GSPMD inserts it from the constraints of
`constrain`; the shard_map path of `moejax.nn.expert_parallel` calls
`jax.lax.all_to_all` itself). Without an `fsdp` axis (or with `fsdp:1`)
everything is as on a (data, expert, model) mesh.

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

from moejax import platforms

MESH_AXES = ("data", "fsdp", "expert", "model")
# The batch axes, major to minor: `expert` innermost, so that a device's
# token groups are a sub-block of its expert-side groups (data x fsdp) and
# the all-to-all runs over `expert` alone.
BATCH_AXES = ("data", "fsdp", "expert")
GROUP_AXES = ("data", "fsdp")
# Activations (and the dimensions of parameters that are not `embed`).
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("expert_group", GROUP_AXES),
    ("expert", "expert"),
    ("capacity", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("layers", None),
)
# Parameters: as the activations, but D over `fsdp` (see `param_spec` for the
# fallback when a parameter has no divisible `embed` dimension).
PARAM_RULES = (
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("layers", None),
)

# Logical names of the activations at block boundaries and in the MoE layer.
ACT_BLD = ("batch", "length", "embed")          # float[B, L, D]
ACT_GSD = ("batch", "length", "embed")          # float[G, S, D] (groups)
ACT_GECD = ("expert_group", "expert", "capacity", "embed")  # float[G, E, C, D]
ACT_GECF = ("expert_group", "expert", "capacity", "mlp")    # float[G, E, C, F]
ACT_TOKENS_GECD = ("batch", None, "capacity", "embed")  # [G, E, C, D] token side
# The same buffers expert-major, with G split as (data x fsdp, expert, Gl)
# into float[X, E, Gd, Gl, C, D] (the "gather" plans of expert parallelism;
# X: the size of the mesh's `expert` axis, Gd: of `data x fsdp`): the token
# side holds X over `expert` and Gd over `data x fsdp`, the expert side E
# over `expert` and Gd over `data x fsdp`, so that an expert-side shard
# [X, El, 1, Gl, C, D] is what an all-to-all over `expert` delivers
# (source-major).
ACT_XEGCD = (None, "expert", "expert_group", None, "capacity", "embed")
ACT_XEGCF = (None, "expert", "expert_group", None, "capacity", "mlp")
ACT_TOKENS_XEGCD = ("expert", None, "expert_group", None, "capacity", "embed")


# ----------------------------------------------------------------------------
# Meshes.


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """'data:2,expert:4' -> {'data': 2, 'fsdp': 1, 'expert': 4, 'model': 1}.

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
    hint = (f" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{total} gives {total} host devices)" if total > num_devices
            else "")
    raise ValueError(f"--mesh={spec!r} uses {total} devices but {num_devices} "
                     f"are available; the axis sizes must multiply to "
                     f"{num_devices}{hint}")
  return sizes


def make_mesh(spec: str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, expert, model) mesh over `devices` (default: all, every
  process).

  Devices keep `jax.devices()` order (process-major), so each process holds a
  contiguous block of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_spec(mesh: Mesh) -> str:
  """The spec string of a mesh, e.g. 'data:2,expert:4,model:1' (`fsdp` only
  where the mesh has it with a size above 1: 'data:1,fsdp:4,expert:2,...')."""
  return ",".join(f"{a}:{mesh.shape[a]}" for a in MESH_AXES
                  if a in mesh.shape and (a != "fsdp" or mesh.shape[a] > 1))


def _axes(mesh, names: Sequence[str]) -> tuple[str, ...]:
  """The mesh axes among `names` that `mesh` has."""
  return tuple(a for a in names if a in mesh.shape)


def batch_axes(mesh) -> tuple[str, ...]:
  """The batch axes (data, fsdp, expert) that `mesh` has."""
  return _axes(mesh, BATCH_AXES)


def batch_shards(mesh) -> int:
  """Devices the batch is split over: data x fsdp x expert."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def _batch_axes_text(mesh) -> str:
  """'data*expert', or 'data*fsdp*expert' on a mesh with fsdp > 1."""
  return "*".join(a for a in batch_axes(mesh)
                  if a != "fsdp" or mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over the data, fsdp and expert axes, the rest
  replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def param_spec(names: Sequence[str | None] | None, shape: Sequence[int],
               mesh, rules=PARAM_RULES) -> P:
  """PartitionSpec of a parameter (or optimizer moment) of `shape` with
  logical axis `names` (None: no names) under `rules`, plus the `fsdp`
  fallback of the module docstring: no divisible `embed` dimension -> `fsdp`
  on the largest unsharded dimension that it divides, else replicated."""
  names = tuple(names) if names is not None else (None,) * len(shape)
  spec = list(logical_spec(names, shape, mesh, rules))
  spec += [None] * (len(shape) - len(spec))
  size = mesh.shape.get("fsdp", 1)
  used = {a for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}
  if size > 1 and "fsdp" not in used:
    free = [i for i, n in enumerate(shape) if spec[i] is None and n % size == 0]
    if free:
      spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
  experts = mesh.shape.get("expert", 1)
  if size > 1 and experts > 1 and "expert" not in used:
    # a weight without an expert dimension is also split over `expert` (on
    # its fsdp dimension, where fsdp x expert divides it), as the batch is
    for i, entry in enumerate(spec):
      if entry == "fsdp" and shape[i] % (size * experts) == 0:
        spec[i] = ("fsdp", "expert")
  return P(*spec)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def param_shardings(boxed_params: Any, mesh: Mesh, rules=PARAM_RULES,
                    fsdp_fallback: bool = True) -> Any:
  """NamedShardings for a pytree of parameters (or optimizer state), boxed
  with logical axis names (`nn.with_logical_partitioning`) or not; the
  result has the structure of the unboxed tree. Named leaves follow `rules`;
  every array leaf gets the `fsdp` fallback of `param_spec` unless
  `fsdp_fallback` is False (then leaves without names are replicated)."""
  def one(x):
    if _is_box(x):
      names, shape = x.names, x.value.shape
    else:
      names, shape = None, np.shape(x)
      if not fsdp_fallback:
        return NamedSharding(mesh, P())
    if not fsdp_fallback:
      return NamedSharding(mesh, logical_spec(names, shape, mesh, rules))
    return NamedSharding(mesh, param_spec(names, shape, mesh, rules))
  return jax.tree.map(one, boxed_params, is_leaf=_is_box)


def train_state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings of a (boxed, abstract) train state: a flax struct with
  `params` and `opt_state` (the parameter rules and the `fsdp` fallback) and
  other leaves (step, controller state, PRNG key, data position: logical
  names where they have them, else replicated)."""
  shards = param_shardings(abstract_state, mesh, fsdp_fallback=False)
  return shards.replace(
      params=param_shardings(abstract_state.params, mesh),
      opt_state=param_shardings(abstract_state.opt_state, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError (one line) unless the batch splits evenly over the
  batch axes (data x fsdp x expert)."""
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"batch_size={batch_size} must be divisible by the "
                     f"{_batch_axes_text(mesh)} mesh size {shards} (mesh "
                     f"{mesh_spec(mesh)}); allowed: multiples of {shards}")


def check_model(model_config: Any, mesh: Mesh) -> None:
  """Checks that the mesh splits the model's sharded axes evenly.

  `model_config` is an `LMConfig`-like object (num_heads, d_ff, vocab_size,
  moe with num_experts/expert_width). Raises ValueError naming the field.
  `fsdp` needs nothing to divide: a parameter it does not divide stays
  replicated over it (`param_spec`).
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
                       f"axis size {size} (mesh {mesh_spec(mesh)}); allowed: "
                       f"multiples of {size}")


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


def _cluster_launch(env: Mapping[str, str]) -> bool:
  """Whether `env` holds a cluster launch's settings (SLURM, a TPU pod, Open
  MPI); the single-host libtpu defaults of `moejax.platforms.QUIET_TPU_ENV`
  are not one, whether this process set them (a GPU machine with libtpu, an
  ahead-of-time compile) or inherited them from a parent process that did."""
  return any(env.get(k) and env.get(k) not in (platforms.SET.get(k),
                                               platforms.QUIET_TPU_ENV.get(k))
             for k in _DISTRIBUTED_ENV[1:])


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
      if not _cluster_launch(env):
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
  if _cluster_launch(env):
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
  probe = batch_shards(sharding.mesh)
  lo, hi = process_batch_rows(probe, sharding)
  return probe // (hi - lo)


def is_main_process() -> bool:
  """True on process 0 (the one that writes logs, plots and reports)."""
  return jax.process_index() == 0
