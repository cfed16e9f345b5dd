"""Causal self-attention with rotary position embeddings.

Axis legend:
  B  batch
  L  query positions
  T  key positions
  H  query heads
  G  key/value heads (grouped-query attention: G divides H; G = 1 is
     multi-query attention, G = H plain multi-head attention)
  R  query heads per key/value head, H / G
  K  head width
  D  model width

Positions are explicit (`int32[B, L]`): RoPE and the causal mask use each token's
true position, so a routed block that runs on a gathered subset of tokens (MoD)
attends exactly as the full sequence would among those tokens.

Packed rows (several documents in one row) pass `segment_ids` int32[B, L]:
a query sees only keys of its own segment (and, causal, at positions <= its
own), so attention never crosses documents. None = one segment per row
(today's behaviour exactly).

Cached decoding passes a key/value cache `kv` (`init_kv`):
`{"k": float[B, G, T, K], "v": float[B, G, T, K], "pos": int32[B, T]}` (heads
major, so that the per-step attention products need no transposed copy of the
cache). Slot t holds the token at position t; a slot that holds nothing has
position `PAD_POSITION`, larger than every real position, so the causal mask
hides it. Cached decoding always runs the "xla" implementation (its mask
compares cache positions, which no fused kernel takes).

Implementations (`IMPLEMENTATIONS`, `Attention.implementation`; "auto" is
`moejax.backend.choose_attention`'s per backend):
  "xla"          `attend`: two einsums around a materialised score tensor
                 float[B, H, L, T] (activation dtype; the reference).
  "dot_product"  `jax.nn.dot_product_attention`: cuDNN's fused flash attention
                 on a GPU where it applies (`moejax.backend.use_cudnn`:
                 bfloat16 / float16, head width a multiple of 8 up to 128),
                 its XLA implementation elsewhere. Segment ids become its
                 `mask` argument, bool[B, 1, L, T].
  "splash"       the Pallas TPU splash-attention kernel
                 (`jax.experimental.pallas.ops.tpu.splash_attention`):
                 blockwise, no score tensor in HBM, segment ids native; on
                 other backends it runs in the Pallas interpreter (tests).
                 L is padded to a multiple of 128 (`splash_attend`).
The fused implementations know only index-causal masks (query i sees keys
j <= i). That equals the position-causal mask of "xla" whenever the
positions increase along each segment of a row: a plain sequence, packed
documents whose positions restart per document (`moejax.data.packed`), and
the token subsets that a routed MoD block gathers, which keep their original
order (`moejax.nn.mod.mod_routing` gives priority by index; its empty slots,
position `PAD_POSITION`, come last and their outputs are discarded). Rows
whose positions do not increase (explicit out-of-order positions) need
"xla".
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import backend, sharding
from moejax.checks import check_choice

# Position given to empty slots: larger than any real position, so the causal
# mask hides them from every real query (their own outputs are discarded).
PAD_POSITION = 2 ** 30
IMPLEMENTATIONS = ("auto", "xla", "dot_product", "splash")
# Sequence lengths the splash kernel's blocks tile (its lane width).
SPLASH_BLOCK = 128


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding. x float[B, L, H, K], positions int32[B, L] -> same shape."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, L, 1, K/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """bool[B, 1, L, T]: query at position p sees keys at positions <= p."""
  return (k_positions[:, None, :] <= q_positions[:, :, None])[:, None]


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """bool[B, 1, L, T]: query sees keys of its own segment (int32[B, L] and
  int32[B, T] segment ids)."""
  return (k_segments[:, None, :] == q_segments[:, :, None])[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           heads_major: bool = False, recompute: bool = False) -> jax.Array:
  """Attention output float[B, L, H, K] (the "xla" implementation).

  q float[B, L, H, K], k/v float[B, T, G, K] (`heads_major`: float[B, G, T, K],
  the cache layout; G divides H, query head h reads key/value head h // R),
  mask bool[B, 1, L, T]. The scores q k^T float[B, H, L, T] stay in the
  activation dtype in memory (`masked_softmax` casts them up to float32 in
  its fusions). `recompute`: keep none of the scores and probabilities for
  the backward pass, which recomputes them from q and k (a `jax.checkpoint`
  of this function).
  """
  if recompute:
    return jax.checkpoint(functools.partial(attend, heads_major=heads_major))(
        q, k, v, mask)
  batch, length, heads, width = q.shape
  groups = k.shape[1 if heads_major else 2]
  q = q.reshape(batch, length, groups, heads // groups, width)
  kv = "bgtk" if heads_major else "btgk"
  scores = jnp.einsum(f"blgrk,{kv}->bgrlt", q, k)
  grouped = scores.shape
  probs = masked_softmax(scores.reshape(batch, heads, length, -1), mask,
                         v.dtype, width ** -0.5)  # [B, H, L, T]: h = g R + r
  out = jnp.einsum(f"bgrlt,{kv}->blgrk", probs.reshape(grouped), v)
  return out.reshape(batch, length, heads, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def masked_softmax(scores: jax.Array, mask: jax.Array, dtype: Any,
                   scale: float = 1.0) -> jax.Array:
  """Softmax over the last axis of `scale * scores` where `mask` (elsewhere
  the lowest float32), computed in float32 and returned in `dtype`.

  `scores` float[B, H, L, T] may be bfloat16 (the QK^T product in a
  bfloat16 model, half the bytes of float32 scores in memory); they are cast
  up and scaled inside the softmax's own fusions, and the probabilities are
  exp(scores - logsumexp), so that XLA keeps no float32 [B, H, L, T] array
  in memory (the usual exp(s - max) / sum keeps the float32 exponentials).
  A row that sees no key is uniform, as the softmax of equal scores.

  The backward pass keeps only the output (in bfloat16 models: bfloat16
  probabilities, not the float32 scores and probabilities beside them) and
  which rows see a key, and computes the scores' cotangent from them in float32,
  scale * p * (g - sum(g * p)), the softmax's own derivative (exact when
  `dtype` is float32), returned in the scores' dtype; masked scores get
  none.
  """
  return _masked_softmax_fwd(scores, mask, dtype, scale)[0]


def _softmax_rows(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(softmax float32[..., T], float32[..., 1]: 1 for a row that sees a key,
  0 for one that sees none) of masked float32 scores.

  exp(scores - logsumexp): no float32 exponentials in memory between the
  sums and the output. A row that sees no key is uniform (as the softmax of
  equal scores): there `top + log(T)` rounds back to `top`, each entry is 1,
  and a per-row factor 1/T makes it 1/T (no [..., T] array of constants).
  """
  top = jnp.max(scores, axis=-1, keepdims=True)
  lse = top + jnp.log(jnp.sum(jnp.exp(scores - top), axis=-1, keepdims=True))
  sees = (top > jnp.finfo(jnp.float32).min).astype(jnp.float32)
  factor = sees + (1.0 - sees) / scores.shape[-1]
  return jnp.exp(scores - lse) * factor, sees


