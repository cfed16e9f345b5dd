"""Training knobs: block remat policies, the parameter dtype, and gradient
accumulation (one step on N microbatches == one step on the whole batch)."""
import contextlib
import dataclasses
import io

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import configs, routing
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn.blocks import REMAT_MODES
from moejax.tasks.lm import TrainConfig, check_grad_accum
from moejax.train import loop
from moejax.train.step import make_train_step

B, L = 8, 16


def small_model(router: str = "top_k", **fields) -> LMConfig:
  """A one-block MoE LM of the tiny config, shrunk ("index": the dispatched
  expert rows exist on CPU too)."""
  model = configs.get("tiny").model
  moe = dataclasses.replace(model.moe, num_experts=4, expert_width=32,
                            strategy="index",
                            router=routing.build(router, {"k": 2}))
  return dataclasses.replace(model, num_layers=1, d_model=32, num_heads=2,
                             d_ff=64, max_len=L, moe=moe, **fields)


def tokens(seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (B, L), 0, 256)


def init(model: TransformerLM):
  return model.init({"params": jax.random.PRNGKey(0),
                     "router": jax.random.PRNGKey(0)}, tokens())


def lm_loss(model: TransformerLM, variables):
  x = tokens()

  def loss(params):
    logits, _ = model.apply(
        {"params": params, "router_state": variables.get("router_state", {})},
        x[:, :-1], train=True, rngs={"router": jax.random.PRNGKey(2)},
        mutable=["router"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))
  return loss


# --- remat ---------------------------------------------------------------------


def test_remat_modes_keep_loss_and_grads_and_save_what_they_name():
  plain = TransformerLM(small_model())
  variables = init(plain)
  want = jax.jit(jax.value_and_grad(lm_loss(plain, variables)))(
      variables["params"])
  for mode in REMAT_MODES[1:]:
    model = TransformerLM(small_model(remat=mode))
    loss = lm_loss(model, variables)
    got = jax.jit(jax.value_and_grad(loss))(variables["params"])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-7), got[1], want[1])
    saved = io.StringIO()
    with contextlib.redirect_stdout(saved):
      jax.ad_checkpoint.print_saved_residuals(loss, variables["params"])
    named = saved.getvalue().count("named 'expert_inputs'")
    # block remat keeps only the block's input ("save_dots" and
    # "save_matmuls" not the dispatched expert rows); the others keep them
    assert named == (0 if mode in ("block", "save_dots", "save_matmuls")
                     else 1), mode


@pytest.mark.parametrize("mode", ["save_dots", "save_matmuls"])
def test_save_dots_and_matmuls_keep_only_matmul_outputs(mode):
  # Inside the block only the unbatched matmul outputs are kept: query,
  # key, value, attention output and the router logits; "save_matmuls" also
  # the expert matmuls' outputs (two up-projections, the experts' outputs).
  # The attention scores, norms, routing, dispatch and activation are
  # recomputed ("save_dots": the expert matmuls too).
  model = TransformerLM(small_model(remat=mode))
  variables = init(model)
  saved = io.StringIO()
  with contextlib.redirect_stdout(saved):
    jax.ad_checkpoint.print_saved_residuals(lm_loss(model, variables),
                                            variables["params"])
  inside = [l for l in saved.getvalue().splitlines()
            if "from the argument" not in l and "moejax/nn/" in l or
            "moejax/experts" in l]
  dots = [l for l in inside if "output of dot_general" in l]
  d, h, hd, e = 32, 2, 16, 4
  assert sorted(l.split(" ")[0] for l in dots) == sorted(
      [f"f32[{B},{L - 1},{h},{hd}]"] * 3 +
      [f"f32[{B},{L - 1},{d}]", f"f32[{B},{L - 1},{e}]"]), inside
  named = sorted(l.split("named '")[1].split("'")[0] for l in inside
                 if l not in dots)
  assert named == ([] if mode == "save_dots" else [
      "expert_outputs", "expert_pre_activations", "expert_pre_activations"]
                   ), inside


def test_save_moe_operands_keeps_only_the_expert_matmul_operands():
  # Of the MoE layer's activations only the dispatched rows, the two
  # up-projections and the experts' outputs are saved (routing, dispatch
  # masks, activation, combine products are recomputed); with
  # "recompute_attention" alone they are all kept.
  model = TransformerLM(small_model(remat="save_moe_operands"))
  variables = init(model)
  moe_files = ("moejax/nn/moe.py", "moejax/routing/", "moejax/dispatch/",
               "moejax/experts.py", "moejax/nn/expert_parallel.py")

  def moe_residuals(mode):
    model = TransformerLM(small_model(remat=mode))
    saved = io.StringIO()
    with contextlib.redirect_stdout(saved):
      jax.ad_checkpoint.print_saved_residuals(lm_loss(model, variables),
                                              variables["params"])
    return [l for l in saved.getvalue().splitlines()
            if any(f in l for f in moe_files)]

  kept = moe_residuals("save_moe_operands")
  names = sorted(l.split("named '")[1].split("'")[0] for l in kept)
  assert names == ["expert_inputs", "expert_outputs", "expert_pre_activations",
                   "expert_pre_activations"], kept
  assert len(moe_residuals("recompute_attention")) > 3 * len(kept)


