"""Autoregressive sampling from a `TransformerLM` (dense, MoE, MoD, MoDE).

Axis legend:
  B  batch
  P  prompt length
  L  new tokens in one call (the prompt in `prefill`, 1 in `decode_step`)
  T  cache length (prompt + new tokens)
  M  routed (MoD) blocks
  V  vocabulary

The sampling loop only: the model's cached decode path
(`TransformerLM.decode`, caches from `moejax.models.lm.init_cache`) does the
forward pass. `prefill` runs the prompt once, then one jit-compiled
`lax.fori_loop` picks a token (greedy, or from softmax(logits / temperature))
and runs it through the cached model. Everything has static shapes: `prefill`
compiles once per prompt shape, `decode_step` once per (B, T).

Models whose evaluation routing is causal token by token (dense, MoD with its
causal decisions, MoE with token-local routers) are decoded with the cache.
Otherwise (`supports` is False) each step reruns the causal forward pass over a
fixed-size token buffer (prompt, tokens so far, zeros after; routing in
evaluation mode, MoD blocks with their causal decisions, controllers frozen at
their saved values) and reads the logits at the current position. `sample`
is the tasks' entry point (the model object in, generated tokens out).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# `init_cache` and `SKIPS` are part of this module's interface.
from moejax.models import scan
from moejax.models.lm import LMConfig, TransformerLM, init_cache
from moejax.nn.mod import SKIPS
from moejax.nn.moe import MoEConfig



def token_local(moe: MoEConfig | None) -> bool:
  """Whether an MoE layer routes each token on its own in evaluation (the
  method's declared `token_local`)."""
  if moe is None:
    return True
  return moe.router.token_local


def supports(cfg: LMConfig) -> bool:
  """Whether cached decoding reproduces the (causal) full forward pass."""
  return token_local(cfg.moe)


def _variables(params, router_state) -> dict:
  variables = {"params": params}
  if router_state:
    variables["router_state"] = router_state
  return variables


def _decode(cfg: LMConfig, params, router_state, tokens, start, cache, skip):
  """`TransformerLM.decode`: (logits [B, L, V], cache, decisions [B, M, L])."""
  return TransformerLM(cfg).apply(_variables(params, router_state), tokens,
                                  start, cache, skip=skip,
                                  method=TransformerLM.decode)


@partial(jax.jit, static_argnames=("cfg", "skip"))
def prefill(cfg: LMConfig, params, router_state, tokens, cache, *,
            skip: str = "cond"):
  """The prompt int32[B, P] at positions 0..P-1 -> (logits [B, P, V], cache,
  decisions [B, M, P])."""
  return _decode(cfg, params, router_state, tokens, jnp.int32(0), cache, skip)


@partial(jax.jit, static_argnames=("cfg", "skip"), donate_argnames=("cache",))
def decode_step(cfg: LMConfig, params, router_state, token, position, cache, *,
                skip: str = "cond"):
  """One token int32[B] at position int32[] -> (logits [B, V], cache,
  decisions [B, M])."""
  logits, cache, dec = _decode(cfg, params, router_state, token[:, None],
                               position, cache, skip)
  return logits[:, 0], cache, dec[..., 0]


def _pick(logits, key, temperature, vocab=None):
  """A token per row of `logits` [B, V], among the first `vocab` ids (all
  when None: a tokenizer's ids below the model's padded vocabulary)."""
  if vocab is not None and vocab < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits,
                       -jnp.inf)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature,
                                axis=-1).astype(jnp.int32)


def _loop(step, logits, state, start, rng, num_steps, temperature,
          num_decisions, vocab=None):
  """The sampling loop.

  Picks a token from `logits` float32[B, V], then `num_steps` times runs it
  with `step(token int32[B], position, state) -> (logits [B, V], state,
  decisions bool[B, M])` and picks the next. Every pick with temperature > 0
  draws with a fresh key split off `rng`.
  Returns (tokens int32[B, num_steps + 1], state, decisions bool[B, M, steps]).
  """
  batch = logits.shape[0]

  def body(i, carry):
    logits, state, out, dec, key = carry
    sub = key
    if temperature != 0.0:  # greedy decoding needs no random numbers
      key, sub = jax.random.split(key)
    token = _pick(logits, sub, temperature, vocab)
    out = out.at[:, i].set(token)
    logits, state, d = step(token, start + i, state)
    dec = dec.at[:, :, i].set(d)
    return logits, state, out, dec, key

  out = jnp.zeros((batch, num_steps + 1), jnp.int32)
  dec = jnp.zeros((batch, num_decisions, max(num_steps, 1)), bool)
  logits, state, out, dec, key = jax.lax.fori_loop(
      0, num_steps, body, (logits, state, out, dec, rng))
  last = jax.random.split(key)[1] if temperature != 0.0 else key
  out = out.at[:, num_steps].set(_pick(logits, last, temperature, vocab))
  return out, state, dec[:, :, :num_steps]


@partial(jax.jit, static_argnames=("cfg", "num_steps", "temperature", "skip",
                                   "vocab"))
def decode_loop(cfg: LMConfig, params, router_state, logits, cache, start, rng,
                *, num_steps: int, temperature: float = 0.0,
                skip: str = "cond", vocab: int | None = None):
  """Picks a token from `logits` float32[B, V], then `num_steps` cached steps.

  Returns (tokens int32[B, num_steps + 1], cache, decisions bool[B, M, steps]).
  """
  def step(token, position, cache):
    logits, cache, dec = _decode(cfg, params, router_state, token[:, None],
                                 position, cache, skip)
    return logits[:, 0], cache, dec[..., 0]
  num_mod = sum(cfg.is_mod_layer(i) for i in range(cfg.num_layers))
  return _loop(step, logits, cache, start, rng, num_steps, temperature,
               num_mod, vocab)


