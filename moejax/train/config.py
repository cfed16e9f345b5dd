"""The loop's settings, declared once: `LoopConfig`, embedded by every task's
run config (`moejax.tasks.lm.TrainConfig`, `moejax.tasks.dit.DiTTrainConfig`)
as its `loop` field; `RunConfig`, what `moejax.train.loop.train` takes.

Axis legend:
  B  global batch

The loop (`moejax.train.loop`) reads `config.loop` and nothing else of a run
config; the task (`config.task()`) reads the rest. A run config keeps flat
aliases of its loop's fields (`embed_loop`): `TrainConfig(steps=5,
batch_size=8)` builds `loop=LoopConfig(steps=5, batch_size=8, ...)` from the
task's own loop defaults, `cfg.steps` reads `cfg.loop.steps`, and
`dataclasses.replace(cfg, steps=9)` replaces it, so scripts, notebooks and
the command line's flat flags (`--steps`) keep their names; `config.json`
holds the nested form, and one written before the loop had its own config
(its loop fields flat) still loads.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Protocol, TypeVar

from moejax.checks import check_positive_ints
from moejax.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What the one training loop reads. Every count must be >= 1. The
  defaults are the LM's; a task declares its own where they differ
  (`DiTTrainConfig`'s loop: batch 64, 1000 steps, no weight decay, ...).

  Attributes:
    optim: optimizer and learning-rate schedule.
    batch_size: global batch B (a multiple of grad_accum x the data * fsdp *
      expert mesh size).
    steps: training steps.
    grad_accum: microbatches per step (gradient accumulation): the batch is
      split into grad_accum microbatches run one after the other in the
      step, for one update equal to that of the whole batch
      (`moejax.train.step`).
    seed: params, data order and routing.
    mesh: e.g. "data:2,expert:4" or "fsdp:4,expert:2" (None = every device
      on `data`).
    num_devices: use the first n devices (None = all).
    log_every, eval_every: log / evaluate every n steps.
    eval_batches: validation batches per evaluation.
    progress: show a progress bar.
    checkpoint_every, keep_checkpoints: checkpoint cadence, how many to keep.
    max_bad_steps: stop after this many consecutive steps with a non-finite
      loss or gradient (each is skipped: no update).
  """
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  batch_size: int = 16
  steps: int = 500
  grad_accum: int = 1
  seed: int = 0
  mesh: str | None = None
  num_devices: int | None = None
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  progress: bool = True
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  max_bad_steps: int = 10

  def __post_init__(self):
    check_positive_ints(self, ("batch_size", "steps", "grad_accum",
                               "log_every", "eval_every", "eval_batches",
                               "checkpoint_every", "keep_checkpoints",
                               "max_bad_steps"))
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                       f"grad_accum={self.grad_accum}")


LOOP_FIELDS = tuple(f.name for f in dataclasses.fields(LoopConfig))


class RunConfig(Protocol):
  """A task's run config: the loop's settings and the task it names."""
  loop: LoopConfig

  def task(self) -> Any:
    """The run's `moejax.train.task.Task`."""
    ...


C = TypeVar("C")


def embed_loop(cls: type[C]) -> type[C]:
  """Class decorator of a frozen run config with a `loop: LoopConfig` field
  (its default: the task's loop defaults): flat aliases of the loop's fields.

  - Keywords: `cls(steps=5)` is `cls(loop=replace(<default loop>, steps=5))`
    (over `loop=` when that is given too), so `dataclasses.replace(cfg,
    steps=5)` works as well.
  - Attributes: `cfg.steps` is `cfg.loop.steps` (read-only).
  - `ALIASES` maps each alias to its path (`{"steps": "loop.steps", ...}`)
    for the dotted overrides (`moejax.configs.overrides`) and the flags'
    defaults (`moejax.cli.defaults`).
    An older `config.json` (loop fields flat) loads through the same
    keywords (`moejax.train.config_file`).
  """
  field = {f.name: f for f in dataclasses.fields(cls)}.get("loop")
  if field is None or field.default_factory is dataclasses.MISSING:
    raise TypeError(f"{cls.__name__} has no loop field with a default_factory")
  default_loop: Callable[[], LoopConfig] = field.default_factory
  init = cls.__init__

  @functools.wraps(init)
  def __init__(self, *args, loop: LoopConfig | None = None, **kwargs):
    flat = {name: kwargs.pop(name) for name in LOOP_FIELDS if name in kwargs}
    loop = default_loop() if loop is None else loop
    if flat:
      loop = dataclasses.replace(loop, **flat)
    init(self, *args, loop=loop, **kwargs)

  cls.__init__ = __init__
  for name in LOOP_FIELDS:
    setattr(cls, name, property(operator.attrgetter(f"loop.{name}"),
                                doc=f"`loop.{name}` (an alias)."))
  cls.ALIASES = {name: f"loop.{name}" for name in LOOP_FIELDS}
  return cls