def test_remat_accepts_the_old_booleans_and_names_bad_values():
  assert small_model(remat=True).remat == "block"
  assert small_model(remat=False).remat == "none"
  assert small_model(remat=True) == small_model(remat="block")
  with pytest.raises(ValueError, match="remat='all' is not supported; "
                     "allowed: none, block, save_expert_inputs, "):
    small_model(remat="all")


# --- param_dtype ---------------------------------------------------------------


def test_bfloat16_params_compute_in_dtype_and_route_in_float32():
  cfg = small_model("dtop_p", param_dtype="bfloat16")
  model = TransformerLM(cfg)
  params = init(model)["params"]
  dtypes = {"/".join(path): leaf.dtype for path, leaf in
            flax.traverse_util.flatten_dict(
                flax.linen.meta.unbox(params)).items()}
  # DTop-p's learned scale gamma is routing math: float32 by design.
  assert {k for k, v in dtypes.items() if v != jnp.bfloat16} == {
      "layers_0/mlp/gamma"}, dtypes
  start, (state, metrics) = _step("dtop_p", 1, _batch(),
                                  param_dtype="bfloat16")
  assert np.isfinite(float(metrics["loss"])) and not float(metrics["skipped"])
  assert metrics["loss"].dtype == jnp.float32
  # updated in their own dtype
  jax.tree.map(lambda a, b: (a.dtype == b.dtype) or pytest.fail(str(a.dtype)),
               state.params, start.params)
  with pytest.raises(ValueError, match="param_dtype='float16' is not "
                     "supported; allowed: float32, bfloat16"):
    small_model(param_dtype="float16")


# --- gradient accumulation -------------------------------------------------------


def _batch(seed: int = 3) -> dict:
  x = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (B, L + 1), 0,
                                    256))
  mask = np.ones((B, L), np.float32)
  mask[1, :5] = 0.0  # microbatches with different token counts
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
          "mask": jnp.asarray(mask)}


def _step(router: str, grad_accum: int, batch: dict, **fields):
  """(initial state, (state, metrics) after one train step) with plain SGD
  (lr 1: params move by minus the gradient, so parameters compare gradients
  directly)."""
  cfg = small_model(router, **fields)
  model = TransformerLM(cfg)
  run = TrainConfig(model=cfg, batch_size=B, seq_len=L, steps=2)
  state = jax.jit(lambda rng: loop.init_state(run, model, rng))(
      jax.random.PRNGKey(0))
  state = flax.linen.meta.unbox(state)
  optimizer = optax.sgd(1.0)
  state = state.replace(opt_state=optimizer.init(state.params))
  step = make_train_step(model, optimizer, cfg.moe.router, donate=False,
                         grad_accum=grad_accum)
  return state, step(state, batch)


@pytest.mark.parametrize("router", ["top_k", "dtop_p"])
def test_grad_accum_equals_one_step_on_the_whole_batch(router):
  batch = _batch()
  start, (whole, m1) = _step(router, 1, batch)
  for n in (2,):
    _, (accum, mn) = _step(router, n, batch)
    # float32 reassociation of the summed gradients: rtol 1e-5 (atol 1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-7), accum.params, whole.params)
    for key in ("loss", "aux_loss", "grad_norm", "experts_per_token"):
      np.testing.assert_allclose(mn[key], m1[key], rtol=1e-5, err_msg=key)
    # the controllers read the whole batch's statistics (DTop-p: its p
    # moved by the mean fanout of all N microbatches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                 accum.router_state, whole.router_state)
    assert int(accum.step) == 1 and float(mn["skipped"]) == 0.0
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), whole.params,
      start.params))
  assert max(moved) > 1e-3  # the step did change the params
  if router == "dtop_p":
    assert not np.allclose(whole.router_state["layers_0"]["mlp"]["state"]["p"],
                           start.router_state["layers_0"]["mlp"]["state"]["p"])


def test_grad_accum_skips_a_step_with_one_nonfinite_microbatch():
  batch = _batch()
  batch["mask"] = batch["mask"].at[3, 2].set(jnp.nan)  # microbatch 1 of 2
  start, (state, metrics) = _step("dtop_p", 2, batch)
  assert float(metrics["skipped"]) == 1.0
  assert float(metrics["nonfinite_loss"]) == 1.0
  for new, old in ((state.params, start.params),
                   (state.router_state, start.router_state)):
    jax.tree.map(np.testing.assert_array_equal, new, old)
  assert int(state.step) == 1 and int(state.data_index) == 1


def test_grad_accum_must_divide_the_batch_over_the_mesh():
  with pytest.raises(ValueError, match="batch_size=8 must be divisible by "
                     "grad_accum=3"):
    TrainConfig(model=small_model(), batch_size=8, seq_len=L, grad_accum=3)
  with pytest.raises(ValueError, match="grad_accum=0 is out of range"):
    TrainConfig(model=small_model(), batch_size=8, seq_len=L, grad_accum=0)
  from moejax import sharding
  mesh = sharding.make_mesh("data:4", jax.devices()[:4])
  check_grad_accum(8, 2, mesh)
  with pytest.raises(ValueError, match="batch_size=8 must be divisible by "
                     "grad_accum=4 x the data-parallel mesh size 4"):
    check_grad_accum(8, 4, mesh)
