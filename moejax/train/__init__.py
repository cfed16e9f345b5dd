"""Training: state, steps, checkpoints, metrics and the loop."""
from moejax.train.checkpoint import Checkpointer
from moejax.train.loop import TrainConfig, build_state, train
from moejax.train.state import OptimConfig, TrainState, create_train_state
from moejax.train.step import evaluate, make_eval_step, make_train_step

__all__ = ["Checkpointer", "TrainConfig", "build_state", "train", "OptimConfig",
           "TrainState", "create_train_state", "evaluate", "make_eval_step",
           "make_train_step"]