def _masked_softmax_fwd(scores, mask, dtype, scale):
  masked = jnp.where(mask, scores.astype(jnp.float32) * scale,
                     jnp.finfo(jnp.float32).min)
  probs, sees = _softmax_rows(masked)
  probs = probs.astype(dtype)
  return probs, (probs, sees, jnp.zeros((0,), scores.dtype))


def _masked_softmax_bwd(dtype, scale, res, g):
  del dtype
  probs, sees, like = res
  p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
  # a row that sees no key: every score is masked, none gets a gradient
  ds = p * (g - jnp.sum(g * p, axis=-1, keepdims=True)) * (scale * sees)
  return ds.astype(like.dtype), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def dot_product_attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       causal: bool = True,
                       segment_ids: jax.Array | None = None) -> jax.Array:
  """Self-attention by `jax.nn.dot_product_attention` ("dot_product").

  q float[B, L, H, K], k/v float[B, L, G, K], `causal`: index-causal (query i
  sees keys j <= i), `segment_ids` int32[B, L] or None -> float[B, L, H, K].
  cuDNN's flash kernel where `moejax.backend.use_cudnn` says it applies, XLA
  otherwise.
  """
  mask = (None if segment_ids is None
          else segment_mask(segment_ids, segment_ids))
  cudnn = backend.use_cudnn(q.dtype, q.shape[-1])
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal,
      implementation="cudnn" if cudnn else "xla")


