"""Test setup: 8 forced host devices (set before jax is imported), quiet logs."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.logging  # noqa: E402

absl.logging.set_verbosity(absl.logging.WARNING)
