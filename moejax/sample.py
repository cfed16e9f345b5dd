"""Autoregressive sampling (greedy or temperature) from a `TransformerLM`.

Axis legend:
  B  batch
  P  prompt length
  V  vocabulary

`sample` takes the model itself; the sampler is `moejax.decode.generate`
(cached decoding where the model's routing allows it, else a full causal
forward pass per step).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from moejax import decode


def sample(model: nn.Module, params: Any, router_state: Any,
           prompt: np.ndarray, num_new: int, *, temperature: float = 0.0,
           rng: jax.Array | None = None) -> np.ndarray:
  """Continues each prompt by `num_new` tokens.

  Args:
    model: the `TransformerLM`.
    params, router_state: from the train state.
    prompt: int32[B, P] prompt tokens (P >= 1).
    num_new: tokens to generate.
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    rng: PRNG key for temperature sampling.
  Returns:
    int32[B, num_new] generated tokens.
  """
  return decode.generate(model.config, params, router_state, prompt, num_new,
                         temperature=temperature, rng=rng)
