"""The Mixture-of-Experts layer: router -> Routing -> dispatcher -> experts.

Axis legend:
  B  batch
  L  sequence length
  G  groups (routing units; one sequence per group by default)
  S  tokens in one group
  E  experts
  D  model width
  F  expert width

Outputs travel through one documented Flax collection, `"router"`: every MoE
layer sows `aux_loss` (float32[], the configured weighted sum of its aux losses,
which the train step adds to the objective), `aux` (the unweighted losses),
`metrics` (reduced over the whole batch the layer saw) and `fanout`
(float32[G, S], experts routed per token, before capacity; per-token statistics
such as fanout by diffusion timestep). Controller state is read from the
`"router_state"` variable collection (variable `state`), never a param.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import dispatch, sharding
from moejax.checks import check_choice
from moejax.experts import ACTIVATIONS, DenseFFN, Experts
from moejax.routing import RouterMethod, TopK
from moejax.nn import expert_parallel
from moejax.routing import losses
from moejax.routing.base import Routing, finite_tokens

AUX_KEYS = ("load_balance", "z_loss", "entropy")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Configuration of one MoE layer.

  Attributes:
    num_experts: routed experts E.
    expert_width: F, hidden width of each routed expert.
    router: the routing method (e.g. `TopK(k=2)`), with its own options.
    num_shared: always-on shared experts (DeepSeekMoE), each of `shared_width`.
    shared_width: width of each shared expert (default `expert_width`).
    capacity_factor: training capacity factor (C formula in `routing.capacity`).
    eval_capacity_factor: capacity factor in evaluation and sampling (methods
      with `causal_eval`, e.g. Expert Threshold, get a slot for every token).
    strategy: dispatch strategy (`moejax.dispatch.STRATEGIES`): "auto"
      (default; the backend's fastest capacity strategy, "gather" on CPU, GPU
      and TPU: `moejax.backend.choose_strategy`), "gather" (the capacity
      semantics of "index" with gather-only dispatch
      and combine and, on CPU, a fused block loop), "index", "einsum" (the
      one-hot reference), "dropless" ("sorted" on CPU, "ragged" elsewhere),
      "sorted", "ragged".
    remat: recompute the expert hidden activations in the backward pass
      instead of saving them (less memory, one more up-projection).
    group_size: tokens per routing group; None = one sequence per group.
    activation: "swiglu" or "gelu".
    load_balance_weight / z_loss_weight / entropy_weight: aux loss weights;
      None takes the router method's default.
    router_init_scale: scale of the router's initial weights (0.1 helps).
    expert_parallel: "gspmd" (sharding constraints on the [G, E, C, D] buffers
      induce the all-to-all) or "shard_map" (explicit `jax.lax.all_to_all`
      over the `expert` mesh axis); see `moejax.nn.expert_parallel`.
    num_noop_experts: no-op (identity) experts added to the router (integrated
      MoDE): the router chooses among E + N experts; an assignment to a no-op
      expert adds no MLP update and costs no compute.
  """
  num_experts: int = 8
  expert_width: int = 256
  router: RouterMethod = dataclasses.field(default_factory=TopK)
  num_shared: int = 0
  shared_width: int | None = None
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  strategy: dispatch.Strategy = dispatch.DEFAULT_STRATEGY
  group_size: int | None = None
  activation: str = "swiglu"
  load_balance_weight: float | None = None
  z_loss_weight: float | None = None
  entropy_weight: float | None = None
  router_init_scale: float = 0.1
  expert_parallel: expert_parallel.Mode = "gspmd"
  num_noop_experts: int = 0
  remat: bool = False

  def __post_init__(self):
    def positive(name, value):
      if isinstance(value, bool) or value is None or not value > 0:
        raise ValueError(f"{name}={value!r} is out of range; allowed: > 0")
    positive("num_experts", self.num_experts)
    positive("expert_width", self.expert_width)
    positive("capacity_factor", self.capacity_factor)
    positive("eval_capacity_factor", self.eval_capacity_factor)
    positive("router_init_scale", self.router_init_scale)
    if self.num_shared < 0:
      raise ValueError(
          f"num_shared={self.num_shared} is out of range; allowed: >= 0")
    if isinstance(self.num_noop_experts, bool) or self.num_noop_experts < 0:
      raise ValueError(f"num_noop_experts={self.num_noop_experts!r} is out of "
                       "range; allowed: >= 0")
    if self.group_size is not None:
      positive("group_size", self.group_size)
    check_choice("expert_parallel", self.expert_parallel,
                 expert_parallel.MODES)
    check_choice("strategy", self.strategy, dispatch.STRATEGIES)
    check_choice("activation", self.activation, ACTIVATIONS)
    for key in AUX_KEYS:
      w = getattr(self, f"{key}_weight")
      if w is not None and w < 0:
        raise ValueError(f"{key}_weight={w} is out of range; allowed: >= 0")
    self.router.validate(self.router_experts)

  @property
  def router_experts(self) -> int:
    """Experts the router chooses among: E real + the no-op ones."""
    return self.num_experts + self.num_noop_experts

  def aux_weight(self, key: str) -> float:
    w = getattr(self, f"{key}_weight")
    return self.router.aux_weights.get(key, 0.0) if w is None else w


