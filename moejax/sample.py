"""Autoregressive sampling (greedy or temperature) from a `TransformerLM`.

Axis legend:
  B  batch
  T  buffer length (prompt + new tokens)
  V  vocabulary

Models whose routing is causal token by token (dense, MoD with its causal
decisions, MoE with token-choice routers) are decoded with the KV cache of
`moejax.decode` (prefill + jit-compiled decode steps). Otherwise the whole
decode is one jit-compiled `lax.fori_loop` over a fixed-size token buffer, so
shapes are static; each step reruns the causal forward pass over the buffer
(routing in evaluation mode, MoD blocks with their causal decisions,
controllers frozen at their saved values) and reads the logits at the current
position.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import decode


@partial(jax.jit, static_argnames=("model", "num_new", "temperature"))
def _sample(model: nn.Module, params: Any, router_state: Any,
            buffer: jax.Array, prompt_len: jax.Array, rng: jax.Array,
            num_new: int, temperature: float) -> jax.Array:
  def body(i, carry):
    buf, key = carry
    pos = prompt_len + i
    extra = ({"mod_routing": "causal"}
             if getattr(getattr(model, "config", None), "mod_capacity", 0)
             else {})
    logits = model.apply({"params": params, "router_state": router_state}, buf,
                         train=False, **extra)
    step_logits = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1,
                                               keepdims=False)  # [B, V]
    key, sub = jax.random.split(key)
    if temperature == 0.0:
      token = jnp.argmax(step_logits, axis=-1)
    else:
      token = jax.random.categorical(sub, step_logits / temperature, axis=-1)
    buf = jax.lax.dynamic_update_index_in_dim(buf, token.astype(buf.dtype), pos,
                                              axis=1)
    return buf, key
  buffer, _ = jax.lax.fori_loop(0, num_new, body, (buffer, rng))
  return buffer


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
  if temperature < 0:
    raise ValueError(f"temperature={temperature} is out of range; allowed: >= 0")
  if num_new < 1:
    raise ValueError(f"num_new={num_new} is out of range; allowed: >= 1")
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be int32[B, P] with P >= 1, got {prompt.shape}")
  batch, plen = prompt.shape
  buffer = np.zeros((batch, plen + num_new), np.int32)
  buffer[:, :plen] = prompt
  rng = jax.random.PRNGKey(0) if rng is None else rng
  config = getattr(model, "config", None)
  if config is not None and hasattr(config, "mod_capacity") and \
      decode.supports(config):
    return decode.generate(config, params, router_state, prompt, num_new,
                           temperature=float(temperature), rng=rng)
  out = _sample(model, params, router_state, jnp.asarray(buffer),
                jnp.asarray(plen, jnp.int32), rng, num_new, float(temperature))
  return np.asarray(out)[:, plen:]
