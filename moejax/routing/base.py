"""Routing contract shared by every router, method and dispatcher.

Axis legend:
  G  groups in the layer's batch
  S  tokens in one group
  E  experts
  K  choices per token
  C  capacity (slots per expert)

A router maps float32 logits `[S, E]` to a `RouterOutput`. Its `Routing` says, for
each (token, expert) pair, the combine weight (`gates`, exactly 0 = not routed) and
the priority an expert uses to keep tokens when it is over capacity (higher first,
ties to the lower token index). Token-choice and expert-choice routers, fixed or
variable fanout, all speak this one form; dispatchers turn it into indices.

A `RouterMethod` is the one object that names a routing method in a model config.
It holds the method's hyperparameters (validated at construction), declares its
capabilities (`token_local`, `uses_rng`, `default_num_shared`, `capacity`,
`max_fanout`) and answers the layer's questions: how to route one group (calling
the method's pure function with plain arguments), what controller state a layer
keeps (`init_state`) and how that state changes after a training step (`update`).
Controller state is never a param: the layer reads it from the `router_state`
variable collection, and the train step writes it. Methods register under their
`name` (`register`, `get`, `available`, `build`); each lives in one module of this
package with its router function(s) and its controller.

Capacity: `C = ceil(capacity_factor * S * k / E)` rounded up to a multiple of 4
(`capacity`), with k the method's target mean fanout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from moejax import backend

Path = tuple[str, ...]
_TINY = float(jnp.finfo(jnp.float32).tiny)


@flax.struct.dataclass
class Routing:
  """Where each token goes.

  Attributes:
    gates: float32[S, E]; combine weight of token s at expert e, exactly 0 where
      the token is not routed to the expert.
    priority: float32[S, E]; over capacity an expert keeps routed tokens of higher
      priority first, ties to the lower token index. Ignored where gates == 0.
  """
  gates: jax.Array
  priority: jax.Array

  @property
  def routed(self) -> jax.Array:
    """bool[S, E]: the assignments the router made."""
    return self.gates != 0


@flax.struct.dataclass
class RouterOutput:
  """A router's result for one group.

  Attributes:
    routing: the `Routing`.
    aux: dict of unweighted scalar losses (`load_balance`, `z_loss`, `entropy`).
    metrics: dict of arrays, at least `experts_per_token` (scalar) and
      `expert_load` float32[E] (fraction of assignments, sums to 1).
  """
  routing: Routing
  aux: dict[str, Any]
  metrics: dict[str, Any]


def check_logits(logits: jax.Array) -> jax.Array:
  """Checks `[S, E]` with S, E >= 1 and returns float32 logits."""
  if logits.ndim != 2:
    raise ValueError(
        f"logits must have shape [S, E] (one group); got shape {logits.shape}. "
        "Use jax.vmap for several groups.")
  for axis, size in zip("SE", logits.shape):
    if size < 1:
      raise ValueError(f"logits have {axis}={size} "
                       f"{'tokens' if axis == 'S' else 'experts'}; allowed: "
                       f"{axis} >= 1")
  return logits.astype(jnp.float32)


def finite_tokens(logits: jax.Array) -> jax.Array:
  """bool[...]: tokens whose logits `[..., E]` are usable for routing.

  A token is finite when none of its logits is NaN or +inf and at least one is
  finite (-inf marks a masked expert). Routers route a non-finite token nowhere
  (gates 0), never let it take a slot from another token, and leave it out of
  the batch statistics (aux losses, metrics, controller inputs).
  """
  ok = ~jnp.isnan(logits) & (logits < jnp.inf)
  return jnp.all(ok, axis=-1) & jnp.any(jnp.isfinite(logits), axis=-1)


def guard_tokens(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(safe float32[S, E], ok bool[S]): `logits` with non-finite tokens zeroed.

  Routers compute on `safe` and route the tokens where `ok` is False nowhere.
  The replacement comes before any differentiated operation (the "double
  where"): a NaN that entered a softmax would make that token's row of the
  gradient NaN even where its output is masked later, and with it the router
  kernel's gradient and the whole step. With the guard the bad token's row of
  the gradient is 0 and every other token's is unchanged.
  """
  ok = finite_tokens(logits)
  return jnp.where(ok[..., None], logits, 0.0), ok


