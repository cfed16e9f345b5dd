"""Cached autoregressive decoding for `TransformerLM` (dense, MoE, MoD, MoDE).

Axis legend:
  B  batch
  L  new tokens in one call (the prompt in `prefill`, 1 in `decode_step`)
  T  cache length (prompt + new tokens)
  H  heads
  K  head width
  D  model width
  V  vocabulary

The decoder runs the model's own parameters through the same Flax modules as
`TransformerLM` (norms, attention projections, MLP / MoE, MoD router and
predictor), applied layer by layer with a key/value cache per layer:
`{"k": float[B, H, T, K], "v": float[B, H, T, K], "pos": int32[B, T]}` (heads
major, so that the per-step attention products need no transposed copy of the
cache).
Slot t holds the token at position t; a slot that holds nothing has position
`PAD_POSITION`, larger than every real position, so the causal mask hides it.

A routed (MoD) block decides per token with the causal rule of the model
(`mod_causal`: the predictor's logit > 0, or the router's r > 0). It writes
keys/values only for the tokens it processed (the slots of skipped tokens keep
`PAD_POSITION`), so later tokens attend only to processed ones, exactly as the
full forward pass with `mod_routing="causal"`. Skipping is real: with
`skip="cond"` (default) the block runs under `lax.cond` only when at least one
row of the batch enters it (at batch 1: only for processed tokens); inside,
rows that do not enter are computed and masked. `skip="mask"` always computes
and masks (for measuring). MoE layers route each token on its own; a decode
step has one token per group so capacity never binds, and the prompt is run
with capacity for every token (the full forward pass with a large evaluation
capacity factor or "dropless" gives the same logits).

Everything is jit-compiled with static shapes: `prefill` once per prompt shape,
`decode_step` once per (B, T).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.experts import DenseFFN
from moejax.models.lm import DTYPES, LMConfig
from moejax.nn.attention import causal_mask, rope
from moejax.nn.mod import PAD_POSITION, Predictor, router_score
from moejax.nn.moe import MoE, MoEConfig

SKIPS = ("cond", "mask")
_TINY = float(jnp.finfo(jnp.float32).tiny)
# Routers whose evaluation routing of a token depends on other tokens of the
# group; a method can also declare `token_local = False` itself.
NON_LOCAL_ROUTERS = ("expert_choice",)


def token_local(moe: MoEConfig | None) -> bool:
  """Whether an MoE layer routes each token on its own in evaluation."""
  if moe is None:
    return True
  method = moe.router
  return bool(getattr(method, "token_local",
                      method.name not in NON_LOCAL_ROUTERS))


def supports(cfg: LMConfig) -> bool:
  """Whether cached decoding reproduces the (causal) full forward pass."""
  return token_local(cfg.moe)


def init_cache(cfg: LMConfig, batch: int, length: int) -> tuple[dict, ...]:
  """An empty cache: per layer k/v float[B, H, T, K] zeros, pos = PAD_POSITION."""
  dtype = DTYPES[cfg.dtype]
  head = cfg.d_model // cfg.num_heads
  shape = (batch, cfg.num_heads, length, head)
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "pos": jnp.full((batch, length), PAD_POSITION, jnp.int32)}
               for _ in range(cfg.num_layers))


def _decode_moe(moe: MoEConfig) -> MoEConfig:
  """The MoE config for decoding: one group per call, no token ever dropped."""
  return dataclasses.replace(moe, group_size=None,
                             eval_capacity_factor=float(moe.router_experts))


def _attention(p, x, positions, cache, valid, num_heads, dtype):
  """Attention over the cache after writing this call's keys/values.

  x float[B, L, D], positions int32[B, L] (the same run of positions in every
  row), valid bool[B, L] (the tokens whose keys/values are stored).
  """
  width = x.shape[-1]
  head = width // num_heads

  def proj(name, features, axis, inp):
    return nn.DenseGeneral(features, axis=axis, use_bias=False,
                           dtype=dtype).apply({"params": p[name]}, inp)
  q = rope(proj("query", (num_heads, head), -1, x), positions)
  k = rope(proj("key", (num_heads, head), -1, x), positions)
  v = proj("value", (num_heads, head), -1, x)
  start = positions[0, 0]
  write = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(
      buf, new.astype(buf.dtype), start, axis=axis)
  heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # [B, L, H, K] -> [B, H, L, K]
  cache = {"k": write(cache["k"], heads_major(k), 2),
           "v": write(cache["v"], heads_major(v), 2),
           "pos": write(cache["pos"], jnp.where(valid, positions, PAD_POSITION),
                        1)}
  # `attention.attend` with the cache's [B, H, T, K] layout.
  mask = causal_mask(positions, cache["pos"])
  scores = jnp.einsum("blhk,bhtk->bhlt", q, cache["k"]).astype(jnp.float32)
  scores = jnp.where(mask, scores * head ** -0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(cache["v"].dtype)
  out = jnp.einsum("bhlt,bhtk->blhk", probs, cache["v"])
  return proj("out", width, (-2, -1), out), cache


def _block(cfg: LMConfig, moe, p, rs, x, positions, cache, valid):
  """One Transformer block's update Δ (as `Block(residual=False)`) and cache."""
  dtype = DTYPES[cfg.dtype]
  norm = lambda name, inp: nn.RMSNorm(dtype=dtype).apply(
      {"params": p[name]}, inp)
  h, cache = _attention(p["attn"], norm("attn_norm", x), positions, cache,
                        valid, cfg.num_heads, dtype)
  z = norm("mlp_norm", x + h)
  if moe is None:
    m = DenseFFN(cfg.d_model, cfg.d_ff, "swiglu", dtype).apply(
        {"params": p["mlp"]}, z)
  else:
    variables = {"params": p["mlp"]}
    if rs.get("mlp"):
      variables["router_state"] = rs["mlp"]
    m = MoE(_decode_moe(moe), cfg.d_model, dtype).apply(variables, z,
                                                        train=False)
  return h + m, cache