def _splash_kernel(heads: int, length: int, causal: bool, interpret: bool):
  """The splash kernel of `heads` query heads over L = `length` tokens
  (q float[H, L, K], k/v float[G, L, K] -> float[H, L, K]). Built where it
  is traced: its mask tables become constants of that program (they cannot
  be cached across programs: a table made under one trace is its tracer)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  shape = (length, length)
  mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  block = max(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(
      splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
      head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
                  causal: bool = True,
                  segment_ids: jax.Array | None = None) -> jax.Array:
  """Self-attention by the Pallas TPU splash kernel ("splash").

  Shapes as `dot_product_attend`. The kernel tiles L in blocks of
  `SPLASH_BLOCK`: other lengths are padded up to a multiple with tokens of a
  segment of their own (computed, then dropped).
  Under a mesh the kernel runs per device in a `jax.shard_map` (batch over
  the batch axes, heads over `model` where it divides them; key/value heads
  that `model` does not divide are repeated to H first), because XLA cannot
  partition a Pallas call. Off TPU it runs in the Pallas interpreter.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  length, heads = q.shape[1], q.shape[2]
  pad = -length % SPLASH_BLOCK
  if pad:  # padded tokens: segment -1 of their own, after every real one
    ids = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
           else segment_ids)
    pad_rows = lambda a, value=0: jnp.pad(
        a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=value)
    out = splash_attend(pad_rows(q), pad_rows(k), pad_rows(v), causal=causal,
                        segment_ids=pad_rows(ids, -1))
    return out[:, :length]
  interpret = backend.current_backend() != "tpu"
  heads_major = lambda a: jnp.swapaxes(a, 1, 2)
  q = heads_major(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype))
  k, v = heads_major(k), heads_major(v)

  def local(q, k, v, *segments):
    kernel = _splash_kernel(q.shape[1], length, causal, interpret)
    if not segments:
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, s: kernel(
        q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segments[0])

  args = (q, k, v) + (() if segment_ids is None else (segment_ids,))
  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return heads_major(local(*args))
  names = ("batch", "heads", None, None)
  q_spec = sharding.logical_spec(names, q.shape, mesh)
  kv_spec = sharding.logical_spec(names, k.shape, mesh)
  if kv_spec[1] != q_spec[1]:
    k, v = (jnp.repeat(a, heads // a.shape[1], axis=1) for a in (k, v))
    args = (q, k, v) + args[3:]
  specs = (q_spec, q_spec, q_spec) + ((P(q_spec[0]),) * len(args[3:]))
  out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec,
                      check_vma=False)(*args)
  return heads_major(out)


FUSED = {"dot_product": dot_product_attend, "splash": splash_attend}


def init_kv(batch: int, length: int, num_heads: int, head_width: int,
            dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """An empty cache of T = `length` slots: k/v float[B, G, T, K] zeros
  (`num_heads` = G, the key/value heads), pos int32[B, T] = PAD_POSITION."""
  shape = (batch, num_heads, length, head_width)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full((batch, length), PAD_POSITION, jnp.int32)}


def write_kv(kv: dict[str, jax.Array], k: jax.Array, v: jax.Array,
             positions: jax.Array,
             kv_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Stores this call's keys/values in the cache at their positions.

  Args:
    kv: the cache (`init_kv`).
    k, v: float[B, L, G, K].
    positions: int32[B, L], one run start..start+L-1 shared by every row.
    kv_mask: bool[B, L] tokens to store; the others' slots get PAD_POSITION
      (hidden from every later query). None = all.
  Returns:
    the updated cache.
  """
  start = positions[0, 0]
  write = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(
      buf, new.astype(buf.dtype), start, axis=axis)
  heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # [B, L, G, K] -> [B, G, L, K]
  pos = positions if kv_mask is None else jnp.where(kv_mask, positions,
                                                    PAD_POSITION)
  return {"k": write(kv["k"], heads_major(k), 2),
          "v": write(kv["v"], heads_major(v), 2),
          "pos": write(kv["pos"], pos, 1)}


class Attention(nn.Module):
  """Multi-head causal self-attention.

  `__call__(x, positions, kv=None, kv_mask=None)` returns (out float[B, L, D],
  kv). Without a cache (`kv=None`) the L tokens attend among themselves and
  the second value is None. With one (cached decoding), the tokens' keys/values
  are written into it first (`write_kv`; `positions` must be one run
  start..start+L-1 in every row, `kv_mask` bool[B, L] the tokens to store), the
  queries attend to every stored key at a position <= theirs, and the second
  value is the updated cache.
  `causal=False` lets every query see every key (encoders, DiT; no cache).
  `recompute`: the backward pass recomputes the attention scores instead of
  keeping them (see `attend`).
  `segment_ids` int32[B, L] (packed documents; no cache) restricts every
  query to the keys of its own segment.
  `num_kv_heads`: G key/value heads (grouped-query attention; None = H, the
  parameters of plain multi-head attention). `implementation`: one of
  `IMPLEMENTATIONS` for the attention without a cache (see the module
  docstring; `recompute` concerns "xla" only, the fused kernels keep no
  scores).
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True
  recompute: bool = False
  num_kv_heads: int | None = None
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, kv=None,
               kv_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    width = x.shape[-1]
    head = width // self.num_heads

    def proj(name, shape, axes, names):
      return nn.DenseGeneral(
          shape, axis=axes, use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), names))
    check_choice("implementation", self.implementation, IMPLEMENTATIONS)
    groups = self.num_kv_heads or self.num_heads
    if self.num_heads % groups:
      raise ValueError(f"num_kv_heads={groups} must divide num_heads="
                       f"{self.num_heads}; allowed: its divisors")
    qkv_names = ("embed", "heads", "kv")
    q = proj("query", (self.num_heads, head), -1, qkv_names)(x)
    k = proj("key", (groups, head), -1, qkv_names)(x)
    v = proj("value", (groups, head), -1, qkv_names)(x)
    q, k = rope(q, positions), rope(k, positions)
    if kv is not None:
      if segment_ids is not None:
        raise ValueError("segment_ids with a kv cache is not supported; cached "
                         "decoding runs one document per row")
      if not self.causal:
        raise ValueError("causal=False attention has no cached decoding; "
                         "allowed: kv=None")
      kv = write_kv(kv, k, v, positions, kv_mask)
      out = attend(q, kv["k"], kv["v"], causal_mask(positions, kv["pos"]),
                   heads_major=True)
    elif (impl := backend.choose_attention(self.implementation,
                                           x.shape[1])) != "xla":
      out = FUSED[impl](q, k, v, causal=self.causal, segment_ids=segment_ids)
    else:
      mask = causal_mask(positions, positions)
      if not self.causal:  # every query sees every key
        mask = jnp.ones_like(mask)
      if segment_ids is not None:
        mask = mask & segment_mask(segment_ids, segment_ids)
      out = attend(q, k, v, mask, recompute=self.recompute)
    out = proj("out", width, (-2, -1), ("heads", "kv", "embed"))(out)
    return out, kv
