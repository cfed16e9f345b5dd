"""Training: state, steps, checkpoints, metrics, the task interface and the
one loop (`train`)."""
from moejax.train.checkpoint import Checkpointer
from moejax.train.config import LoopConfig, RunConfig
from moejax.train.loop import (build_state, init_state, make_step,
                               state_shardings, train)
from moejax.train.state import OptimConfig, TrainState, create_train_state
from moejax.train.step import evaluate, make_eval_step, make_train_step
from moejax.train.task import Task

__all__ = ["Checkpointer", "LoopConfig", "RunConfig", "build_state", "init_state",
           "make_step", "state_shardings", "train", "OptimConfig",
           "TrainState", "create_train_state", "evaluate", "make_eval_step",
           "make_train_step", "Task"]

