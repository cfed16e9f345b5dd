"""The jit-compiled train and evaluation steps.

Axis legend:
  B  batch
  L  sequence length
  V  vocabulary

One `train_step(state, batch) -> (state, metrics)` computes the LM loss plus the
routed layers' weighted aux losses (sown in the `"router"` collection), updates
params with optax, then updates every controller from that step's router metrics,
which are already reduced over the whole global batch (the step is one SPMD
program over the mesh).

Non-finite steps: when the objective, the global gradient norm or the new
params are not finite (`step_is_finite`, the one predicate), the step keeps
params, optimizer state and controller state as they were (one select of old
or new for all three, inside the one compiled program; `optax.apply_if_finite`
would guard the optimizer alone) while the step counter and the data position
advance, so the run moves past the bad batch. The metrics say so: `skipped`
(1.0 when the update was dropped), `nonfinite_loss` (1.0 when the objective
itself was not finite) and `nonfinite_update` (1.0 when loss and gradient
were finite but the update was not, e.g. an overflowing learning rate).

Gradient accumulation (`grad_accum=N`): the global batch B is split into N
microbatches of B/N rows (microbatch j holds rows j, j+N, ...: each device
keeps its own rows when B is a multiple of N x the batch shards), run one
after the other (`lax.scan`) in the same compiled step, their gradients
summed in float32. Each microbatch's objective is scaled so that the sum is
the full batch's: the LM's summed cross-entropy over the whole batch's token
count plus 1/N of its aux loss (aux losses are means over equal-sized
groups); a custom loss is averaged. The router metrics are combined over
the microbatches (means; `max_*` maxima, `nonfinite_tokens` sums) before the
controllers read them, so a controller sees the whole batch's statistics
(e.g. DTop-p's mean fanout). One optimizer update and one non-finite check
follow. The update equals that of one step on the whole batch up to float
reassociation, for routers whose training routing draws no random numbers
(with an rng, microbatch j folds j into the step's key).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from moejax.models.scan import scan_plan_of, stack_layers, unstack_layers
from moejax.routing import RouterMethod
from moejax.train.state import TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed masked CE and token count. logits float32[B, L, V], targets int32[B, L]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_cross_entropy(x: jax.Array, kernel: jax.Array, targets: jax.Array,
                          mask: jax.Array, chunk: int
                          ) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy` of the logits `x @ kernel`, computed chunk by chunk.

  The sequence is cut into chunks of `chunk` tokens; a `lax.scan` computes
  each chunk's float32 logits [B, chunk, V], their log-sum-exp and the
  target's logit, and keeps none of them for the backward pass
  (`jax.checkpoint`: the chunk's logits are recomputed there), so the live
  logits are float32[B, chunk, V] instead of [B, L, V] (the model's head is
  a float32 matmul: x is cast to float32 as the head does).

  Args:
    x: float[B, L, D] final hidden states (`TransformerLM(hidden=True)`).
    kernel: float32[D, V] the output head.
    targets: int32[B, L]; mask: float32[B, L].
    chunk: tokens per chunk; must divide L.
  Returns:
    (summed masked CE, token count), as `cross_entropy`.
  """
  batch, length, width = x.shape
  if isinstance(chunk, bool) or chunk < 1 or length % chunk:
    raise ValueError(f"loss_chunk={chunk!r} must be a positive divisor of "
                     f"the sequence length {length}")
  pieces = length // chunk
  split = lambda a: jnp.swapaxes(
      a.reshape(batch, pieces, chunk, *a.shape[2:]), 0, 1)

  @jax.checkpoint
  def piece_nll(xc, tc, mc):
    logits = jnp.einsum("bcd,dv->bcv", xc.astype(jnp.float32),
                        kernel.astype(jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target) * mc)

  def body(total, inputs):
    return total + piece_nll(*inputs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (split(x), split(targets), split(mask)))
  return total, jnp.sum(mask)


def router_outputs(collection: Any) -> dict[tuple[str, ...], dict[str, Any]]:
  """{layer path: {"aux_loss", "aux", "metrics"}} from a sown "router" collection
  (a scanned model's per layer, as the unrolled model's: `unstack_layers`)."""
  flat = flax.traverse_util.flatten_dict(
      unstack_layers(collection), is_leaf=lambda k, v:
                                         isinstance(v, tuple))
  layers: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, value in flat.items():
    layers.setdefault(path[:-1], {})[path[-1]] = value[-1]
  return dict(sorted(layers.items()))


def router_states(router_state: Any) -> dict[tuple[str, ...], Any]:
  """{layer path: state} from the `router_state` collection (a scanned
  model's per layer, as the unrolled model's: `unstack_layers`)."""
  flat = flax.traverse_util.flatten_dict(
      unstack_layers(router_state), is_leaf=lambda k, v: isinstance(v, dict) and k and
      k[-1] == "state")
  return {path[:-1]: value for path, value in flat.items()}


