"""Training: state, steps, checkpoints, metrics, the task interface and the
one loop (`train`)."""
from typing import Any

from moejax.train.checkpoint import Checkpointer
from moejax.train.loop import (build_state, init_state, make_step,
                               state_shardings, train)
from moejax.train.state import OptimConfig, TrainState, create_train_state
from moejax.train.step import evaluate, make_eval_step, make_train_step
from moejax.train.task import Task

__all__ = ["Checkpointer", "TrainConfig", "build_state", "init_state",
           "make_step", "state_shardings", "train", "OptimConfig",
           "TrainState", "create_train_state", "evaluate", "make_eval_step",
           "make_train_step", "Task"]


def __getattr__(name: str) -> Any:
  # The LM's run config lives with its task (which imports this package).
  if name == "TrainConfig":
    from moejax.tasks.lm import TrainConfig  # pylint: disable=g-import-not-at-top
    return TrainConfig
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
