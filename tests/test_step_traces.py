"""The train step of every routing method compiles once and runs without host
transfers on an 8-device (data, expert, model) mesh: controller state, rng and
data index stay on the device, and the new state keeps the shardings the state
was created with (so the second step reuses the first step's program)."""
import jax
import numpy as np
import pytest

from moejax import routing, sharding
from moejax.data import get_lm_data
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train import OptimConfig
from moejax.train.loop import build_state, state_shardings
from moejax.train.step import make_eval_step, make_train_step

STEPS = 3


def config(router: str) -> TrainConfig:
  method = routing.build(router, {"k": 2, "k_min": 1, "k_max": 3})
  model = LMConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, max_len=32,
                   moe=MoEConfig(num_experts=4, expert_width=32, router=method))
  return TrainConfig(model=model, optim=OptimConfig(learning_rate=3e-3,
                                                    warmup_steps=1,
                                                    total_steps=STEPS),
                     batch_size=8, seq_len=32, steps=STEPS,
                     mesh="data:2,expert:2,model:2", progress=False)


@pytest.mark.parametrize("router", routing.available())
def test_train_step_compiles_once_without_host_transfers(router):
  cfg = config(router)
  model = TransformerLM(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  data = get_lm_data("stdlib", seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                     seed=0, max_bytes=200_000)
  batch_sharding = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    state = build_state(cfg, model, mesh)
    shardings = state_shardings(cfg, model, mesh)
    step = make_train_step(model, cfg.optim.optimizer(), cfg.model.moe.router,
                           cfg.optim.schedule(), state_sharding=shardings)
    eval_step = make_eval_step(model)
    batches = [sharding.put_batch(data.batch(i), batch_sharding)
               for i in range(STEPS)]
    router_state0 = jax.tree.map(np.asarray, state.router_state)
    # Any implicit host<->device copy inside the loop (a Python scalar fed to
    # the step, a value pulled back to steer the controller) raises here.
    with jax.transfer_guard("disallow"):
      for batch in batches:
        state, metrics = step(state, batch)
        eval_step(state, batch)
    assert step._cache_size() == 1
    assert eval_step._cache_size() == 1
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert leaf.sharding == want
  assert int(state.step) == STEPS and int(state.data_index) == STEPS
  assert np.isfinite(float(metrics["loss"]))
  if jax.tree.leaves(router_state0):  # controllers moved on the device
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(router_state0),
                 jax.tree.leaves(jax.tree.map(np.asarray, state.router_state)))]
    assert any(moved)
