"""What a training run trains: the interface between a task and the loop.

Axis legend:
  B  global batch

A `Task` owns everything that differs between kinds of run: the model, its
example inputs, the data, the loss (None = the LM cross-entropy of
`moejax.train.step`), evaluation, samples and plots. The loop
(`moejax.train.loop.train`) owns what they share: devices and mesh, sharded
state init, batch placement, jitted steps, eval cadence, checkpoints and
resume, `metrics.jsonl`, the progress bar and the summary.

A task wraps its run config (`moejax.train.config.RunConfig`), of which the
loop reads `loop` (the `LoopConfig`: optimizer, batch, steps, seed, cadences,
mesh, ...) and the task's `method` (its model's MoE router); a run config
names its task with `config.task()`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn

from moejax import sharding
from moejax.train.config import RunConfig
from moejax.train.state import TrainState


class Task:
  """Base class of the tasks (`moejax.tasks.lm.LMTask`, `moejax.tasks.dit.DiTTask`).

  Attributes:
    config: the run's frozen config.
    name: the progress bar's label.
    rate_key: the throughput key of the log records and the summary.
    loss_format: format of the loss shown by the progress bar.
  """
  name = "train"
  rate_key = "tokens_per_s"
  loss_format = ".3f"

  def __init__(self, config: RunConfig):
    self.config = config

  @property
  def method(self):
    """The routing method of the model's MoE layers (None when dense)."""
    moe = getattr(self.config.model, "moe", None)
    return moe.router if moe is not None else None

  def build_model(self) -> nn.Module:
    raise NotImplementedError

  def example_inputs(self) -> tuple[Any, ...]:
    """Positional arguments of `model.init` (zeros of a global batch B)."""
    raise NotImplementedError

  def step_key(self) -> tuple[Any, ...]:
    """Hashable settings the steps depend on besides model, optim and mesh."""
    return ()

  def check(self, mesh) -> None:
    """Raises ValueError when the run does not fit `mesh`."""
    sharding.check_batch(self.config.loop.batch_size, mesh)

  def data(self) -> Any:
    """The data source: `.batch(i)` and `.eval_batches(n)` of numpy batches."""
    raise NotImplementedError

  def start(self, workdir: str, data: Any, resumed_from: int | None) -> None:
    """Called once the state is restored (`resumed_from`: the step, None on
    a fresh run): record or check what the run depends on in `workdir`."""

  def items_per_step(self) -> int:
    """Items (tokens, images) of one training batch, for `rate_key`."""
    raise NotImplementedError

  def flops_per_step(self) -> float | None:
    """Model FLOPs of one training step over the global batch (for MFU;
    None = not counted: the loop logs throughput only)."""
    return None

  def loss_fn(self, model: nn.Module) -> Callable | None:
    """`loss_fn=` of `moejax.train.step.make_train_step` (None = LM loss)."""
    return None

  def make_eval_step(self, model: nn.Module) -> Callable:
    raise NotImplementedError

  def evaluate(self, eval_step: Callable, state: TrainState,
               batches: Iterable[Any]) -> dict[str, Any]:
    """Validation metrics (at least `eval_loss`) over placed batches."""
    raise NotImplementedError

  def outputs(self, model: nn.Module, state: TrainState, workdir: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Samples after training: (fields of the final log record, summary
    fields). Single-process runs only."""
    return {}, {}

  def output_seconds(self, eval_batch_seconds: float,
                     compile_seconds: float) -> float:
    """A rough estimate of the seconds of `outputs` (for the duration the
    loop announces), from the measured seconds of one evaluation batch and of
    compiling the train step (a stand-in for compiling the sampler); 0 when
    there are none."""
    del eval_batch_seconds, compile_seconds
    return 0.0

  def plot(self, records: list[dict[str, Any]], path: str,
           target_fanout: float | None) -> str:
    """Writes the run's PNG plot from its log records; returns `path`."""
    raise NotImplementedError