def to_groups(x: jax.Array, group_size: int | None) -> jax.Array:
  """float[B, L, D] -> float[G, S, D] (S = group_size, default L)."""
  batch, length, width = x.shape
  size = length if group_size is None else group_size
  if (batch * length) % size:
    raise ValueError(f"group_size={size} must divide batch*length="
                     f"{batch * length}")
  return x.reshape(batch * length // size, size, width)


def layer_metrics(gates: jax.Array, kept: jax.Array,
                  group_metrics: dict[str, jax.Array],
                  tokens: jax.Array | None = None) -> dict[str, jax.Array]:
  """Metrics of a whole layer.

  Args:
    gates: float32[G, S, E]; kept: bool[G, S, E]; group_metrics: the routers'
      per-group metrics with a leading G axis.
    tokens: optional bool[G, S], the tokens the statistics count (default
      all): the finite ones, which the routers route.
  Returns:
    group metrics averaged over groups, with the load statistics recomputed
    over all groups together, plus `drop_fraction`,
    `drop_fraction_above_mean` (drops among tokens with more experts than the
    mean) and `kept_per_token`.
  """
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), group_metrics)
  num_experts = gates.shape[-1]
  flat = Routing(gates=gates.reshape(-1, num_experts),
                 priority=jnp.zeros_like(gates.reshape(-1, num_experts)))
  metrics.update(losses.routing_metrics(
      flat, tokens=None if tokens is None else tokens.reshape(-1)))
  routed = flat.routed & jnp.isfinite(flat.gates)  # dispatch skips NaN gates
  kept = kept.reshape(routed.shape)
  metrics["drop_fraction"] = (routed & ~kept).sum() / jnp.maximum(routed.sum(), 1)
  # Variable fanout: drops among the tokens routed to more experts than the mean
  # (a capacity sized from the target fanout must not hide their losses).
  fanout = routed.sum(axis=-1)
  above = (fanout > fanout.mean())[:, None] & routed
  metrics["drop_fraction_above_mean"] = (
      (above & ~kept).sum() / jnp.maximum(above.sum(), 1))
  metrics["kept_per_token"] = kept.sum(axis=-1).mean().astype(jnp.float32)
  metrics["max_fanout"] = routed.sum(axis=-1).max().astype(jnp.float32)
  return metrics


