"""orbax checkpoints of the whole `TrainState` (params, optimizer, controllers,
rng, data position): periodic, keep-last-N, resume from the newest readable,
written asynchronously, restored onto any mesh.

Saving is asynchronous by default (orbax's async checkpointer): `save`
returns once the state is copied off the devices, and a background thread
writes it, so the train step does not wait on the disk (the next step may
donate the state's buffers). orbax writes into a temporary directory and
renames it when the write is complete; a save waits for the previous write
in flight, `wait` and `close` wait for the last one, and a run killed during
a write resumes from the checkpoint before it. `async_save=False` writes
before `save` returns.

Restoring reads each array onto the sharding of the template's leaf (the
new run's state, or its abstract `jax.ShapeDtypeStruct`s with shardings):
a checkpoint written on one mesh restores on another (e.g. written on
`fsdp:4,expert:2`, restored on `data:8`), each device reading its shards.

Every restore is verified: orbax must read every array into the template's
shapes and dtypes, the restored step must be the checkpoint's, every float
leaf must be finite, and orbax's tree metadata file (`_METADATA`) must be
there (a checkpoint without it is not as it was written, so it is refused,
like one with a damaged data file). `restore_latest` falls back from an
unreadable checkpoint to the next older one, moves the unreadable one aside
(to `DIRECTORY.unreadable/STEP`, so a new save of that step is possible) and
reports each in one line; when none is readable it raises and moves nothing.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Callable

import flax.serialization
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from moejax.train.state import TrainState


class CheckpointError(Exception):
  """Checkpoints exist but none of them can be restored."""


def _reason(error: BaseException) -> str:
  """The first line of an error, prefixed by its type. orbax reports a failed
  array read with the TensorStore spec (a multi-line repr of a bound method);
  the error it wraps says what failed (e.g. `Error reading "params.w/0.0" ...:
  ZSTD_decompressStream() failed`), so that one is reported."""
  while error.__cause__ is not None and "TensorStore" in str(error):
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = lines[0].split(" See full TensorStore details")[0] if lines else ""
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
  if len(text) > 200:
    text = text[:200] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _from_orbax(unraisable) -> bool:
  """Whether an unraisable error was raised in orbax's (or tensorstore's)
  code: a read of a damaged checkpoint failing after the restore gave up, or
  the 'Event loop is closed' of such a read's callback."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
    return True
  tb = unraisable.exc_traceback or getattr(error, "__traceback__", None)
  while tb is not None:
    parts = tb.tb_frame.f_code.co_filename.split(os.sep)
    if "orbax" in parts or "tensorstore" in parts:
      return True
    tb = tb.tb_next
  return False


def _quiet_failed_reads() -> None:
  """Silences the errors that the reads of a failed orbax restore still raise
  after it returned (each printed as a traceback when its coroutine or
  callback is collected, a timing matter: none to hundreds of lines); other
  unraisable errors go to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_moejax_quiet", False):
    return

  def hook(unraisable):
    if not _from_orbax(unraisable):
      previous(unraisable)

  hook._moejax_quiet = True
  sys.unraisablehook = hook


def _stderr(message: str) -> None:
  sys.stderr.write(message + "\n")
  sys.stderr.flush()


@jax.jit
def _all_finite(arrays) -> jax.Array:
  """Whether every element of every array is finite: one program (one set of
  collectives over sharded arrays; an eager op per array dispatches as many
  collective programs at once, which can stall XLA:CPU's host devices)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for `TrainState`.

  Args:
    directory: where checkpoints go (created if missing).
    every: save when `step % every == 0` (and always when `force`).
    keep: how many recent checkpoints to keep.
    async_save: write in the background (module docstring); False: `save`
      returns when the checkpoint is on disk.
  """

  def __init__(self, directory: str, every: int = 100, keep: int = 3,
               async_save: bool = True):
    if every < 1:
      raise ValueError(f"checkpoint every={every} is out of range; allowed: >= 1")
    if keep < 1:
      raise ValueError(f"checkpoint keep={keep} is out of range; allowed: >= 1")
    self.directory = os.path.abspath(directory)
    self.every = every
    self.async_save = async_save
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: TrainState, *, force: bool = False) -> bool:
    """Saves `state` when its step is due (or `force`) and not saved yet;
    returns whether it started a save (asynchronous: see the module
    docstring)."""
    step = int(jax.device_get(state.step))
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    tree = flax.serialization.to_state_dict(state)
    return self._manager.save(step, args=ocp.args.StandardSave(tree),
                              force=True)

  def restore(self, template: TrainState, step: int | None = None) -> TrainState:
    """Restores into the structure, shapes, dtypes and shardings of
    `template` (a state, or its `jax.ShapeDtypeStruct`s with shardings) and
    verifies the result (module docstring); raises on an unreadable one."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    metadata = os.path.join(self.directory, str(step), "default", "_METADATA")
    if not os.path.exists(metadata):
      raise FileNotFoundError(f"{os.path.relpath(metadata, self.directory)} "
                              "is missing")
    target = flax.serialization.to_state_dict(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    state = flax.serialization.from_state_dict(template, tree)
    if int(jax.device_get(state.step)) != step:
      raise ValueError(f"holds step {int(jax.device_get(state.step))}")
    floats = [x for x in jax.tree.leaves(state)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    if floats and not bool(_all_finite(floats)):
      raise ValueError("holds non-finite values")
    return state

  def restore_latest(self, template: TrainState,
                     warn: Callable[[str], None] = _stderr
                     ) -> tuple[TrainState, int | None]:
    """(state, step) of the newest readable checkpoint, or (`template`, None)
    when there is none. Each unreadable one newer than it is reported by `warn`
    in one line and moved aside; raises `CheckpointError` (and moves nothing)
    when none is readable."""
    steps = sorted(self.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      try:
        state = self.restore(template, step)
      except Exception as e:  # pylint: disable=broad-except
        # orbax and tensorstore raise many types for a damaged file.
        unreadable.append((step, _reason(e)))
        _quiet_failed_reads()
        continue
      for bad, reason in unreadable:
        warn(f"warning: checkpoint at step {bad} is unreadable ({reason}); "
             f"moved to {self._move_aside(bad)}; resuming from step {step}")
      return state, step
    if steps:
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}: " + "; ".join(
              f"step {s}: {r}" for s, r in unreadable))
    return template, None

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `DIRECTORY.unreadable/STEP[.n]`."""
    aside = os.path.join(self.directory + ".unreadable", str(step))
    n = 0
    while os.path.exists(aside if not n else f"{aside}.{n}"):
      n += 1
    aside = aside if not n else f"{aside}.{n}"
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), aside)
    self._manager.reload()
    return aside

  def wait(self) -> None:
    """Waits for the write in flight (if any) to finish."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the write in flight, then releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()
