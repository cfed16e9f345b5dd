"""Quiet JAX start-up on machines without a TPU (imported before jax).

With `libtpu` installed (the `tpu` and `test` extras install it), every JAX
program tries the TPU backend first. On a machine without a TPU that prints
libtpu's initialisation errors (`Failed to find host bounds...`, `E0000 ...
unexpected worker hostname...`) and, with several programs at once, a libtpu
lockfile error. `quiet_tpu_defaults` (called when `moejax` is imported, before
jax is) sets environment defaults only where nothing is set already, and only
on Linux with libtpu installed and no TPU device (`/dev/accel*`, `/dev/vfio/*`):

  - no GPU device either (`/dev/nvidia*`, `/dev/kfd`): `JAX_PLATFORMS=cpu`, so
    libtpu is never loaded;
  - a GPU: `TPU_WORKER_HOSTNAMES` / `TPU_ACCELERATOR_TYPE` defaults, with which
    libtpu gives up quietly and JAX picks the GPU.

A TPU machine is left alone, and so is any process that set `JAX_PLATFORMS`
(an empty value included). Ahead-of-time compiles for TPU topologies
(`moejax.aot`) load libtpu's compiler whatever the platform, so they keep
working; they set the worker defaults first (`quiet_libtpu_env`), quiet too.
What this module set is in `SET` (not a TPU pod launch's settings). Importing `moejax` after `jax` works too, as long as no JAX
computation or device query came before.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import MutableMapping

TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/*")
GPU_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/kfd")
# libtpu's own discovery of a non-existent slice, answered in advance.
QUIET_TPU_ENV = {"TPU_WORKER_HOSTNAMES": "localhost",
                 "TPU_ACCELERATOR_TYPE": "v5litepod-1"}


# What `quiet_tpu_defaults` set in this process's environment: not a cluster
# launch's settings (`moejax.sharding.maybe_initialize_distributed`).
SET: dict[str, str] = {}


def _any(patterns) -> bool:
  return any(glob.glob(p) for p in patterns)


def quiet_tpu_defaults(environ: MutableMapping[str, str] | None = None, *,
                       platform: str = sys.platform,
                       has_libtpu: bool | None = None,
                       has_tpu: bool | None = None,
                       has_gpu: bool | None = None) -> dict[str, str]:
  """Sets the defaults above in `environ` (default `os.environ`).

  The keyword arguments override the probes (for tests). Returns the
  variables it set ({} when it left everything alone).
  """
  environ = os.environ if environ is None else environ
  if not platform.startswith("linux") or "JAX_PLATFORMS" in environ:
    return {}
  if has_libtpu is None:
    has_libtpu = importlib.util.find_spec("libtpu") is not None
  if has_tpu is None:
    has_tpu = _any(TPU_DEVICE_GLOBS)
  if not has_libtpu or has_tpu:
    return {}
  if has_gpu is None:
    has_gpu = _any(GPU_DEVICE_GLOBS)
  if has_gpu:
    return quiet_libtpu_env(environ, has_tpu=False)
  environ["JAX_PLATFORMS"] = "cpu"
  if environ is os.environ:
    SET["JAX_PLATFORMS"] = "cpu"
    _tell_imported_jax("cpu")
  return {"JAX_PLATFORMS": "cpu"}


def quiet_libtpu_env(environ: MutableMapping[str, str] | None = None, *,
                     has_tpu: bool | None = None) -> dict[str, str]:
  """libtpu's worker defaults (`QUIET_TPU_ENV`), with which libtpu starts
  without a slice's discovery errors: set where no TPU is attached and none
  of them is set already (someone configured libtpu on purpose). Also used
  before compiling for a TPU topology ahead of time (`moejax.aot`). Returns
  what it set."""
  environ = os.environ if environ is None else environ
  if has_tpu is None:
    has_tpu = _any(TPU_DEVICE_GLOBS)
  if has_tpu or any(k in environ for k in QUIET_TPU_ENV):
    return {}
  environ.update(QUIET_TPU_ENV)
  if environ is os.environ:
    SET.update(QUIET_TPU_ENV)
  return dict(QUIET_TPU_ENV)


def _tell_imported_jax(platforms: str) -> None:
  """jax reads `JAX_PLATFORMS` when it is imported: where it came first (a
  notebook's `import jax` before moejax) and has not started a backend yet,
  its setting is updated too (a started backend keeps its platform)."""
  jax = sys.modules.get("jax")
  config = getattr(jax, "config", None)
  if config is not None:
    config.update("jax_platforms", platforms)
