"""The train state: everything a run needs to continue exactly.

`TrainState` holds the step, params, optimizer state, `router_state` (every
controller's state: a pytree mirroring the model's routed layers, `{}` when no
router has a controller), the base PRNG key and the data position (the index of
the next training batch). orbax checkpoints save and restore all of it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32[]
  params: Any
  opt_state: Any
  router_state: Any
  rng: jax.Array           # uint32[2] base key; step keys are fold_in(rng, step)
  data_index: jax.Array    # int32[] next training batch


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay, gradient clipping.

  Attributes:
    learning_rate: peak learning rate (finite, > 0).
    warmup_steps: linear warmup steps (>= 0).
    total_steps: steps of the cosine schedule (>= 1).
    min_lr_ratio: final learning rate / peak, in [0, 1].
    weight_decay: decoupled weight decay (finite, >= 0), on matrices only.
    clip_norm: global gradient-norm clip (finite, > 0).
    b1, b2: Adam betas, in [0, 1).
  """
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  total_steps: int = 1000
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95

  def __post_init__(self):
    finite = lambda v: math.isfinite(v)
    checks = {
        "learning_rate": (finite(self.learning_rate)
                          and self.learning_rate > 0, "finite > 0"),
        "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
        "total_steps": (self.total_steps >= 1, ">= 1"),
        "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "[0, 1]"),
        "weight_decay": (finite(self.weight_decay)
                         and self.weight_decay >= 0, "finite >= 0"),
        "clip_norm": (finite(self.clip_norm) and self.clip_norm > 0,
                      "finite > 0"),
        "b1": (0 <= self.b1 < 1, "[0, 1)"),
        "b2": (0 <= self.b2 < 1, "[0, 1)"),
    }
    for name, (ok, allowed) in checks.items():
      if not ok:
        raise ValueError(f"{name}={getattr(self, name)} is out of range; "
                         f"allowed: {allowed}")

  def schedule(self) -> optax.Schedule:
    warmup = min(self.warmup_steps, max(self.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, self.learning_rate, warmup, max(self.total_steps, warmup + 1),
        self.learning_rate * self.min_lr_ratio)

  def optimizer(self) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(self.clip_norm),
        optax.adamw(self.schedule(), b1=self.b1, b2=self.b2,
                    weight_decay=self.weight_decay, mask=decay_mask))


def create_train_state(params, router_state, optimizer: optax.GradientTransformation,
                       rng: jax.Array, data_index: int = 0) -> TrainState:
  """Builds a fresh state from unboxed (or boxed) params."""
  params = nn.meta.unbox(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), router_state=router_state,
                    rng=rng, data_index=jnp.asarray(data_index, jnp.int32))
