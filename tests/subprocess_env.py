"""The environment of the subprocesses that tests start as a user would run
them (the CLI, the accelerator check's dry run, the notebooks' kernels)."""
import os
import re


def one_device_env(**extra: str) -> dict[str, str]:
  """This process's environment plus `extra`, without the forced host devices
  of the test setup (conftest.py): one CPU device, as a user's machine or a
  one-accelerator run has. Everything else (the session's compilation cache,
  JAX_PLATFORMS) is inherited."""
  env = dict(os.environ, **extra)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  return env