def update_router_state(method: RouterMethod | None, router_state: Any,
                        layers: dict[tuple[str, ...], dict[str, Any]],
                        step: jax.Array) -> Any:
  """Applies the method's controller update to every routed layer's state
  (layer by layer; a scanned model's state is unstacked and restacked)."""
  if method is None or not router_state:
    return router_state
  states = router_states(router_state)
  metrics = {path: layers[path]["metrics"] for path in states}
  new = method.update(states, metrics, step)
  flat = {path + ("state",): new[path] for path in states}
  return stack_layers(flax.traverse_util.unflatten_dict(flat),
                      scan_plan_of(router_state))


def summarize(layers: dict[tuple[str, ...], dict[str, Any]]) -> dict[str, Any]:
  """Scalar metrics averaged over routed layers, plus per-layer fanout.

  Each key is averaged over the layers that report it (MoE layers and MoD
  blocks report different keys; MoD's are prefixed `mod_`).
  """
  if not layers:
    return {}
  per_layer = [v["metrics"] for v in layers.values()]
  out = {}
  keys = dict.fromkeys(k for m in per_layer for k, v in m.items()
                       if jnp.ndim(v) == 0)
  for key in keys:
    out[key] = jnp.mean(jnp.stack([m[key] for m in per_layer if key in m]))
  moe_layers = [m for m in per_layer if "experts_per_token" in m]
  if moe_layers:
    out["layer_fanout"] = jnp.stack([m["experts_per_token"] for m in moe_layers])
    out["max_vio_max"] = jnp.max(jnp.stack([m["max_vio"] for m in moe_layers]))
  return out


# Router metrics combined over microbatches by max / sum (others: mean).
SUM_METRICS = ("nonfinite_tokens",)


def _combine_metric(key: str, stacked: jax.Array) -> jax.Array:
  """One metric [N, ...] of N equal microbatches as the whole batch's."""
  if key.startswith("max_"):
    return jnp.max(stacked, axis=0)
  if key in SUM_METRICS:
    return jnp.sum(stacked, axis=0)
  return jnp.mean(stacked, axis=0)


