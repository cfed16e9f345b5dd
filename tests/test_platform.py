"""Quiet JAX start-up without a TPU: libtpu installed, no TPU attached, an
entry point prints none of libtpu's initialisation errors."""
import importlib.util
import os
import subprocess
import sys

import pytest

from moejax import platforms as platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NOISE = ("TPU", "libtpu", "E0000", "InitGoogle", "host bounds")


def test_defaults_per_machine():
  probe = dict(platform="linux", has_libtpu=True)
  env = {}
  assert platform.quiet_tpu_defaults(env, has_tpu=False, has_gpu=False,
                                     **probe) == {"JAX_PLATFORMS": "cpu"}
  assert env == {"JAX_PLATFORMS": "cpu"}
  env = {}
  platform.quiet_tpu_defaults(env, has_tpu=False, has_gpu=True, **probe)
  assert env == platform.QUIET_TPU_ENV  # the GPU stays usable
  for env, kw in (({}, dict(has_tpu=True, has_gpu=False)),  # a TPU: untouched
                  ({"JAX_PLATFORMS": ""}, dict(has_tpu=False, has_gpu=False)),
                  ({"TPU_WORKER_HOSTNAMES": "h"}, dict(has_tpu=False,
                                                       has_gpu=True))):
    before = dict(env)
    assert platform.quiet_tpu_defaults(env, **kw, **probe) == {}
    assert env == before
  assert platform.quiet_tpu_defaults({}, platform="darwin", has_libtpu=True,
                                     has_tpu=False, has_gpu=False) == {}
  assert platform.quiet_tpu_defaults({}, platform="linux", has_libtpu=False,
                                     has_tpu=False, has_gpu=False) == {}


def _stderr(code: str, **extra) -> str:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES",
                      "TPU_ACCELERATOR_TYPE")}
  # Without the lock libtpu takes for a TPU, every process would reach the
  # noisy initialisation (not only the first of several at once).
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT, **extra)
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return out.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: no noise")
@pytest.mark.skipif(bool(platform._any(platform.TPU_DEVICE_GLOBS)),
                    reason="a TPU is attached")
def test_entry_point_prints_no_tpu_noise():
  code = ("import moejax.cli.lm_flags, jax; "
          "assert jax.devices()[0].platform in ('cpu', 'gpu'), jax.devices()")
  err = _stderr(code)
  assert not [l for l in err.splitlines() if any(n in l for n in NOISE)], err
  # jax imported first (the notebooks do), moejax before any computation.
  err = _stderr("import jax, jax.numpy as jnp; import moejax; jnp.ones(2); "
                "assert jax.devices()[0].platform == 'cpu', jax.devices()")
  assert not [l for l in err.splitlines() if any(n in l for n in NOISE)], err
  # Without moejax, jax alone loads libtpu (the noise this prevents).
  noisy = _stderr("import jax; jax.devices()")
  assert any(n in noisy for n in NOISE), noisy


def test_libtpu_defaults_are_not_a_cluster_launch(monkeypatch):
  """On a GPU machine with libtpu, the TPU_WORKER_HOSTNAMES default set at
  import is not a TPU pod launch: the CLI must not call
  jax.distributed.initialize() (which failed with 'coordinator_address should
  be defined' on every run)."""
  from moejax import sharding
  environ = {}
  monkeypatch.setattr(platform.os, "environ", environ)
  monkeypatch.setattr(platform, "SET", {})
  assert platform.quiet_tpu_defaults(platform="linux", has_libtpu=True,
                                     has_tpu=False, has_gpu=True)
  assert environ == platform.SET == platform.QUIET_TPU_ENV
  assert not sharding.maybe_initialize_distributed(env=environ)
  with pytest.raises(ValueError, match="missing: process_id"):
    sharding.maybe_initialize_distributed(env={
        **environ, "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


def test_inherited_libtpu_defaults_are_not_a_cluster_launch(monkeypatch):
  """A child process inherits the defaults a parent's ahead-of-time compile
  set (its own `SET` is empty): still not a pod launch (the CLI run by a test
  after an AOT test in the same worker failed with 'coordinator_address
  should be defined'); a real pod's worker list still is."""
  from moejax import sharding
  monkeypatch.setattr(platform, "SET", {})
  assert not sharding.maybe_initialize_distributed(
      env=dict(platform.QUIET_TPU_ENV))
  assert sharding._cluster_launch({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed")
@pytest.mark.skipif(bool(platform._any(platform.TPU_DEVICE_GLOBS)),
                    reason="a TPU is attached")
def test_topology_for_an_ahead_of_time_compile_loads_libtpu_quietly():
  err = _stderr("from moejax import aot; chip, devices = aot.topology_devices("
                "'v5e:2x2'); assert len(devices) == 4, devices")
  assert not [l for l in err.splitlines() if any(n in l for n in NOISE)], err
