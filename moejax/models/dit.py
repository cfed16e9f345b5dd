"""Class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023) with routed MLPs.

Axis legend:
  B  batch
  H, W, C  image height, width, channels
  P  patch size (pixels per side)
  L  patches (tokens) per image: (H / P) * (W / P)
  D  model width
  K  classes (label K is the "no class" label of classifier-free guidance)

Images are cut into P x P patches, embedded linearly, and given a fixed 2-D
sin-cos position embedding. The timestep (sinusoidal features -> MLP) plus the
class embedding form the conditioning vector `c` [B, D], which modulates every
block through adaLN-Zero: per block a zero-initialised linear map of SiLU(c)
gives shift, scale and gate for the attention and the MLP branches, so every
block is the identity at initialisation. Attention is non-causal (`Attention(
causal=False)`; positions are all zero, so RoPE is the identity and position
enters only through the sin-cos embedding). The MLPs are `MoE` layers with any
router config (`MoEConfig`), or dense. The model predicts eps (or v) per pixel;
the MoE layers sow into the `"router"` collection as in the LM.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.checks import check_choice, check_positive_ints
from moejax.experts import ACTIVATIONS
from moejax.nn.blocks import DTYPES, BlockBase, StackConfig

@dataclasses.dataclass(frozen=True)
class DiTConfig(StackConfig):
  """A class-conditional DiT: the fields of `StackConfig` and these.

  Attributes:
    image_size: H = W of the (square) images.
    channels: C.
    patch_size: P, must divide `image_size`.
    num_classes: K (labels 0..K-1; K is the null label).
    activation: of the dense MLPs ("swiglu" or "gelu").
    class_dropout: probability of replacing the label by the null label in
      training (classifier-free guidance), in [0, 1).
    frequency_dim: sinusoidal features of the timestep (even, >= 2).
  """
  image_size: int = 8
  channels: int = 1
  patch_size: int = 2
  num_classes: int = 10
  activation: str = "swiglu"
  class_dropout: float = 0.1
  frequency_dim: int = 128

  def __post_init__(self):
    super().__post_init__()
    check_positive_ints(self, ("image_size", "channels", "patch_size",
                               "num_classes", "frequency_dim"))
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} must divide image_size="
                       f"{self.image_size}")
    if self.d_model % 4:
      raise ValueError(f"d_model={self.d_model} is out of range; allowed: a "
                       "multiple of 4 (2-D sin-cos position embedding)")
    if self.frequency_dim % 2:
      raise ValueError(f"frequency_dim={self.frequency_dim} is out of range; "
                       "allowed: even")
    if not 0 <= self.class_dropout < 1:
      raise ValueError(f"class_dropout={self.class_dropout} is out of range; "
                       "allowed: [0, 1)")
    check_choice("activation", self.activation, ACTIVATIONS)

  @property
  def grid(self) -> int:
    """Patches per side, H / P."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """L, tokens per image."""
    return self.grid ** 2

  @property
  def null_label(self) -> int:
    return self.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def is_moe_layer(self, i: int) -> bool:
    return self.moe is not None and (i + 1) % self.moe_every == 0

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """float[B, H, W, C] -> float[B, L, P * P * C] (row-major patches)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: jax.Array, patch: int, channels: int) -> jax.Array:
  """float[B, L, P * P * C] -> float[B, H, W, C] (inverse of `patchify`)."""
  b, length, _ = x.shape
  grid = int(round(length ** 0.5))
  x = x.reshape(b, grid, grid, patch, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * patch, grid * patch, channels)


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """float32[grid * grid, width]: fixed 2-D sin-cos embedding (MAE / DiT)."""
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def one(pos):
    angle = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
  return np.concatenate([one(ys), one(xs)], axis=1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int,
                      max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of timesteps: t int/float[B] -> float32[B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  angle = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x float[B, L, D], shift/scale float[B, D] -> x * (1 + scale) + shift."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _norm(dtype, name):
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False,
                      dtype=dtype, name=name)


class DiTBlock(BlockBase):
  """adaLN-Zero block: x float[B, L, D], c float[B, D] -> float[B, L, D]."""

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    mod = nn.Dense(6 * width, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="adaln")(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    positions = jnp.zeros(x.shape[:2], jnp.int32)  # RoPE off: sin-cos instead
    h, _ = self._attention(causal=False)(
        modulate(_norm(self.dtype, "attn_norm")(x), shift1, scale1), positions)
    x = x + gate1[:, None, :] * h
    z = modulate(_norm(self.dtype, "mlp_norm")(x), shift2, scale2)
    return x + gate2[:, None, :] * self._mlp(z, train=train)


class DiT(nn.Module):
  """(x_t float[B, H, W, C], t int32[B], labels int32[B]) -> float32[B, H, W, C].

  The output is the model's eps (or v) prediction; `labels == num_classes` is
  the unconditional (null) label.
  """
  config: DiTConfig

  @nn.compact
  def __call__(self, images: jax.Array, t: jax.Array, labels: jax.Array, *,
               train: bool = False) -> jax.Array:
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    if images.shape[1:] != cfg.image_shape:
      raise ValueError(f"images have shape {list(images.shape[1:])} per "
                       f"example; the config wants {list(cfg.image_shape)}")
    width = cfg.d_model
    x = nn.Dense(width, dtype=dtype, name="patch_embed")(
        patchify(images.astype(dtype), cfg.patch_size))
    x = x + jnp.asarray(sincos_2d(cfg.grid, width), dtype)[None]

    temb = timestep_features(t, cfg.frequency_dim)
    temb = nn.Dense(width, name="t_embed_0")(temb)
    temb = nn.Dense(width, name="t_embed_1")(nn.silu(temb))
    yemb = nn.Embed(cfg.num_classes + 1, width,
                    embedding_init=nn.initializers.normal(0.02),
                    name="y_embed")(labels)
    c = (temb + yemb).astype(dtype)

    for i in range(cfg.num_layers):
      x = DiTBlock(cfg.num_heads, cfg.d_ff,
                   cfg.moe if cfg.is_moe_layer(i) else None, cfg.activation,
                   dtype=dtype, num_kv_heads=cfg.num_kv_heads,
                   attention=cfg.attention, name=f"layers_{i}")(
                       x, c, train=train)

    shift, scale = jnp.split(
        nn.Dense(2 * width, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros, dtype=dtype,
                 name="final_adaln")(nn.silu(c)), 2, axis=-1)
    x = modulate(_norm(dtype, "final_norm")(x), shift, scale)
    out = nn.Dense(cfg.patch_size ** 2 * cfg.channels,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, dtype=jnp.float32,
                   name="final")(x)
    return unpatchify(out.astype(jnp.float32), cfg.patch_size, cfg.channels)


def batch_multiple(cfg: DiTConfig) -> int:
  """Smallest batch unit whose tokens split into the MoE routing groups."""
  size = cfg.moe.group_size if cfg.moe is not None else None
  if not size:
    return 1
  return math.lcm(cfg.num_patches, size) // cfg.num_patches


def init_variables(model: DiT, rng: jax.Array, batch: int | None = None):
  """Returns (boxed params, router_state) of `model` (no sown outputs)."""
  cfg = model.config
  batch = batch_multiple(cfg) if batch is None else batch
  key = (model, batch)
  if key not in _INIT_FNS:
    def init(rng):  # jitted: one compile instead of one per primitive
      variables = model.init(
          {"params": rng, "router": rng},
          jnp.zeros((batch,) + cfg.image_shape, jnp.float32),
          jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
          train=False)
      return variables["params"], variables.get("router_state", {})
    _INIT_FNS[key] = jax.jit(init)
  return _INIT_FNS[key](rng)


_INIT_FNS: dict[tuple[Any, ...], Any] = {}


_APPLY_FNS: dict[DiT, Any] = {}


def make_apply_fn(model: DiT):
  """`(variables, x_t, t, labels) -> output` for `diffusion.ddim_sample` (eval mode).

  One function per model (cached), so that repeated sampling does not recompile.
  """
  if model not in _APPLY_FNS:
    def apply_fn(variables, x, t, labels):
      return model.apply(variables, x, t, labels, train=False)
    _APPLY_FNS[model] = apply_fn
  return _APPLY_FNS[model]


def sample(model: DiT, params, router_state, labels, rng, *, diffusion,
           num_steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0,
           clip: bool = True) -> jax.Array:
  """DDIM samples float32[B, H, W, C] of the classes `labels` int32[B].

  `diffusion` is the `DiffusionConfig` the model was trained with. With MoE
  routing groups spanning several images, the batch is padded (label 0) to
  fill whole groups; the padding is dropped from the result.
  """
  from moejax import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
  variables = {"params": params}
  if router_state:
    variables["router_state"] = router_state
  labels = jnp.asarray(labels, jnp.int32)
  count = labels.shape[0]
  unit = batch_multiple(model.config)  # pad so that routing groups fill up
  padded = -(-count // unit) * unit
  if padded != count:
    labels = jnp.concatenate([labels, jnp.zeros(padded - count, jnp.int32)])
  out = diffusion_lib.ddim_sample(
      make_apply_fn(model), variables, labels, rng,
      shape=model.config.image_shape, config=diffusion, num_steps=num_steps,
      eta=eta, guidance_scale=guidance_scale,
      null_label=model.config.null_label, clip=clip)
  return out[:count]