class MoE(nn.Module):
  """Routed feed-forward layer: x float[B, L, D] -> float[B, L, D]."""
  config: MoEConfig
  d_model: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               token_mask: jax.Array | None = None) -> jax.Array:
    """x float[B, L, D] -> float[B, L, D].

    `token_mask` (bool[B, L], default all): the tokens to route. The others
    are routed nowhere (their output is 0 plus the shared experts'), take no
    capacity and stay out of the aux losses and metrics: a MoD block's empty
    slots, which must not change the routing of the tokens it processes.
    """
    cfg = self.config
    method = cfg.router
    batch, length, width = x.shape
    if length < 1 or batch < 1:
      axis, size = ("L", length) if length < 1 else ("B", batch)
      raise ValueError(f"x has {axis}={size} "
                       f"{'tokens per sequence' if axis == 'L' else 'sequences'}"
                       f"; allowed: {axis} >= 1")
    groups = sharding.constrain(to_groups(x, cfg.group_size), sharding.ACT_GSD)
    num_tokens = groups.shape[1]

    router_kernel = self.param(
        "router", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(cfg.router_init_scale, "fan_in",
                                             "truncated_normal"),
            ("embed", "expert")),
        (width, cfg.router_experts), self.param_dtype)
    # A token with a NaN / inf input: its logits are NaN (routed nowhere, left
    # out of the statistics), computed from zeros so that the router kernel's
    # gradient stays finite (the bad token costs itself, not the step).
    x32 = groups.astype(jnp.float32)
    x_ok = jnp.all(jnp.isfinite(x32), axis=-1, keepdims=True)
    if token_mask is not None:  # masked tokens: routed nowhere, like NaN ones
      x_ok = x_ok & to_groups(token_mask[..., None], cfg.group_size)
    logits = jnp.einsum("gsd,de->gse", jnp.where(x_ok, x32, 0.0),
                        router_kernel.astype(jnp.float32))
    logits = jnp.where(x_ok, logits, jnp.nan)

    init_state = method.init_state(cfg.router_experts)
    state = (self.variable("router_state", "state", lambda: init_state).value
             if init_state else {})
    # Learned router params a method declares (e.g. DTop-p's scale gamma):
    # trained by the loss, handed to the router beside the controller state.
    extra = method.router_params(cfg.router_experts)
    if extra:
      clash = sorted(set(extra) & set(state))
      if clash:
        raise ValueError(f"router params {clash} clash with controller state "
                         f"keys of router={method.name!r}")
      state = {**state, **{
          name: self.param(name, lambda _, v=value: jnp.asarray(v, jnp.float32))
          for name, value in extra.items()}}
    rng = self.make_rng("router") if (train and method.uses_rng) else None
    out = method.route_groups(logits, state, rng=rng, train=train)

    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    cap = method.capacity(num_tokens, cfg.router_experts, factor)
    if not train and method.causal_eval:
      # Causal inference: no drops by group-wide priority, a slot per token.
      cap = max(cap, num_tokens)
    max_fanout = min(method.max_fanout(cfg.router_experts), cfg.num_experts)
    weights = Experts(cfg.num_experts, width, cfg.expert_width, cfg.activation,
                      self.dtype, self.param_dtype, name="experts")()

    routing = out.routing
    if cfg.num_noop_experts:  # no-op experts: no slots, no compute, no update
      routing = Routing(gates=routing.gates[..., :cfg.num_experts],
                        priority=routing.priority[..., :cfg.num_experts])
    # Per-group plans + experts; "gspmd"/"shard_map" expert parallelism.
    y, kept = expert_parallel.routed_experts(
        routing, groups.astype(self.dtype), weights, capacity=cap,
        strategy=cfg.strategy, max_fanout=max_fanout,
        activation=cfg.activation, mode=cfg.expert_parallel,
        remat=cfg.remat)
    y = sharding.constrain(y, sharding.ACT_GSD).reshape(batch, length, width)
    if cfg.num_shared:
      shared_width = cfg.shared_width or cfg.expert_width
      y = y + DenseFFN(width, shared_width * cfg.num_shared, cfg.activation,
                       self.dtype, self.param_dtype, name="shared")(x)

    aux = {k: jnp.mean(v) for k, v in out.aux.items()}
    aux_loss = sum((cfg.aux_weight(k) * aux[k] for k in aux if k in AUX_KEYS),
                   jnp.zeros((), jnp.float32))
    if cfg.num_noop_experts:  # no-op assignments are never dropped
      noop = out.routing.routed[..., cfg.num_experts:]
      kept = jnp.concatenate([kept, noop], axis=-1)
    finite = finite_tokens(logits)
    metrics = layer_metrics(out.routing.gates, kept, out.metrics, finite)
    if token_mask is not None:  # masked tokens are not counted as non-finite
      finite = finite | ~to_groups(token_mask[..., None], cfg.group_size)[..., 0]
    metrics["capacity"] = jnp.asarray(cap, jnp.float32)
    # Tokens with a NaN / +inf router logit: routed nowhere by the routers that
    # check (`routing.finite_tokens`), left out of aux losses and metrics.
    metrics["nonfinite_tokens"] = jnp.sum(~finite).astype(jnp.float32)
    if cfg.num_noop_experts:
      routed = out.routing.routed
      metrics["noop_fraction"] = (noop.sum() / jnp.maximum(routed.sum(), 1)
                                  ).astype(jnp.float32)
      metrics["mlp_skip_fraction"] = jnp.mean(
          ~routed[..., :cfg.num_experts].any(axis=-1)).astype(jnp.float32)
    self.sow("router", "aux_loss", aux_loss)
    self.sow("router", "aux", aux)
    self.sow("router", "metrics", metrics)
    self.sow("router", "fanout",
             out.routing.routed.sum(axis=-1).astype(jnp.float32))
    return y.astype(x.dtype)
