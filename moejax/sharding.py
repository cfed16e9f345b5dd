"""Device meshes and logical-axis sharding rules.

Mesh axes: `data` (batch), `expert` (experts), `model` (tensor parallel widths).
Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`,
`expert`); `LOGICAL_RULES` maps them onto mesh axes. The same code runs on one
CPU, forced host devices, a GPU or a TPU pod (multi-host: call
`maybe_initialize_distributed()` first).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")
LOGICAL_RULES = (
    ("batch", ("data", "expert")),
    ("expert", "expert"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
)


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """'data:2,expert:4' -> {'data': 2, 'expert': 4, 'model': 1}.

  An empty spec puts every device on `data`. Raises ValueError when an axis is
  unknown, a size is not a positive integer, or the sizes do not multiply to the
  number of devices.
  """
  sizes = {axis: 1 for axis in MESH_AXES}
  if not spec:
    sizes["data"] = num_devices
    return sizes
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    if name not in MESH_AXES:
      raise ValueError(f"mesh axis {name!r} in --mesh={spec!r} is unknown; "
                       f"allowed: {', '.join(MESH_AXES)}")
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
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over data (and expert) axes, the rest replicated."""
  return NamedSharding(mesh, P(("data", "expert")))


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for params annotated with logical axis names."""
  specs = nn.get_partition_spec(boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["expert"]
  if batch_size % shards:
    raise ValueError(f"batch_size={batch_size} must be divisible by the "
                     f"data*expert mesh size {shards}")


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when a multi-process launch is
  configured (JAX_COORDINATOR_ADDRESS / cluster env vars); returns whether it did."""
  keys = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
          "MEGASCALE_COORDINATOR_ADDRESS")
  if any(os.environ.get(k) for k in keys):
    jax.distributed.initialize()
    return True
  return False
