"""orbax checkpoints of the whole `TrainState` (params, optimizer, controllers,
rng, data position): periodic, keep-last-N, resume from the latest."""
from __future__ import annotations

import os

import flax.serialization
import jax
import orbax.checkpoint as ocp

from moejax.train.state import TrainState


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for `TrainState`.

  Args:
    directory: where checkpoints go (created if missing).
    every: save when `step % every == 0` (and always when `force`).
    keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, every: int = 100, keep: int = 3):
    if every < 1:
      raise ValueError(f"checkpoint every={every} is out of range; allowed: >= 1")
    if keep < 1:
      raise ValueError(f"checkpoint keep={keep} is out of range; allowed: >= 1")
    self.directory = os.path.abspath(directory)
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: TrainState, *, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    tree = flax.serialization.to_state_dict(state)
    return self._manager.save(step, args=ocp.args.StandardSave(tree),
                              force=True)

  def restore(self, template: TrainState, step: int | None = None) -> TrainState:
    """Restores into the structure, shapes and shardings of `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = flax.serialization.to_state_dict(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return flax.serialization.from_state_dict(template, tree)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
