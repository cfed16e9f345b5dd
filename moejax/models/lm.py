"""Decoder-only Transformer language model with routed MLPs.

Axis legend:
  B  batch
  L  sequence length (new tokens in one cached decoding call)
  T  cache length (prompt + new tokens)
  M  routed (MoD) blocks
  D  model width
  V  vocabulary

With `LMConfig.scan_layers` the repeating blocks run as one `nn.scan` over
periods of identical blocks (`moejax.models.scan`): every variable collection
of the scanned blocks is stacked on a leading axis N, and so is their cache.

Cached decoding: `init_cache` gives one key/value cache per layer (see
`moejax.nn.attention`; stacked per scanned block with `scan_layers`);
`TransformerLM.decode` runs L new tokens at positions start..start+L-1 given
the cache of positions 0..start-1 and returns their logits, the updated cache
and the routed blocks' decisions. Its logits equal the full forward pass's
with causal MoD routing (`mod_routing="causal"`) and, for token-local MoE
routers, capacity for every token (see `moejax.nn.blocks.decode_moe`).
Routers whose evaluation routing of a token depends on other tokens (expert
choice) have no cached equivalent.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.checks import check_choice, check_positive_ints
from moejax.models.scan import (LAYERS_AXIS, ScanPlan, scan_plan,
                                 stack_layers)
from moejax.nn.attention import init_kv
from moejax.nn.blocks import (DTYPES, REMAT_POLICIES, Block, StackConfig,
                              remat_mode)
from moejax.nn.mod import SKIPS, MoDBlock, MoDConfig

# The MoD settings as flat `LMConfig` fields of older `config.json` files
# (and the command line's flags): name -> `MoDConfig` field.
FLAT_MOD_FIELDS = {"mod_capacity": "capacity", "mod_score": "score",
                   "mod_aux_weight": "aux_weight",
                   "mod_predictor_weight": "predictor_weight",
                   "mod_causal": "causal"}


@dataclasses.dataclass(frozen=True)
class LMConfig(StackConfig):
  """A decoder-only LM: the fields of `StackConfig` and these.

  Attributes:
    vocab_size: V (256 for byte-level data).
    max_len: longest sequence (for sampling buffers).
    mod: the routed (Mixture-of-Depths) blocks' `MoDConfig` (capacity
      fraction, score, BCE weights, causal rule); None = no MoD.
    mod_every: every `mod_every`-th block (1-based) is a routed MoD block
      when `mod` is set (default 2: every other block); its MLP is the MoE
      if that block has one (staged MoDE).
    first_dense_layers: the first n blocks have a dense MLP whatever
      `moe_every` says (DeepSeekMoE's dense first block).
    remat: block rematerialisation, a name of
      `moejax.nn.blocks.REMAT_POLICIES` or "none": "block" (`nn.remat` per
      block: only the block inputs are kept between the forward and the
      backward pass, at about one extra forward of compute);
      "save_expert_inputs" (block remat that also keeps the routed experts'
      dispatched inputs); "save_dots" (block remat that also keeps the
      outputs of matmuls without batch dimensions: the attention
      projections and router logits, not the expert matmuls);
      "save_matmuls" ("save_dots" and the expert matmuls' outputs: the
      backward recomputes no weight matmul of the forward);
      "recompute_attention" (no block remat: everything
      is kept but the attention scores and probabilities, float[B, H, L, L],
      the largest activations at long sequences, recomputed from the saved
      queries and keys); "save_moe_operands" ("recompute_attention", and
      the MoE layer keeps only its expert matmuls' operands: dispatched
      rows, up-projections, token-side expert outputs; routing, gathers,
      layout copies and the activation are recomputed). True / False are
      accepted as "block" / "none" (and
      stored as those names).
    param_dtype: parameter dtype name ("float32" or "bfloat16"): params are
      created (and updated) in it, computed with in `dtype`; routing math
      stays float32 (router params are cast up; DTop-p's gamma stays
      float32).
    loss_chunk: tokens of each sequence per chunk of the training loss: the
      output head and the cross-entropy run chunk by chunk and the chunk's
      logits are recomputed in the backward pass
      (`moejax.train.step.chunked_cross_entropy`), so float32[B, loss_chunk,
      V] logits are live instead of [B, L, V]; 0 = the whole sequence at
      once. Must divide the sequence length.
    scan_layers: run the runs of identical blocks as one `nn.scan`
      (`moejax.models.scan`): params and the other variable collections are
      stacked per period on a leading "layers" axis, XLA compiles (and keeps
      the rematerialised activations of) one period instead of every block.
      Same function as the unrolled model; its checkpoints have the stacked
      layout. Pair it with a block-remat `remat` ("block", "save_dots",
      "save_matmuls"): without one the scan keeps every residual of its
      body stacked, well above what the unrolled program keeps (the 6.9B
      paper shape on v5p-64: 115 GiB of temporaries per chip against about
      60 unrolled).
  """
  vocab_size: int = 256
  max_len: int = 128
  mod: MoDConfig | None = None
  mod_every: int = 2
  first_dense_layers: int = 0
  remat: str = "none"
  param_dtype: str = "float32"
  loss_chunk: int = 0
  scan_layers: bool = False

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers={self.scan_layers!r} is not allowed; "
                       "allowed: true or false")
    object.__setattr__(self, "remat", remat_mode(self.remat))
    check_choice("param_dtype", self.param_dtype, DTYPES)
    check_positive_ints(self, ("vocab_size", "max_len", "mod_every"))
    if isinstance(self.loss_chunk, bool) or not (
        isinstance(self.loss_chunk, int) and self.loss_chunk >= 0):
      raise ValueError(f"loss_chunk={self.loss_chunk!r} is out of range; "
                       "allowed: an integer >= 0 (0 = no chunks)")
    if (isinstance(self.first_dense_layers, bool)
        or not isinstance(self.first_dense_layers, int)
        or not 0 <= self.first_dense_layers <= self.num_layers):
      raise ValueError(f"first_dense_layers={self.first_dense_layers!r} is "
                       f"out of range; allowed: integer in [0, num_layers="
                       f"{self.num_layers}]")
    if self.mod is not None and not isinstance(self.mod, MoDConfig):
      raise ValueError(f"mod={self.mod!r} is not allowed; allowed: a "
                       "MoDConfig or None")

  @classmethod
  def upgrade_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a `config.json` written when the MoD settings were flat
    (`mod_capacity`, 0 = no MoD, `mod_score`, `mod_aux_weight`,
    `mod_predictor_weight`, `mod_causal`) as `mod` (`moejax.train.config_file`)."""
    fields = dict(fields)
    old = {k: fields.pop(k) for k in list(fields) if k in FLAT_MOD_FIELDS}
    if old:
      capacity = old.pop("mod_capacity", 0.0)
      fields["mod"] = MoDConfig(capacity=capacity, **{
          FLAT_MOD_FIELDS[k]: v for k, v in old.items()}) if capacity else None
    return fields

  def is_mod_layer(self, i: int) -> bool:
    return self.mod is not None and (i + 1) % self.mod_every == 0

  def is_moe_layer(self, i: int) -> bool:
    return (self.moe is not None and i >= self.first_dense_layers
            and (i + 1) % self.moe_every == 0)

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class _LayerSpec:
  """The static arguments of one block's call."""
  index: int
  name: str
  train: bool
  mod_routing: str
  skip: str
  decoding: bool


def _layer(module, x, positions, layer_kv, spec: _LayerSpec, segment_ids):
  """Block `spec.index` of `module.config`, created in `module`'s scope as
  `spec.name`: (x, MoD decisions or None, the block's new kv or None)."""
  cfg = module.config
  dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
  i = spec.index
  moe = cfg.moe if cfg.is_moe_layer(i) else None
  if cfg.is_mod_layer(i):
    out = MoDBlock(cfg.mod, cfg.num_heads, cfg.d_ff, moe,
                   dtype=dtype, param_dtype=param_dtype,
                   num_kv_heads=cfg.num_kv_heads, attention=cfg.attention,
                   name=spec.name)(
                       x, positions, train=spec.train,
                       routing=spec.mod_routing, kv=layer_kv, skip=spec.skip,
                       segment_ids=segment_ids)
    return out if spec.decoding else (*out, None)
  policy = REMAT_POLICIES[cfg.remat]
  x, layer_kv = Block(
      cfg.num_heads, cfg.d_ff, moe, dtype=dtype, param_dtype=param_dtype,
      name=spec.name, recompute_attention=policy.recompute_attention,
      moe_saved=policy.moe_saved, num_kv_heads=cfg.num_kv_heads,
      attention=cfg.attention)(
          x, positions, train=spec.train, kv=layer_kv,
          segment_ids=segment_ids)
  return x, None, layer_kv


def _layer_fn(cfg: LMConfig, *, scanned: bool, decoding: bool):
  """`_layer`, under `nn.remat` per the remat policy when training (decoding
  has no backward pass)."""
  policy = REMAT_POLICIES[cfg.remat]
  if policy.block and not decoding:
    return nn.remat(_layer, static_argnums=(4,), policy=policy.saved,
                    prevent_cse=not scanned)
  return _layer


class _Period(nn.Module):
  """One period of the scanned run: body blocks `block_0 .. block_{P-1}`
  (block j is built as block `plan.start + j`, which all periods' block j
  equal). (x, (positions, segment_ids), kv of the period or None) ->
  (x, (new kv, MoD decisions bool[m, B, L] of its routed blocks))."""
  config: LMConfig
  plan: ScanPlan
  train: bool
  mod_routing: str
  skip: str
  decoding: bool

  @nn.compact
  def __call__(self, x, context, kv):
    positions, segment_ids = context
    cfg, plan = self.config, self.plan
    layer = _layer_fn(cfg, scanned=True, decoding=self.decoding)
    new_kv, decisions = {}, []
    for j in range(plan.period):
      i, name = plan.start + j, f"block_{j}"
      x = sharding.constrain(x, sharding.ACT_BLD)  # block boundary [B, L, D]
      x, chosen, new_kv[name] = layer(
          self, x, positions, None if kv is None else kv[name],
          _LayerSpec(i, name, self.train, self.mod_routing, self.skip,
                     self.decoding), segment_ids)
      if cfg.is_mod_layer(i):
        decisions.append(chosen)
    return x, (new_kv if self.decoding else None,
               jnp.stack(decisions) if decisions else None)


# Every collection the blocks hold or sow, stacked per period.
SCAN_COLLECTIONS = ("params", "router_state", "router", "intermediates")


def _scanned_run(module, plan: ScanPlan, x, positions, segment_ids, kv,
                 opts: dict):
  """The scanned blocks: (x, their new kv or None, the MoD decisions
  [B, L] of their routed blocks in block order)."""
  run = nn.scan(
      _Period, variable_axes=dict.fromkeys(SCAN_COLLECTIONS, 0),
      split_rngs={"params": True, "router": True, "dropout": True},
      in_axes=(nn.broadcast, 0), length=plan.periods,
      metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
  x, (new_kv, chosen) = run(module.config, plan, name=plan.name, **opts)(
      x, (positions, segment_ids), kv)
  if chosen is None:
    return x, new_kv, []
  # [N, m, B, L] -> block order (period k, body block j)
  chosen = chosen.reshape(-1, *chosen.shape[2:])
  return x, new_kv, list(chosen)


class TransformerLM(nn.Module):
  """tokens int32[B, L] -> logits float32[B, L, V]."""
  config: LMConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False,
               positions: jax.Array | None = None,
               mod_routing: str = "top_c", kv=None, skip: str = "cond",
               hidden: bool = False,
               segment_ids: jax.Array | None = None):
    """`mod_routing` picks the routed blocks' selection: "top_c" (training),
    "causal" (the config's `mod.causal` decisions, as in sampling),
    "predictor" or "router"; see `moejax.nn.mod.MoDBlock`.

    `segment_ids` int32[B, L] (packed documents, e.g. with `positions` reset
    per document): attention stays inside each segment; None = one sequence
    per row.

    With `kv` (from `init_cache`) it decodes (see `decode`, which sets
    `positions` and a causal `mod_routing`; `skip` as in `MoDBlock`) and
    returns (logits, kv, decisions bool[B, M, L]).

    `hidden` (without `kv`) returns the final normalised hidden states
    float[B, L, D] instead of the logits: the chunked loss applies the head
    (params "head", kernel float32[D, V]) itself.
    """
    cfg = self.config
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    decisions = []
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                     param_dtype=param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(1.0), ("vocab", "embed")),
                     name="embed")
    x = embed(tokens)

    opts = dict(train=train, mod_routing=mod_routing, skip=skip,
                decoding=kv is not None)
    plan = scan_plan(cfg)
    layer = _layer_fn(cfg, scanned=False, decoding=kv is not None)
    scanned = {} if plan is None else dict.fromkeys(range(plan.start,
                                                          plan.stop))
    new_kv = {}
    for i in range(cfg.num_layers):
      if i in scanned:
        if i != plan.start:
          continue
        x, layer_kv, chosen = _scanned_run(
            self, plan, x, positions, segment_ids,
            None if kv is None else kv[plan.name], opts)
        new_kv[plan.name] = layer_kv
        decisions += chosen
        continue
      x = sharding.constrain(x, sharding.ACT_BLD)  # block boundary [B, L, D]
      key = i if plan is None else f"layers_{i}"
      x, chosen, new_kv[key] = layer(
          self, x, positions, None if kv is None else kv[key],
          _LayerSpec(i, f"layers_{i}", **opts), segment_ids)
      if cfg.is_mod_layer(i):
        decisions.append(chosen)
    x = sharding.constrain(x, sharding.ACT_BLD)
    x = nn.RMSNorm(dtype=dtype, param_dtype=param_dtype, name="final_norm")(x)
    if hidden and kv is None:
      return x
    logits = nn.DenseGeneral(
        cfg.vocab_size, use_bias=False, dtype=jnp.float32,
        param_dtype=param_dtype, name="head",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("embed", "vocab")))(x)
    logits = logits.astype(jnp.float32)
    if kv is None:
      return logits
    decisions = (jnp.stack(decisions, axis=1) if decisions
                 else jnp.zeros((tokens.shape[0], 0, tokens.shape[1]), bool))
    if plan is None:
      new_kv = tuple(new_kv[i] for i in range(cfg.num_layers))
    return logits, new_kv, decisions

  def decode(self, tokens: jax.Array, start: jax.Array, kv, *,
             skip: str = "cond"):
    """Cached decoding of L new tokens (evaluation routing, causal MoD).

    Args:
      tokens: int32[B, L] at positions start..start+L-1.
      start: int32[] position of the first token (`kv` holds 0..start-1).
      kv: from `init_cache` (length T >= start + L).
      skip: "cond" or "mask" (see `moejax.nn.mod`).
    Returns:
      (logits float32[B, L, V], updated kv, decisions bool[B, M, L] of the
      routed blocks: which tokens entered each).
    """
    check_choice("skip", skip, SKIPS)
    batch, length = tokens.shape
    positions = jnp.broadcast_to(
        start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    return self(tokens, positions=positions, mod_routing="causal", kv=kv,
                skip=skip)


def init_cache(cfg: LMConfig, batch: int, length: int):
  """An empty key/value cache of `length` slots per layer (`init_kv`, with
  the config's `kv_heads` key/value heads): a tuple over the layers, or
  with `scan_layers` a dict in the scanned layout (`stack_layers`: one
  stacked cache per body block of the scanned run, `layers_{i}` for the
  unrolled blocks)."""
  head = cfg.d_model // cfg.num_heads
  caches = tuple(init_kv(batch, length, cfg.kv_heads, head,
                         DTYPES[cfg.dtype]) for _ in range(cfg.num_layers))
  plan = scan_plan(cfg)
  if plan is None:
    return caches
  return stack_layers({f"layers_{i}": c for i, c in enumerate(caches)}, plan)


def init_variables(model: nn.Module, rng: jax.Array, tokens: jax.Array):
  """Returns (boxed params, router_state) without sown outputs, for
  tokens int32[B, T]. Jitted (one compile per model and shape instead of one
  per primitive)."""
  return _init_variables(model, rng, tokens)


@partial(jax.jit, static_argnums=0)
def _init_variables(model: nn.Module, rng: jax.Array, tokens: jax.Array):
  variables = model.init({"params": rng, "router": rng}, tokens, train=False)
  return variables["params"], variables.get("router_state", {})
