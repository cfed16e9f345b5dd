"""moejax: Mixture-of-Experts and Mixture-of-Depths routing in JAX/Flax.

Importing the package first sets quiet JAX platform defaults on a machine
without a TPU (`moejax.platform`); nothing else happens at import.
"""
from moejax import platform as _platform

_platform.quiet_tpu_defaults()
