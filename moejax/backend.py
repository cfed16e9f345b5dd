"""The one place where moejax looks at the backend (CPU, GPU, TPU).

Axis legend (of the layouts named here):
  S  tokens, E experts, m static bound on experts per token

Every backend-dependent choice of dispatch asks `current_backend()` through
the two choices below, so that the choice is made, and tested, in one place:
  `resolve_strategy`  "dropless" runs "sorted" on CPU (XLA:CPU has no grouped
                      matmul kernel) and "ragged" (`lax.ragged_dot`) elsewhere.
  `use_loop_matmul`   the block plans ("gather", "sorted") run a loop over
                      their used row blocks on CPU, where XLA runs small
                      batched matmuls poorly; accelerators prefer one batched
                      matmul.
  `use_one_hot_scatter` routers turn [S, K] choices into [S, E] rows with a
                      one-hot einsum on TPU (MXU) and a scatter-add elsewhere.
"""
from __future__ import annotations

import jax


def current_backend() -> str:
  """The default backend's platform name: "cpu", "gpu" or "tpu"."""
  return jax.default_backend()


def use_loop_matmul(backend: str | None = None) -> bool:
  """Whether block plans use a loop over their used blocks (CPU only)."""
  return (backend or current_backend()) == "cpu"


def use_one_hot_scatter(backend: str | None = None) -> bool:
  """Whether routers build [S, E] rows from [S, K] choices by one-hot einsum."""
  return (backend or current_backend()) == "tpu"


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """The implementation a strategy name runs: "dropless" is "sorted" on CPU
  and "ragged" elsewhere; other names are themselves."""
  if strategy != "dropless":
    return strategy
  return "sorted" if use_loop_matmul(backend) else "ragged"