def split_microbatches(batch: Batch, n: int) -> Batch:
  """Every leaf [B, ...] as [n, B/n, ...]; microbatch j = rows j, j+n, ..."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch_size={x.shape[0]} must be divisible by "
                       f"grad_accum={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_loss_fn(model: nn.Module, train: bool):
  """The LM objective; with the model config's `loss_chunk` the head and the
  cross-entropy run chunk by chunk (`chunked_cross_entropy`)."""
  chunk = getattr(model.config, "loss_chunk", 0)

  def loss_fn(params, router_state, batch: Batch, rng):
    # Packed batches carry segment ids and per-document positions.
    out, coll = model.apply(
        {"params": params, "router_state": router_state}, batch["inputs"],
        train=train, rngs={"router": rng}, mutable=["router"],
        **({"hidden": True} if chunk else {}),
        **{k: batch[k] for k in ("segment_ids", "positions") if k in batch})
    if chunk:
      ce_sum, count = chunked_cross_entropy(
          out, nn.meta.unbox(params["head"]["kernel"]), batch["targets"],
          batch["mask"], chunk)
    else:
      ce_sum, count = cross_entropy(out, batch["targets"], batch["mask"])
    ce = ce_sum / jnp.maximum(count, 1.0)
    layers = router_outputs(coll.get("router", {}))
    aux_loss = sum((v["aux_loss"] for v in layers.values()),
                   jnp.zeros((), jnp.float32))
    return ce + aux_loss, (ce, aux_loss, ce_sum, count, layers)
  return loss_fn


def all_finite(tree: Any) -> jax.Array:
  """bool[]: every floating leaf of `tree` is finite (one reduction each)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def step_is_finite(objective: jax.Array, grad_norm: jax.Array,
                   new_params: Any) -> tuple[jax.Array, jax.Array]:
  """The skip predicate of a train step: (finite bool[], grads_finite bool[]).

  `finite`: the objective, the global gradient norm and every new param are
  finite (the update is applied); `grads_finite`: the first two alone (False
  with a finite update = a non-finite update, counted apart).
  """
  grads_finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
  return grads_finite & all_finite(new_params), grads_finite


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    method: RouterMethod | None,
                    schedule: optax.Schedule | None = None,
                    donate: bool = True,
                    loss_fn: Callable | None = None,
                    state_sharding: Any = None,
                    grad_accum: int = 1) -> Callable:
  """Returns jitted `train_step(state, batch) -> (state, metrics)`.

  `grad_accum`: microbatches per step (see the module docstring; 1 = the
  whole batch at once).

  `state_sharding` (NamedShardings of every TrainState leaf, e.g. from
  `moejax.train.loop.state_shardings`) pins the new state to the shardings the
  state was created with, metrics replicated. Without it XLA returns
  equivalent shardings under other specs, and the second step compiles again.

  `loss_fn` replaces the LM cross-entropy (e.g. a diffusion loss):
  `(params, router_state, batch, rng) -> (objective, (loss, aux_loss,
  extra_metrics: dict, layers))` with `layers` from `router_outputs`.
  """
  custom = loss_fn is not None
  if not custom:
    loss_fn = make_loss_fn(model, train=True)

  if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or (
      grad_accum < 1):
    raise ValueError(f"grad_accum={grad_accum!r} is out of range; allowed: "
                     "integer >= 1")

  def whole_batch(params, router_state, batch, rng):
    """(objective, ce, aux_loss, extra metrics, layers, grads)."""
    (objective, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, router_state, batch, rng)
    return (objective, out[0], out[1], out[2] if custom else {}, out[-1],
            grads)

  def accumulated(params, router_state, batch, rng):
    """`whole_batch`'s results from `grad_accum` microbatches."""
    n = grad_accum
    tokens = (None if custom else
              jnp.maximum(jnp.sum(batch["mask"]).astype(jnp.float32), 1.0))

    def micro_loss(p, micro, micro_rng):
      objective, out = loss_fn(p, router_state, micro, micro_rng)
      metrics = {path: v["metrics"] for path, v in out[-1].items()}
      if custom:  # a mean over the microbatch's items
        return objective / n, (out[0], out[1], out[2], metrics)
      ce_sum, aux_loss = out[2], out[1]
      return ce_sum / tokens + aux_loss / n, (ce_sum, aux_loss, {}, metrics)

    def body(acc, xs):
      micro, i = xs
      (objective, out), grads = jax.value_and_grad(micro_loss, has_aux=True)(
          params, micro, jax.random.fold_in(rng, i))
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return acc, (objective, out)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if state_sharding is not None:
      zeros = jax.lax.with_sharding_constraint(zeros, state_sharding.params)
    total, (objectives, (first, aux, extra, metrics)) = jax.lax.scan(
        body, zeros, (split_microbatches(batch, n), jnp.arange(n)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), total, params)
    ce = jnp.mean(first) if custom else jnp.sum(first) / tokens
    extra = {k: jnp.mean(v, axis=0) for k, v in extra.items()}
    layers = {path: {"metrics": {k: _combine_metric(k, v)
                                 for k, v in m.items()}}
              for path, m in metrics.items()}
    return (jnp.sum(objectives), ce, jnp.mean(aux), extra, layers, grads)

  gradients = whole_batch if grad_accum == 1 else accumulated

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    objective, ce, aux_loss, extra, layers, grads = gradients(
        state.params, state.router_state, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite, grads_finite = step_is_finite(objective, grad_norm, params)
    router_state = update_router_state(method, state.router_state, layers,
                                       state.step)
    # A non-finite step changes nothing but the step and the data position.
    params, opt_state, router_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state, router_state),
        (state.params, state.opt_state, state.router_state))
    metrics = {"loss": ce, "aux_loss": aux_loss, "grad_norm": grad_norm,
               "skipped": 1.0 - finite.astype(jnp.float32),
               "nonfinite_loss": 1.0 - jnp.isfinite(objective).astype(
                   jnp.float32),
               "nonfinite_update": (grads_finite & ~finite).astype(
                   jnp.float32),
               **summarize(layers), **extra}
    if method is not None and router_state:
      metrics.update(method.state_metrics(router_states(router_state)))
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, router_state=router_state,
                              data_index=state.data_index + 1)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=donate_argnums)
  mesh = jax.tree.leaves(state_sharding)[0].mesh
  return jax.jit(train_step, donate_argnums=donate_argnums,
                 out_shardings=(state_sharding,
                                jax.sharding.NamedSharding(mesh, P())))


def make_eval_step(model: nn.Module) -> Callable:
  """Returns jitted `eval_step(state, batch) -> metrics` (controllers frozen)."""
  loss_fn = make_loss_fn(model, train=False)

  def eval_step(state: TrainState, batch: Batch):
    _, (_, _, ce_sum, count, layers) = loss_fn(
        state.params, state.router_state, batch, state.rng)
    return {"ce_sum": ce_sum, "count": count, **summarize(layers)}

  return jax.jit(eval_step)


def evaluate(eval_step: Callable, state: TrainState, batches) -> dict[str, float]:
  """Mean CE (nats per token) and routing metrics over validation batches."""
  total, count, sums, n = 0.0, 0.0, {}, 0
  for batch in batches:
    out = jax.device_get(eval_step(state, batch))
    total += float(out.pop("ce_sum"))
    count += float(out.pop("count"))
    out.pop("layer_fanout", None)
    for key, value in out.items():
      sums[key] = sums.get(key, 0.0) + float(value)
    n += 1
  if n == 0:
    raise ValueError("evaluation got no batches")
  result = {f"eval_{k}": v / n for k, v in sums.items()}
  result["eval_loss"] = total / max(count, 1.0)
  return result
