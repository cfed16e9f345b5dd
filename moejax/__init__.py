"""moejax: Mixture-of-Experts and Mixture-of-Depths routing in JAX/Flax.

Importing the package first sets quiet JAX platform defaults on a machine
without a TPU (`moejax.platforms`); nothing else happens at import.
"""
from moejax import platforms as _platforms

_platforms.quiet_tpu_defaults()