@partial(jax.jit, static_argnames=("cfg", "num_new", "temperature", "vocab"))
def _recompute(cfg: LMConfig, params, router_state, buffer, prompt_len, rng, *,
               num_new: int, temperature: float, vocab: int | None = None):
  """Sampling without a cache: the causal forward pass over the whole buffer
  int32[B, T] each step. Returns the buffer with the new tokens."""
  extra = {"mod_routing": "causal"} if cfg.mod is not None else {}
  variables = _variables(params, router_state)

  def logits_at(buffer, position):
    logits = TransformerLM(cfg).apply(variables, buffer, **extra)
    return jax.lax.dynamic_index_in_dim(logits, position, axis=1,
                                        keepdims=False)

  def step(token, position, buffer):
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, position,
                                                 axis=1)
    return (logits_at(buffer, position), buffer,
            jnp.zeros((buffer.shape[0], 0), bool))

  out, _, _ = _loop(step, logits_at(buffer, prompt_len - 1), buffer,
                    prompt_len, rng, num_new - 1, temperature, 0, vocab)
  return out


def generate(cfg: LMConfig, params, router_state, prompt, num_new: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None,
             skip: str = "cond", vocab: int | None = None) -> np.ndarray:
  """Continues each prompt by `num_new` tokens.

  Args:
    cfg: the model's `LMConfig`.
    params, router_state: the model's variables (boxed or not).
    prompt: int32[B, P] prompt tokens (P >= 1).
    num_new: tokens to generate (>= 1).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    rng: PRNG key for temperature sampling (default `PRNGKey(0)`).
    skip: "cond" or "mask" (cached decoding of MoD blocks, `moejax.nn.mod`).
    vocab: pick only ids below it (a tokenizer's vocabulary, smaller than
      the model's padded one); None: any id.
  Returns:
    int32[B, num_new] generated tokens.
  """
  if temperature < 0:
    raise ValueError(f"temperature={temperature} is out of range; allowed: >= 0")
  if num_new < 1:
    raise ValueError(f"num_new={num_new} is out of range; allowed: >= 1")
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be int32[B, P] with P >= 1, got {prompt.shape}")
  batch, plen = prompt.shape
  params = nn.meta.unbox(params)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  temperature = float(temperature)
  if not supports(cfg):
    buffer = jnp.zeros((batch, plen + num_new), jnp.int32).at[:, :plen].set(
        prompt)
    return np.asarray(_recompute(cfg, params, router_state, buffer,
                                 jnp.int32(plen), rng, num_new=num_new,
                                 temperature=temperature, vocab=vocab))
  cache = init_cache(cfg, batch, plen + num_new)
  logits, cache, _ = prefill(cfg, params, router_state, prompt, cache,
                             skip=skip)
  out, _, _ = decode_loop(cfg, params, router_state, logits[:, -1], cache,
                          jnp.int32(plen), rng, num_steps=num_new - 1,
                          temperature=temperature, skip=skip, vocab=vocab)
  return np.asarray(out)


def sample(model: nn.Module, params: Any, router_state: Any,
           prompt: np.ndarray, num_new: int, *, temperature: float = 0.0,
           rng: jax.Array | None = None, vocab: int | None = None
           ) -> np.ndarray:
  """Continues each prompt by `num_new` tokens.

  Args:
    model: the `TransformerLM`.
    params, router_state: from the train state.
    prompt: int32[B, P] prompt tokens (P >= 1).
    num_new: tokens to generate.
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    rng: PRNG key for temperature sampling.
    vocab: sample only ids below it (the tokenizer's vocabulary, when the
      model's is padded beyond it); None: any id.
  Returns:
    int32[B, num_new] generated tokens.
  """
  return generate(model.config, params, router_state, prompt, num_new,
                  temperature=temperature, rng=rng, vocab=vocab)


def calibrate_predictor(model, params, tokens, capacity: float):
  """Sets each routed block's predictor bias so ~`capacity` of tokens enter.

  For measuring decode speed with untrained weights (the speed of a routed
  model depends on how many tokens enter its blocks). Returns new params.

  Layer by layer (a routed block's input depends on the earlier decisions):
  the bias is minus the (1 - capacity) quantile of its predictor's logits on
  `tokens` under causal routing. A layer-scanned model's params are
  calibrated in the unrolled layout (the same function) and restacked.
  """
  cfg = model.config
  plan = scan.scan_plan(cfg)
  if plan is not None:
    unrolled = TransformerLM(dataclasses.replace(cfg, scan_layers=False))
    return scan.stack_layers(calibrate_predictor(
        unrolled, scan.unstack_layers(params), tokens, capacity), plan)
  params = jax.tree.map(lambda a: a, params)  # new containers, same arrays
  for i in range(cfg.num_layers):
    if not cfg.is_mod_layer(i):
      continue
    _, inter = model.apply(
        {"params": params}, tokens, mod_routing="causal",
        capture_intermediates=lambda mdl, _: mdl.name == "predictor",
        mutable=["intermediates"])
    logits = np.asarray(
        inter["intermediates"][f"layers_{i}"]["predictor"]["__call__"][0])
    bias = params[f"layers_{i}"]["predictor"]["out"]["bias"]
    shift = float(np.quantile(logits, 1.0 - capacity))
    params[f"layers_{i}"]["predictor"]["out"]["bias"] = bias - jnp.float32(
        shift)
  return params