def mod_decision(cfg: LMConfig, p, x) -> tuple[jax.Array, jax.Array]:
  """Causal routing of a MoD block: (enter bool[B, L], router logits float32[B, L])."""
  logits = jnp.einsum("bld,d->bl", x.astype(jnp.float32),
                      p["router"].astype(jnp.float32))
  if cfg.mod_causal == "predictor":
    decide = Predictor().apply({"params": p["predictor"]}, x)
  else:
    decide = logits
  return decide > 0, logits


def forward(cfg: LMConfig, params, router_state, tokens, start, cache, *,
            skip: str = "cond"):
  """Runs L new tokens at positions start..start+L-1 through the cached model.

  Args:
    cfg: the model's `LMConfig`.
    params, router_state: the model's variables (unboxed).
    tokens: int32[B, L].
    start: int32[] position of the first token (the cache holds 0..start-1).
    cache: from `init_cache` (length T >= start + L).
    skip: "cond" or "mask" (see the module docstring).
  Returns:
    (logits float32[B, L, V], new cache, decisions bool[B, M, L] of the M
    routed blocks (empty M axis without MoD)).
  """
  if skip not in SKIPS:
    raise ValueError(f"skip={skip!r} is not supported; allowed: "
                     f"{', '.join(SKIPS)}")
  dtype = DTYPES[cfg.dtype]
  batch, length = tokens.shape
  positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32),
                               (batch, length))
  x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype).apply(
      {"params": params["embed"]}, tokens)
  router_state = router_state or {}
  new_cache, decisions = [], []
  everyone = jnp.ones((batch, length), bool)
  for i in range(cfg.num_layers):
    p = params[f"layers_{i}"]
    rs = router_state.get(f"layers_{i}", {})
    moe = cfg.moe if cfg.is_moe_layer(i) else None
    if not cfg.is_mod_layer(i):
      delta, c = _block(cfg, moe, p, rs, x, positions, cache[i], everyone)
      x = x + delta
      new_cache.append(c)
      continue
    enter, logits = mod_decision(cfg, p, x)
    score = router_score(logits, cfg.mod_score)
    score = jnp.where(score == 0, _TINY, score)

    def run(x, c, p=p, rs=rs, moe=moe, enter=enter, score=score):
      delta, c = _block(cfg, moe, p["block"], rs.get("block", {}), x,
                        positions, c, enter)
      upd = delta * score[..., None].astype(delta.dtype)
      return jnp.where(enter[..., None], x + upd.astype(x.dtype), x), c

    if skip == "cond":
      x, c = jax.lax.cond(jnp.any(enter), run, lambda x, c: (x, c), x,
                          cache[i])
    else:
      x, c = run(x, cache[i])
    new_cache.append(c)
    decisions.append(enter)
  x = nn.RMSNorm(dtype=dtype).apply({"params": params["final_norm"]}, x)
  logits = nn.DenseGeneral(cfg.vocab_size, use_bias=False,
                           dtype=jnp.float32).apply(
                               {"params": params["head"]}, x)
  decisions = (jnp.stack(decisions, axis=1) if decisions
               else jnp.zeros((batch, 0, length), bool))
  return logits.astype(jnp.float32), tuple(new_cache), decisions


