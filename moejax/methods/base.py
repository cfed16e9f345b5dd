"""Routing methods: frozen configs that adapt a router function to the MoE layer.

Axis legend:
  G  groups in the layer's batch
  S  tokens in one group
  E  experts

A `RouterMethod` is the one object that names a routing method in a model config.
It holds the method's hyperparameters (validated at construction) and answers the
layer's questions: how to route one group (calling the pure function of
`moejax.routing` with plain arguments), what capacity and fanout bound to use, what
controller state a layer keeps (`init_state`), and how that state changes after a
training step (`update`). Controller state is never a param: the layer reads it
from the `router_state` variable collection, and the train step writes it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from moejax import dispatch
from moejax.routing.base import RouterOutput

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RouterMethod:
  """Base class. Subclasses set `name` and implement `route`.

  Attributes:
    k: experts per token for top-k, and the target mean fanout of every
      variable-fanout method.
  """
  name: ClassVar[str] = ""
  uses_rng: ClassVar[bool] = False
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
    """Slots per expert for a group of `num_tokens` (DESIGN.md formula)."""
    return dispatch.capacity(num_tokens, self.target_fanout, num_experts,
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

    Args:
      states: {layer path: that layer's state} for every routed layer.
      metrics: {layer path: that layer's metrics, reduced over the global batch}.
      step: int32[] the step just taken (0-based).
    """
    del metrics, step
    return dict(states)

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
  return tuple(sorted(_REGISTRY))


def get(name: str) -> type[RouterMethod]:
  if name not in _REGISTRY:
    raise ValueError(f"router={name!r} is not available; allowed: "
                     f"{', '.join(available())}")
  return _REGISTRY[name]


def build(name: str, options: Mapping[str, Any] | None = None) -> RouterMethod:
  """Builds a method from a name and a mapping of options (e.g. all CLI flags).

  Only the options that are fields of the method are used; None values are
  skipped (the method's default applies).
  """
  cls = get(name)
  options = options or {}
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  kwargs = {k: v for k, v in options.items() if k in fields and v is not None}
  return cls(**kwargs)


def ceil_div(a: float, b: float) -> int:
  return int(math.ceil(a / b))


def mean_metric(metrics: Mapping[Path, Any], key: str) -> jax.Array:
  """Mean of a scalar metric over layers."""
  return jnp.mean(jnp.stack([jnp.asarray(m[key]) for m in metrics.values()]))