def stats_probs(probs: jax.Array, ok: jax.Array) -> jax.Array:
  """float32[S, E] probabilities with NaN rows where bool[S] `ok` is False,
  so that aux losses and metrics (means over finite rows) leave those tokens
  out; the NaN is a constant of the select, so no gradient is NaN."""
  return jnp.where(ok[..., None], probs, jnp.nan)


# ---------------------------------------------------------------------------
# Dense gates from per-token choices.
# ---------------------------------------------------------------------------

def scatter_rows(values: jax.Array, index: jax.Array, width: int) -> jax.Array:
  """out[r, index[r, j]] += values[r, j]: [R, K] entries into a dense [R, W].

  A scatter-add (its gradient is a gather) on CPU and GPU; a one-hot einsum
  on TPU, where it runs on the matrix unit. The one-hot form materialises
  [R, K, W], which is far slower than the scatter elsewhere.

  Args:
    values: float[R, K].
    index: int32[R, K] columns in [0, W).
    width: W.
  Returns:
    float[R, W] in values' dtype.
  """
  if backend.use_one_hot_scatter():
    one_hot = jax.nn.one_hot(index, width, dtype=values.dtype)
    return jnp.einsum("rk,rkw->rw", values, one_hot,
                      precision=jax.lax.Precision.HIGHEST)
  rows = jnp.arange(values.shape[0], dtype=jnp.int32)[:, None]
  return jnp.zeros((values.shape[0], width), values.dtype).at[
      rows, index].add(values, indices_are_sorted=False, unique_indices=False)


def take_rows(values: jax.Array, index: jax.Array) -> jax.Array:
  """out[r, j] = values[r, index[r, j]]: a dense [R, W] read at [R, K] columns.

  A gather (`take_along_axis`; its gradient is a scatter-add) on CPU and GPU;
  a select over the W columns on TPU ([R, K, W] elementwise, then a sum over
  W; its gradient is elementwise too). XLA:TPU costs the gather's and the
  scatter's batched index operations at about one memory tile per element
  (experiments/reports/bench_moe_tpu.md). Same values and gradients either
  way: exactly one term of the sum is nonzero.

  Args:
    values: float[R, W].
    index: int[R, K] columns in [0, W).
  Returns:
    float[R, K] in values' dtype.
  """
  if backend.use_one_hot_scatter():
    hit = index[..., None] == jnp.arange(values.shape[-1], dtype=index.dtype)
    return jnp.sum(jnp.where(hit, values[:, None, :],
                             jnp.zeros((), values.dtype)), axis=-1)
  return jnp.take_along_axis(values, index, axis=1)


