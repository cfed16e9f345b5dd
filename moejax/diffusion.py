"""DDPM noise schedules, the denoising loss and a DDIM sampler.

Axis legend:
  B  batch
  H, W, C  image height, width, channels
  T  diffusion timesteps (t = 0 is the least noisy, T - 1 the noisiest)
  N  sampler steps

The forward process is `x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps` with
`ab_t = prod_{s <= t} (1 - beta_s)` ("alpha bar"). The model predicts `eps`
(epsilon prediction, Ho et al. 2020) or `v = sqrt(ab) eps - sqrt(1 - ab) x_0`
(Salimans & Ho 2022); the loss is the mean squared error to that target.
`ddim_sample` runs deterministic (eta = 0) or stochastic DDIM (Song et al. 2021)
inside one `lax.fori_loop`, with optional classifier-free guidance (Ho &
Salimans 2022): `eps = eps_uncond + w (eps_cond - eps_uncond)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.checks import check_choice, check_int_fields

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("epsilon", "v")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The noise process and the prediction target.

  Attributes:
    num_timesteps: T, discrete training timesteps (>= 2).
    schedule: "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020).
    beta_start, beta_end: the linear schedule's betas at t = 0 and T - 1,
      given for T = 1000 and rescaled by 1000 / T (0 < start <= end < 1).
    cosine_s: the cosine schedule's offset s (>= 0).
    prediction: "epsilon" or "v".
  """
  num_timesteps: int = 1000
  schedule: str = "cosine"
  beta_start: float = 1e-4
  beta_end: float = 0.02
  cosine_s: float = 0.008
  prediction: str = "epsilon"

  def __post_init__(self):
    check_int_fields(self, ("num_timesteps",), 2)
    check_choice("schedule", self.schedule, SCHEDULES)
    check_choice("prediction", self.prediction, PREDICTIONS)
    if not 0 < self.beta_start < 1:
      raise ValueError(f"beta_start={self.beta_start} is out of range; "
                       "allowed: (0, 1)")
    if not self.beta_start <= self.beta_end < 1:
      raise ValueError(f"beta_end={self.beta_end} is out of range; allowed: "
                       f"[beta_start={self.beta_start}, 1)")
    if self.cosine_s < 0:
      raise ValueError(f"cosine_s={self.cosine_s} is out of range; allowed: "
                       ">= 0")

  def betas(self) -> np.ndarray:
    """float64[T] noise variances beta_t."""
    t_max = self.num_timesteps
    if self.schedule == "linear":
      scale = 1000.0 / t_max
      return np.linspace(scale * self.beta_start, min(scale * self.beta_end,
                                                      0.999), t_max)
    steps = np.arange(t_max + 1, dtype=np.float64) / t_max
    f = np.cos((steps + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)

  def alpha_bar(self) -> np.ndarray:
    """float32[T]: ab_t = prod_{s <= t} (1 - beta_s), decreasing in t."""
    return np.cumprod(1.0 - self.betas()).astype(np.float32)


def _bcast(values: jax.Array, ndim: int) -> jax.Array:
  """float[B] -> float[B, 1, ..., 1] with `ndim` axes in all."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def stratified_timesteps(rng: jax.Array, batch: int,
                         num_timesteps: int) -> jax.Array:
  """int32[B]: t_i uniform in [i T / B, (i + 1) T / B) (marginally uniform).

  Every timestep range is covered in every batch, which lowers the variance of
  the loss and gives each timestep bucket the same number of examples.
  """
  u = jax.random.uniform(rng, (batch,))
  t = jnp.floor((jnp.arange(batch) + u) * num_timesteps / batch)
  return jnp.clip(t, 0, num_timesteps - 1).astype(jnp.int32)


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array,
             alpha_bar: jax.Array) -> jax.Array:
  """Noised images: x0, noise float32[B, H, W, C], t int32[B] -> [B, H, W, C]."""
  ab = _bcast(jnp.asarray(alpha_bar)[t], x0.ndim)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def target(x0: jax.Array, noise: jax.Array, t: jax.Array,
           alpha_bar: jax.Array, prediction: str) -> jax.Array:
  """The regression target float32[B, H, W, C]: eps, or v."""
  if prediction == "epsilon":
    return noise
  if prediction == "v":
    ab = _bcast(jnp.asarray(alpha_bar)[t], x0.ndim)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
  raise ValueError(f"prediction={prediction!r} is not supported; allowed: "
                   f"{', '.join(PREDICTIONS)}")


def to_eps(model_out: jax.Array, x_t: jax.Array, ab: jax.Array,
           prediction: str) -> jax.Array:
  """Epsilon from the model output. ab float32[B] (or broadcastable)."""
  if prediction == "epsilon":
    return model_out
  ab = _bcast(jnp.asarray(ab), x_t.ndim)
  return jnp.sqrt(ab) * model_out + jnp.sqrt(1.0 - ab) * x_t


def per_example_loss(model_out: jax.Array, tgt: jax.Array) -> jax.Array:
  """Mean squared error per example: float32[B, H, W, C] x2 -> float32[B]."""
  err = (model_out.astype(jnp.float32) - tgt.astype(jnp.float32)) ** 2
  return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """int32[N]: descending, evenly spaced timesteps from T - 1 to 0."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not (
      1 <= num_steps <= num_timesteps):
    raise ValueError(f"num_steps={num_steps!r} is out of range; allowed: "
                     f"integer in [1, num_timesteps={num_timesteps}]")
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "shape", "config", "num_steps", "eta", "guidance_scale",
    "null_label", "clip"))
