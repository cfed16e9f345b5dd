"""The one place where moejax looks at the backend (CPU, GPU, TPU).

Axis legend (of the layouts named here):
  S  tokens, E experts, m static bound on experts per token

Every backend-dependent choice of dispatch asks `current_backend()` (the
platform of the current mesh's devices, else the default backend) through
the choices below, so that the choice is made, and tested, in one place:
  `choose_strategy`   "auto" (the default strategy) is the measured fastest
                      capacity strategy of the backend (`AUTO_STRATEGY`):
                      "gather" on every backend: on CPU it runs the fused
                      block loop, on GPU/TPU gather dispatch/combine around one
                      batched matmul. "auto" never picks a dropless strategy,
                      so the kept set (capacity drops) is that of "gather".
  `resolve_strategy`  the layout a name runs: "auto" as above; "dropless" runs
                      "sorted" on CPU (XLA:CPU has no grouped matmul kernel)
                      and "ragged" (`lax.ragged_dot`) elsewhere.
  `use_loop_matmul`   the block plans ("gather", "sorted") run a loop over
                      their used row blocks on CPU, where XLA runs small
                      batched matmuls poorly; accelerators prefer one batched
                      matmul.
  `choose_attention`  the attention implementation "auto" stands for
                      (`AUTO_ATTENTION`, see `moejax.nn.attention`).
  `use_cudnn`         whether "dot_product" attention asks for cuDNN's
                      fused flash kernel.
  `use_one_hot_scatter` routers turn [S, K] choices into [S, E] rows with a
                      one-hot einsum on TPU (MXU) and a scatter-add elsewhere;
                      plans read [S, E] gates at [S, m] experts with a select
                      over E on TPU and a gather elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def current_backend() -> str:
  """The platform a program is traced for: "cpu", "gpu" or "tpu".

  That of the current mesh's devices (`jax.set_mesh`) when it has devices,
  so that a program compiled ahead of time for TPU devices on a CPU host
  (`moejax.aot`) makes the TPU choices; else the default backend's.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = (None if mesh is None or mesh.empty
            else getattr(mesh, "abstract_device", None))
  platform = getattr(device, "platform", None)
  if platform:
    return "gpu" if platform in ("cuda", "rocm") else platform
  return jax.default_backend()


def use_loop_matmul(backend: str | None = None) -> bool:
  """Whether block plans use a loop over their used blocks (CPU only)."""
  return (backend or current_backend()) == "cpu"


def use_one_hot_scatter(backend: str | None = None) -> bool:
  """Whether [S, K] <-> [S, E] moves (routers' rows, plans' gates) use one-hot
  selects instead of scatters and gathers."""
  return (backend or current_backend()) == "tpu"


# "auto" per backend: the capacity strategy measured fastest there (CPU:
# "gather" 1.30 / 1.55 / 1.48 vs "index" 1.34 / 1.72 / 2.04 at the three
# reference sizes of experiments/reports/bench_moe.md; "sorted" is as fast but
# dropless). GPU/TPU: "gather" (slots by one sort, gather-only dispatch and
# combine, one batched matmul of static shape [G*E, C, D]) rather than the
# scatter-add of "index" or the one-hot "einsum" (O(S*E*C*D)); not measured
# on an accelerator yet.
AUTO_STRATEGY = {"cpu": "gather", "gpu": "gather", "tpu": "gather"}


def choose_strategy(strategy: str, backend: str | None = None) -> str:
  """The strategy name "auto" stands for on a backend (a capacity strategy,
  `AUTO_STRATEGY`); other names are themselves."""
  if strategy != "auto":
    return strategy
  return AUTO_STRATEGY.get(backend or current_backend(), "gather")


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """The implementation a strategy name runs: "auto" is `choose_strategy`'s,
  "dropless" is "sorted" on CPU and "ragged" elsewhere; other names are
  themselves."""
  strategy = choose_strategy(strategy, backend)
  if strategy != "dropless":
    return strategy
  return "sorted" if use_loop_matmul(backend) else "ragged"


# Attention "auto" per backend. CPU: "xla", the einsum reference; XLA:CPU has
# no fused attention kernel, and `jax.nn.dot_product_attention` runs the same
# einsums there. GPU: "dot_product", cuDNN's flash attention (no [B, H, L, T]
# scores in HBM) where it applies (`use_cudnn`), XLA's elsewhere. TPU:
# "splash", the Pallas splash kernel MaxText uses (blockwise, skips the
# masked blocks), for sequence lengths it tiles (multiples of 128; others
# would be padded), else "xla".
AUTO_ATTENTION = {"cpu": "xla", "gpu": "dot_product", "tpu": "splash"}
# Head widths and dtypes for which cuDNN's flash attention applies.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_WIDTH = 128


def choose_attention(name: str, length: int | None = None,
                     backend: str | None = None) -> str:
  """The attention implementation a name runs: "auto" is `AUTO_ATTENTION`'s
  for the backend ("xla" where splash would not tile `length`); other names
  are themselves."""
  if name != "auto":
    return name
  name = AUTO_ATTENTION.get(backend or current_backend(), "xla")
  if name == "splash" and length is not None and length % 128:
    return "xla"
  return name


def use_cudnn(dtype, head_width: int, backend: str | None = None) -> bool:
  """Whether "dot_product" attention of this dtype and head width runs cuDNN's
  fused kernel (GPU, bfloat16 / float16, head width a multiple of 8 up to
  `CUDNN_MAX_HEAD_WIDTH`) rather than XLA's implementation."""
  return ((backend or current_backend()) == "gpu"
          and jnp.dtype(dtype) in tuple(map(jnp.dtype, CUDNN_DTYPES))
          and head_width % 8 == 0 and head_width <= CUDNN_MAX_HEAD_WIDTH)