@partial(jax.jit, static_argnames=("cfg", "skip"))
def prefill(cfg: LMConfig, params, router_state, tokens, cache, *,
            skip: str = "cond"):
  """The prompt int32[B, P] at positions 0..P-1 -> (logits [B, P, V], cache,
  decisions [B, M, P])."""
  return forward(cfg, params, router_state, tokens, jnp.int32(0), cache,
                 skip=skip)


@partial(jax.jit, static_argnames=("cfg", "skip"), donate_argnames=("cache",))
def decode_step(cfg: LMConfig, params, router_state, token, position, cache, *,
                skip: str = "cond"):
  """One token int32[B] at position int32[] -> (logits [B, V], cache,
  decisions [B, M])."""
  logits, cache, dec = forward(cfg, params, router_state, token[:, None],
                               position, cache, skip=skip)
  return logits[:, 0], cache, dec[..., 0]


def _pick(logits, key, temperature):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature,
                                axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "num_steps", "temperature", "skip"))
def decode_loop(cfg: LMConfig, params, router_state, logits, cache, start, rng,
                *, num_steps: int, temperature: float = 0.0,
                skip: str = "cond"):
  """Picks a token from `logits` float32[B, V], then `num_steps` more cached steps.

  Returns (tokens int32[B, num_steps + 1], cache, decisions bool[B, M, steps]).
  """
  batch = logits.shape[0]
  num_mod = sum(cfg.is_mod_layer(i) for i in range(cfg.num_layers))

  def body(i, carry):
    logits, cache, out, dec, key = carry
    sub = key
    if temperature != 0.0:  # greedy decoding needs no random numbers
      key, sub = jax.random.split(key)
    token = _pick(logits, sub, temperature)
    out = out.at[:, i].set(token)
    logits, cache, d = forward(cfg, params, router_state, token[:, None],
                               start + i, cache, skip=skip)
    dec = dec.at[:, :, i].set(d[..., 0])
    return logits[:, 0], cache, out, dec, key

  out = jnp.zeros((batch, num_steps + 1), jnp.int32)
  dec = jnp.zeros((batch, num_mod, max(num_steps, 1)), bool)
  logits, cache, out, dec, key = jax.lax.fori_loop(
      0, num_steps, body, (logits, cache, out, dec, rng))
  last = jax.random.split(key)[1] if temperature != 0.0 else key
  out = out.at[:, num_steps].set(_pick(logits, last, temperature))
  return out, cache, dec[:, :, :num_steps]


def generate(cfg: LMConfig, params, router_state, prompt, num_new: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None,
             skip: str = "cond") -> np.ndarray:
  """Continues each prompt int32[B, P] by `num_new` tokens -> int32[B, num_new]."""
  prompt = jnp.asarray(prompt, jnp.int32)
  batch, plen = prompt.shape
  params = nn.meta.unbox(params)
  cache = init_cache(cfg, batch, plen + num_new)
  logits, cache, _ = prefill(cfg, params, router_state, prompt, cache,
                             skip=skip)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out, _, _ = decode_loop(cfg, params, router_state, logits[:, -1], cache,
                          jnp.int32(plen), rng, num_steps=num_new - 1,
                          temperature=float(temperature), skip=skip)
  return np.asarray(out)


def calibrate_predictor(model, params, tokens, capacity: float):
  """Sets each routed block's predictor bias so ~`capacity` of tokens enter.

  For measuring decode speed with untrained weights (the speed of a routed
  model depends on how many tokens enter its blocks). Returns new params.

  Layer by layer (a routed block's input depends on the earlier decisions):
  the bias is minus the (1 - capacity) quantile of its predictor's logits on
  `tokens` under causal routing.
  """
  cfg = model.config
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