def ddim_sample(apply_fn: Callable, variables, labels: jax.Array,
                rng: jax.Array, *, shape: tuple[int, ...],
                config: DiffusionConfig, num_steps: int = 50, eta: float = 0.0,
                guidance_scale: float = 1.0, null_label: int | None = None,
                clip: bool = True) -> jax.Array:
  """DDIM sampling of a class-conditional model.

  Args:
    apply_fn: hashable `(variables, x_t float32[B, H, W, C], t int32[B],
      labels int32[B]) -> model output [B, H, W, C]` (eps or v).
    variables: what `apply_fn` needs (params, router state).
    labels: int32[B] the classes to draw.
    rng: PRNG key (the initial noise and, with eta > 0, the step noise).
    shape: (H, W, C) of one image.
    config: the `DiffusionConfig` the model was trained with.
    num_steps: N sampler steps (1 <= N <= T).
    eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
    guidance_scale: w of classifier-free guidance; 1 = plain conditional
      sampling (one forward per step), otherwise two (needs `null_label`).
    null_label: the "no class" label the model was trained with.
    clip: clip the predicted x_0 to [-1, 1] at every step.
  Returns:
    float32[B, H, W, C] samples (in [-1, 1] when `clip`).
  """
  if guidance_scale != 1.0 and null_label is None:
    raise ValueError("guidance_scale != 1 needs null_label (the model's "
                     "unconditional class)")
  if eta < 0:
    raise ValueError(f"eta={eta} is out of range; allowed: >= 0")
  batch = labels.shape[0]
  alpha_bar = jnp.asarray(config.alpha_bar())
  ts = jnp.asarray(ddim_timesteps(config.num_timesteps, num_steps))
  init_rng, step_rng = jax.random.split(rng)
  x = jax.random.normal(init_rng, (batch,) + tuple(shape), jnp.float32)

  def eps_of(x, t):
    tb = jnp.full((batch,), t, jnp.int32)
    ab = alpha_bar[t]
    if guidance_scale == 1.0:
      return to_eps(apply_fn(variables, x, tb, labels), x, ab,
                    config.prediction)
    both = apply_fn(variables, jnp.concatenate([x, x]),
                    jnp.concatenate([tb, tb]),
                    jnp.concatenate([labels, jnp.full_like(labels,
                                                           null_label)]))
    eps = to_eps(both, jnp.concatenate([x, x]), ab, config.prediction)
    cond, uncond = eps[:batch], eps[batch:]
    return uncond + guidance_scale * (cond - uncond)

  def body(i, x):
    t = ts[i]
    ab = alpha_bar[t]
    ab_prev = jnp.where(i + 1 < num_steps,
                        alpha_bar[ts[jnp.minimum(i + 1, num_steps - 1)]], 1.0)
    eps = eps_of(x, t)
    x0 = (x - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    x = (jnp.sqrt(ab_prev) * x0
         + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma ** 2, 0.0)) * eps)
    if eta > 0:
      x = x + sigma * jax.random.normal(jax.random.fold_in(step_rng, i),
                                        x.shape)
    return x

  x = jax.lax.fori_loop(0, num_steps, body, x)
  return jnp.clip(x, -1.0, 1.0) if clip else x
