"""Checkpoints written asynchronously (the default) and synchronously: the
saved values are the state at `save` even when its buffers are donated right
after, a write in flight is invisible until complete, and both modes restore
the same state (the loop-level guarantees: test_robustness_train.py,
test_train.py; across meshes: test_fsdp.py)."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.train.checkpoint import Checkpointer
from moejax.train.state import TrainState


def small_state(step: int, seed: int = 0) -> TrainState:
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
                    router_state={"p": jnp.asarray(0.5, jnp.float32)},
                    rng=jax.random.PRNGKey(seed),
                    data_index=jnp.asarray(step, jnp.int32))


@pytest.mark.parametrize("async_save", [True, False])
def test_saved_state_survives_donation_and_restores(tmp_path, async_save):
  checkpointer = Checkpointer(str(tmp_path), every=2, keep=2,
                              async_save=async_save)
  assert checkpointer.async_save == async_save
  state = small_state(4)
  want = jax.device_get(state)
  assert not checkpointer.save(small_state(3))  # not due
  assert checkpointer.save(state)
  # The next train step donates the state: its buffers may be reused at
  # once, while an asynchronous write is still going on.
  for leaf in jax.tree.leaves(state):
    leaf.delete()
  assert not checkpointer.save(small_state(4))  # step 4 is saved already
  checkpointer.wait()
  assert checkpointer.all_steps() == [4]
  restored, step = checkpointer.restore_latest(small_state(0, seed=1))
  assert step == 4
  chex.assert_trees_all_equal(jax.device_get(restored), want)
  # keep=2: the oldest goes once two newer are written; close waits.
  for s in (6, 8):
    assert checkpointer.save(small_state(s), force=True)
  checkpointer.close()
  assert Checkpointer(str(tmp_path)).all_steps() == [6, 8]


def test_write_in_flight_is_not_a_checkpoint(tmp_path):
  """A run killed during an asynchronous write leaves orbax's temporary
  directory: it is not listed, and the resume takes the checkpoint before."""
  checkpointer = Checkpointer(str(tmp_path), every=2)
  checkpointer.save(small_state(2))
  checkpointer.close()
  partial = tmp_path / "4.orbax-checkpoint-tmp-1234567"
  os.makedirs(partial / "default")
  (partial / "default" / "junk").write_text("half written")
  checkpointer = Checkpointer(str(tmp_path), every=2)
  assert checkpointer.all_steps() == [2]
  warnings = []
  state, step = checkpointer.restore_latest(small_state(0),
                                            warn=warnings.append)
  assert step == 2 and not warnings
  assert int(state.step) == 2
  assert checkpointer.save(small_state(4))  # the step can be written again
  checkpointer.close()
  assert Checkpointer(str(tmp_path)).all_steps() == [2, 4]
