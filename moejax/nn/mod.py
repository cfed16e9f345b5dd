"""Mixture-of-Depths (Raposo et al. 2024): a block that runs on C of the L tokens.

Axis legend:
  B  batch (one routing group per sequence)
  L  sequence length
  C  capacity (tokens per sequence that enter the block), C = ceil(ratio * L)
  D  model width
  E  experts (E = 1 here: MoD is expert choice with one expert)

A routed block has a scalar router `r = x · w` (float32[B, L]). Per sequence the
top-C tokens by r are chosen with the expert-choice selector
(`routing.choice.select_top_tokens`, one expert), turned into a
`Routing` whose priority is the token order (so the dispatcher lays the chosen
tokens out in their ORIGINAL order) and whose gate is the router score; the
dispatcher (`dispatch.plan`, "index") gathers them with their true positions,
the wrapped `Block(residual=False)` runs attention + MLP on those C tokens only
(RoPE and the causal mask by original position), and `plan.combine` scatters
`score * Δ` back: `x_i <- x_i + s(r_i) Δ_i` for chosen tokens, the others pass
unchanged. Multiplying by the score is the router's only gradient path.

Causal routing (sampling cannot see the future, top-C needs it):
  A. "router": an auxiliary BCE(sigmoid(r), top-C mask) (weight `aux_weight`);
     at sampling a token enters iff r > 0.
  B. "predictor": an MLP D -> D/2 -> 1 (SiLU) on stop_gradient(x), trained with
     BCE against the top-C mask (weight `predictor_weight`; it cannot change the
     LM through its gradients); a token enters iff its logit > 0.
`MoDBlock(..., routing="predictor" | "router" | "causal")` runs a full forward
pass with those per-token decisions (a reference for cached decoding; it runs
the block at capacity L with the unchosen slots masked, so it does not save
compute). Outputs go to the `"router"` collection like the MoE layer's:
`aux_loss`, `aux` and `metrics`, with `mod_`-prefixed keys.

Cached decoding (`kv`, a key/value cache of the wrapped block, see
`moejax.nn.attention`): each new token decides by the causal rule; the block
writes keys/values only for the tokens that enter it (the slots of skipped
tokens keep `PAD_POSITION`), so later tokens attend only to processed ones,
exactly as the full forward pass with causal routing. Skipping is real: with
`skip="cond"` (default) the block runs under `lax.cond` only when at least one
row of the batch enters it (at batch 1: only for processed tokens); inside,
rows that do not enter are computed and masked. `skip="mask"` always computes
and masks (for measuring).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax import dispatch
from moejax.checks import check_choice, check_number
from moejax.nn.attention import PAD_POSITION
from moejax.nn.blocks import Block, BlockBase
from moejax.routing.base import Routing
from moejax.routing.choice import select_top_tokens

SCORES = ("raw", "sigmoid")
CAUSAL = ("predictor", "router")
ROUTINGS = ("top_c", "causal") + CAUSAL
SKIPS = ("cond", "mask")
_TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class MoDConfig:
  """One routed block.

  Attributes:
    capacity: fraction of each sequence that enters the block, in (0, 1];
      C = ceil(capacity * L).
    score: "raw" (the paper: the update is scaled by r) or "sigmoid" (by
      sigmoid(r)).
    aux_weight: weight of the router's own BCE (causal method A), >= 0.
    predictor_weight: weight of the predictor's BCE (method B), >= 0; the
      predictor sees stop_gradient(x), so this trains the predictor only.
    causal: the decision used for sampling and `routing="causal"`:
      "predictor" or "router".
    router_init_scale: variance scale of the router's initial weights (> 0).
  """
  # An override of one of its fields on a model without MoD (`model.mod` is
  # None) starts from these defaults (`moejax.configs.overrides`).
  OVERRIDE_FROM_DEFAULTS: ClassVar[bool] = True

  capacity: float = 0.125
  score: str = "raw"
  aux_weight: float = 0.01
  predictor_weight: float = 1.0
  causal: str = "predictor"
  router_init_scale: float = 1.0

  def __post_init__(self):
    if isinstance(self.capacity, bool) or not 0 < self.capacity <= 1:
      raise ValueError(f"capacity={self.capacity!r} is out of range; allowed: "
                       "(0, 1]")
    check_choice("score", self.score, SCORES)
    check_choice("causal", self.causal, CAUSAL)
    check_number("aux_weight", self.aux_weight, 0)
    check_number("predictor_weight", self.predictor_weight, 0)
    check_number("router_init_scale", self.router_init_scale, 0,
                 low_open=True)

  def num_selected(self, length: int) -> int:
    """C for a sequence of `length` tokens."""
    return min(length, dispatch.ratio_capacity(length, self.capacity))


def router_score(logits: jax.Array, score: str) -> jax.Array:
  """The multiplier of the block's update. logits float32[...] -> float32[...]."""
  return logits if score == "raw" else jax.nn.sigmoid(logits)


