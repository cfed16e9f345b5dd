"""Tasks: what a run trains (model, data, loss, eval, samples, plots); the one
loop of `moejax.train.loop` runs any of them."""
from moejax.tasks.dit import DiTTask, DiTTrainConfig
from moejax.tasks.lm import LMTask, TrainConfig

__all__ = ["DiTTask", "DiTTrainConfig", "LMTask", "TrainConfig"]