def top_k_rows(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis, differentiable without scatters on TPU.

  The gradient of `lax.top_k`'s values is a scatter-add into [R, W] (under
  the `vmap` of `RouterMethod.route_groups`, a batched one that XLA:TPU costs
  at gigabytes for a few thousand tokens). On TPU the indices come from
  `lax.top_k` of the values without gradient and the values are read at them
  with `take_rows`' select. Same values, indices (ties: the lower column
  first) and gradients on every backend.

  Args:
    values: float[R, W].
    k: static 1 <= k <= W.
  Returns:
    (top float[R, k] descending, index int32[R, k]).
  """
  if backend.use_one_hot_scatter():
    _, index = jax.lax.top_k(jax.lax.stop_gradient(values), k)
    return take_rows(values, index), index
  return jax.lax.top_k(values, k)


def scatter_choices(weights: jax.Array, index: jax.Array, num_experts: int,
                    keep: jax.Array | None = None) -> jax.Array:
  """Scatters per-choice weights into a dense gate matrix.

  Args:
    weights: float32[S, K] weight of each choice.
    index: int32[S, K] expert of each choice (distinct within a row).
    num_experts: E.
    keep: optional bool[S, K]; dropped choices get gate 0.
  Returns:
    float32[S, E], nonzero (at least float32 tiny) exactly at kept choices, so
    that an underflowing probability still counts as routed.
  """
  weights = jnp.maximum(weights, _TINY)
  if keep is not None:
    weights = jnp.where(keep, weights, 0.0)
  return scatter_rows(weights.astype(jnp.float32), index, num_experts)


def choice_priority(index: jax.Array, num_experts: int) -> jax.Array:
  """float32[S, E]: k - rank at chosen experts (first choices highest), else 0."""
  k = index.shape[-1]
  rank_value = (k - jnp.arange(k, dtype=jnp.float32))[None, :]  # [1, K]
  return scatter_rows(jnp.broadcast_to(rank_value, index.shape), index,
                      num_experts)


# ---------------------------------------------------------------------------
# Capacity.
# ---------------------------------------------------------------------------

def capacity(num_tokens: int, k: float, num_experts: int,
             capacity_factor: float, multiple: int = 4) -> int:
  """Slots per expert: `ceil(capacity_factor * S * k / E)` rounded up to `multiple`.

  Args:
    num_tokens: S, tokens in the group.
    k: target mean fanout (experts per token).
    num_experts: E.
    capacity_factor: > 0.
    multiple: round up to a multiple of this (4 by default).
  """
  check_capacity_args(num_tokens, capacity_factor)
  if not k > 0:
    raise ValueError(f"k={k} is out of range; allowed: > 0")
  c = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return max(multiple, multiple * math.ceil(c / multiple))


def check_capacity_args(num_tokens: int, capacity_factor: float) -> None:
  """Validates the arguments every method's `capacity` takes: S >= 1 tokens
  and a finite capacity factor > 0 (also where a method ignores it)."""
  if isinstance(num_tokens, bool) or not num_tokens >= 1:
    raise ValueError(f"num_tokens={num_tokens} is out of range; allowed: >= 1")
  if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
    raise ValueError(
        f"capacity_factor={capacity_factor} is out of range; allowed: > 0")


def ceil_div(a: float, b: float) -> int:
  return int(math.ceil(a / b))


def mean_metric(metrics: Mapping[Path, Any], key: str) -> jax.Array:
  """Mean of a scalar metric over layers."""
  return jnp.mean(jnp.stack([jnp.asarray(m[key]) for m in metrics.values()]))


# ---------------------------------------------------------------------------
# Methods and their registry.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RouterMethod:
  """Base class. Subclasses set `name` and implement `route`.

  Capabilities (class attributes a method overrides where they differ):
    token_local: in evaluation and sampling, each token's routing depends on
      that token's logits (and the frozen controller state) alone, so cached
      decoding reproduces the full forward pass. False for expert choice and
      any method whose evaluation routing uses statistics of the group.
    causal_eval: the method promises causal inference (a token's evaluation
      output never depends on later tokens), so the layer gives evaluation
      capacity for every token of the group (no drops by group-wide priority).
      Needs `token_local`. True for Expert Threshold.
    uses_rng: training routing draws from the layer's "router" rng.
    default_num_shared: always-on shared experts the method comes with (the
      CLI's default for `num_shared`).
    aliases: `(name, option, value)`: `build(name, {option: value, ...})`
      builds this method (older spellings of a method that became its own).
  `capacity` and `max_fanout` are methods (they depend on the options).

  Attributes:
    k: experts per token for top-k, and the target mean fanout of every
      variable-fanout method.
  """
  name: ClassVar[str] = ""
  token_local: ClassVar[bool] = True
  causal_eval: ClassVar[bool] = False
  uses_rng: ClassVar[bool] = False
  default_num_shared: ClassVar[int] = 0
  # (other name, option, value) triples that `build` reads as this method,
  # e.g. ("top_k", "balance", "loss_free") for loss-free top-k.
  aliases: ClassVar[tuple[tuple[str, str, Any], ...]] = ()
  # The metric each layer's controller (`self.controller`) reads in the
  # default `update`; None = no per-layer controller.
  controller_metric: ClassVar[str | None] = None
  # Default aux-loss weights (load_balance, z_loss, entropy) of the method.
  aux_weights: ClassVar[Mapping[str, float]] = {
      "load_balance": 1e-2, "z_loss": 1e-3, "entropy": 0.0}

  k: int = 2

  def __post_init__(self):
    if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
      raise ValueError(f"k={self.k!r} is out of range; allowed: integer >= 1")

  def validate(self, num_experts: int) -> None:
    """Checks the method against the layer's expert count."""
    if self.k > num_experts:
      raise ValueError(
          f"k={self.k} is larger than num_experts={num_experts}; allowed: "
          f"1 <= k <= num_experts")

  @property
  def target_fanout(self) -> float:
    """Mean experts per token the method aims for (sets capacity)."""
    return float(self.k)

  def max_fanout(self, num_experts: int) -> int:
    """Static bound on experts per token (the dropless layout's bound)."""
    return num_experts

  def capacity(self, num_tokens: int, num_experts: int,
               capacity_factor: float) -> int:
    """Slots per expert for a group of `num_tokens` (the `capacity` formula)."""
    return capacity(num_tokens, self.target_fanout, num_experts,
                    capacity_factor)

  def init_state(self, num_experts: int) -> dict[str, jax.Array]:
    """Per-layer controller state ({} = none)."""
    del num_experts
    return {}

  def router_params(self, num_experts: int) -> dict[str, Any]:
    """Extra learned router params of each layer: {name: initial value}.

    The MoE layer creates each one as a float32 param of the value's shape under
    that name (trained by the loss, unlike controller state) and passes it to
    `route`/`route_groups` inside the `state` mapping under the same name, beside
    the controller state. Names must differ from the `init_state` keys. {} = none.
    """
    del num_experts
    return {}

  def route(self, logits: jax.Array, state: Mapping[str, jax.Array], *,
            rng: jax.Array | None, train: bool) -> RouterOutput:
    """Routes one group: logits float32[S, E] -> RouterOutput."""
    raise NotImplementedError

  def route_groups(self, logits: jax.Array, state: Mapping[str, jax.Array], *,
                   rng: jax.Array | None, train: bool) -> RouterOutput:
    """Routes all groups: logits float32[G, S, E] -> RouterOutput with a G axis.

    The default vmaps `route` over groups with one rng per group; methods whose
    statistics need the whole batch (e.g. per-expert cutoffs) override this.
    """
    num_groups = logits.shape[0]
    if rng is None:
      return jax.vmap(lambda l: self.route(l, state, rng=None, train=train))(
          logits)
    rngs = jax.random.split(rng, num_groups)
    return jax.vmap(lambda l, r: self.route(l, state, rng=r, train=train))(
        logits, rngs)

  def update(self, states: Mapping[Path, Any], metrics: Mapping[Path, Any],
             step: jax.Array) -> dict[Path, Any]:
    """New controller states after a training step.

    The default: with `controller_metric` set, each layer's state is
    `self.controller.update(state, that layer's metrics[controller_metric])`;
    else the states are unchanged.

    Args:
      states: {layer path: that layer's state} for every routed layer.
      metrics: {layer path: that layer's metrics, reduced over the global batch}.
      step: int32[] the step just taken (0-based).
    """
    del step
    if self.controller_metric is None:
      return dict(states)
    ctrl = self.controller
    return {path: ctrl.update(states[path],
                              metrics[path][self.controller_metric])
            for path in states}

  def state_metrics(self, states: Mapping[Path, Any]) -> dict[str, jax.Array]:
    """Scalars worth logging from the controller states (e.g. the current p)."""
    del states
    return {}


_REGISTRY: dict[str, type[RouterMethod]] = {}


def register(cls: type[RouterMethod]) -> type[RouterMethod]:
  """Class decorator adding a method under `cls.name`."""
  _REGISTRY[cls.name] = cls
  return cls


def available() -> tuple[str, ...]:
  """Names of the registered methods, sorted."""
  return tuple(sorted(_REGISTRY))


def get(name: str) -> type[RouterMethod]:
  """The method class registered under `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"router={name!r} is not available; allowed: "
                     f"{', '.join(available())}")
  return _REGISTRY[name]


def resolve(name: str, options: Mapping[str, Any] | None = None) -> str:
  """The registered name that `name` with `options` stands for (its aliases:
  `RouterMethod.aliases`, e.g. top_k with balance=loss_free is loss_free)."""
  options = options or {}
  for cls in _REGISTRY.values():
    for alias, option, value in cls.aliases:
      if name == alias and options.get(option) == value:
        return cls.name
  return name


def build(name: str, options: Mapping[str, Any] | None = None) -> RouterMethod:
  """Builds a method from a name and a mapping of options (e.g. all CLI flags).

  `name` may be an alias (`resolve`). Only the options that are fields of the
  method are used; None values are skipped (the method's default applies).
  """
  options = options or {}
  cls = get(resolve(name, options))
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  kwargs = {k: v for k, v in options.items() if k in fields and v is not None}
  return cls(**kwargs)