def gate_score(logits: jax.Array, score: str) -> jax.Array:
  """`router_score`, never exactly 0 (a gate of 0 means "not routed")."""
  s = router_score(logits, score)
  return jnp.where(s == 0, _TINY, s)


def top_c_mask(logits: jax.Array, capacity: int) -> jax.Array:
  """bool[B, L]: per sequence the `capacity` highest logits (ties: lower index).

  Expert choice with one expert: `select_top_tokens` on float32[L, 1] per row.
  A token with a NaN or +inf logit is never chosen and takes no slot (fewer
  than `capacity` tokens enter when the others are not enough).
  """
  finite = jnp.isfinite(logits) | (logits == -jnp.inf)
  ranked = jnp.where(finite, logits, -jnp.inf)
  chosen = jax.vmap(lambda r: select_top_tokens(r[:, None], capacity)[:, 0])(
      ranked)
  return chosen & finite


def mod_routing(logits: jax.Array, chosen: jax.Array, score: str) -> Routing:
  """The `Routing` of one expert (the block) over each sequence.

  Args:
    logits: float32[B, L] router logits.
    chosen: bool[B, L] tokens that enter the block.
    score: "raw" or "sigmoid".
  Returns:
    Routing with gates/priority float32[B, L, 1]: gate = the score at chosen
    tokens (never exactly 0 there), priority = -index, so that the dispatcher
    keeps the chosen tokens in their original order.
  """
  gates = jnp.where(chosen, gate_score(jnp.where(chosen, logits, 0.0), score),
                    0.0)[..., None]
  order = -jnp.arange(logits.shape[-1], dtype=jnp.float32)
  priority = jnp.broadcast_to(order, logits.shape)[..., None]
  return Routing(gates=gates, priority=priority)


def gather_plan(routing: Routing, capacity: int):
  """Per sequence, the dispatch plan of the chosen tokens (vmapped over B)."""
  # PLAN_STRATEGY ("index"): a SlotPlan, whose token_index gives positions.
  return jax.vmap(lambda r: dispatch.plan(r, capacity,
                                          strategy=dispatch.PLAN_STRATEGY))(
      routing)


def selection_metrics(pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
  """Accuracy, precision, recall of bool[...] predictions vs a bool target."""
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  hits = jnp.sum(pred * target)
  return {
      "accuracy": jnp.mean((pred == target).astype(jnp.float32)),
      "precision": hits / jnp.maximum(jnp.sum(pred), 1.0),
      "recall": hits / jnp.maximum(jnp.sum(target), 1.0),
      "capacity": jnp.mean(pred),
  }


def _finite_bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean sigmoid BCE float32[] over the finite entries of float32[B, L]
  logits (the others contribute neither value nor gradient)."""
  ok = jnp.isfinite(logits)
  bce = optax.sigmoid_binary_cross_entropy(jnp.where(ok, logits, 0.0), target)
  return jnp.sum(jnp.where(ok, bce, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


class Predictor(nn.Module):
  """Causal-routing predictor: float[B, L, D] -> logits float32[B, L]."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(max(1, width // 2), param_dtype=self.param_dtype,
                 name="hidden")(x.astype(jnp.float32))
    return nn.Dense(1, param_dtype=self.param_dtype, name="out")(
        nn.silu(h))[..., 0]


class _MoDConfigField(nn.Module):
  """`MoDBlock`'s first field: `MoDBlock(config, num_heads, d_ff, ...)`."""
  config: MoDConfig


# Dataclass fields follow the reversed MRO: `config`, then `BlockBase`'s.
class MoDBlock(BlockBase, _MoDConfigField):
  """A Transformer block that runs on the router's top-C tokens of each sequence.

  `__call__(x float[B, L, D], positions int32[B, L], *, train, routing="top_c")`
  returns (x + score * Δ at the chosen tokens, chosen bool[B, L]). `routing`:
  "top_c" (training and the default evaluation; C = config.num_selected(L)
  tokens enter), "predictor" / "router" (causal decisions of method B / A) or
  "causal" (the config's `causal` method).

  With `kv` (the wrapped block's cache; evaluation with a causal `routing`
  only) it decodes and returns (x', chosen, updated kv); `skip` is "cond" or
  "mask" (see the module docstring). Nothing is sown then.
  `segment_ids` int32[B, L] (packed documents, no cache): the chosen tokens
  attend only within their own segment (the top-C choice is per row).
  """

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, train: bool,
               routing: str = "top_c", kv=None, skip: str = "cond",
               segment_ids: jax.Array | None = None):
    cfg = self.config
    check_choice("routing", routing, ROUTINGS)
    if routing == "causal":
      routing = cfg.causal
    if kv is not None and routing == "top_c":
      raise ValueError("routing='top_c' needs the whole sequence; with a kv "
                       f"cache allowed: {', '.join(ROUTINGS[1:])}")
    check_choice("skip", skip, SKIPS)
    length = x.shape[1]
    w = self.param(
        "router", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(cfg.router_init_scale, "fan_in",
                                             "truncated_normal", in_axis=0,
                                             out_axis=()),
            ("embed",)), (x.shape[-1],), self.param_dtype)
    # A token with a NaN / inf input gets NaN logits (never chosen, left out
    # of the BCE losses and metrics) computed from zeros, so that the router's
    # and the predictor's gradients stay finite.
    x32 = x.astype(jnp.float32)
    x_ok = jnp.all(jnp.isfinite(x32), axis=-1)
    x_safe = jnp.where(x_ok[..., None], x32, 0.0)
    logits = jnp.where(x_ok, jnp.einsum("bld,d->bl", x_safe,
                                        w.astype(jnp.float32)), jnp.nan)
    pred_logits = jnp.where(x_ok, Predictor(self.param_dtype, name="predictor")(
        jax.lax.stop_gradient(x_safe)), jnp.nan)
    if kv is not None:
      chosen = (pred_logits if routing == "predictor" else logits) > 0
      return self._decode(x, positions, gate_score(logits, cfg.score), chosen,
                          kv, skip, train)

    capacity = cfg.num_selected(length)
    target = top_c_mask(jax.lax.stop_gradient(logits), capacity)
    if routing == "top_c":
      chosen, slots = target, capacity
    else:
      chosen = (pred_logits if routing == "predictor" else logits) > 0
      chosen, slots = jax.lax.stop_gradient(chosen), length

    plan = gather_plan(mod_routing(logits, chosen, cfg.score), slots)
    xs = jax.vmap(lambda p, xb: p.dispatch(xb)[0])(plan, x)        # [B, C, D]
    slot_pos = jnp.take_along_axis(positions, plan.token_index[:, 0], axis=1)
    slot_pos = jnp.where(plan.slot_valid[:, 0], slot_pos, PAD_POSITION)
    slot_seg = None if segment_ids is None else jnp.take_along_axis(
        segment_ids, plan.token_index[:, 0], axis=1)
    # The empty slots (tokens that skip the block) are zero rows: an MoE MLP
    # must not route them (they would take capacity from processed tokens and
    # make an earlier token's output depend on later ones).
    delta, _ = self._block()(xs, slot_pos, train=train, segment_ids=slot_seg,
                             token_mask=plan.slot_valid[:, 0])
    update = jax.vmap(lambda p, d: p.combine(d[None]))(plan, delta)  # [B, L, D]

    # Causal routing: BCE of the router (A) and of the predictor (B), means
    # over the tokens whose logits are finite.
    t = target.astype(jnp.float32)
    aux = {"mod_router_bce": _finite_bce(logits, t),
           "mod_predictor_bce": _finite_bce(pred_logits, t)}
    aux_loss = (cfg.aux_weight * aux["mod_router_bce"]
                + cfg.predictor_weight * aux["mod_predictor_bce"])
    score = router_score(jnp.where(chosen, logits, 0.0), cfg.score)
    metrics = {"mod_capacity": jnp.mean(chosen.astype(jnp.float32)),
               "mod_score_mean": jnp.sum(jnp.where(chosen, score, 0.0))
               / jnp.maximum(jnp.sum(chosen), 1)}
    for name, pred in (("pred", pred_logits > 0), ("router", logits > 0)):
      for key, value in selection_metrics(pred, target).items():
        metrics[f"mod_{name}_{key}"] = value
    metrics["mod_causal_capacity"] = metrics[
        "mod_pred_capacity" if cfg.causal == "predictor"
        else "mod_router_capacity"]
    self.sow("router", "aux_loss", aux_loss)
    self.sow("router", "aux", aux)
    self.sow("router", "metrics", metrics)
    return x + update.astype(x.dtype), chosen

  def _block(self) -> Block:
    """The wrapped block "block", returning its update Δ alone."""
    return Block(self.num_heads, self.d_ff, self.moe, self.activation,
                 self.dtype, self.param_dtype, num_kv_heads=self.num_kv_heads,
                 attention=self.attention, residual=False, name="block")

  def _decode(self, x, positions, score, chosen, kv, skip, train):
    """Cached decoding: x' = x + score * Δ at the chosen tokens, which alone
    are stored in `kv`. Returns (x', chosen, kv)."""
    def run(mdl, x, kv):
      delta, kv = mdl._block()(x, positions, train=train, kv=kv,
                               kv_mask=chosen, token_mask=chosen)
      update = (delta * score[..., None].astype(delta.dtype)).astype(x.dtype)
      return jnp.where(chosen[..., None], x + update, x), kv

    if skip == "cond":
      x, kv = nn.cond(jnp.any(chosen), run, lambda mdl, x, kv: (x, kv), self,
                      x, kv)
    else:
      x, kv = run(self, x, kv)
    return x, chosen, kv
