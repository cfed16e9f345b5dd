"""The language-model task: a routed Transformer LM on byte-level text.

Axis legend:
  B  batch
  L  sequence length

`TrainConfig` is one LM run (its defaults are the defaults of
`experiments/train_lm.py`); `LMTask` gives the loop (`moejax.train.loop`) the
model, data, the cross-entropy eval, the final greedy sample and the plot.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import flops as flops_lib
from moejax import sharding
from moejax.checks import check_positive_ints
from moejax.data import get_lm_data
from moejax.models.lm import LMConfig, TransformerLM
from moejax.sample import sample
from moejax.train import metrics as metrics_lib
from moejax.train.state import OptimConfig, TrainState
from moejax.train.step import evaluate, make_eval_step
from moejax.train.task import Task


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One LM training run. Every count must be >= 1 (except those noted).

  Attributes:
    model: the `LMConfig`.
    optim: optimizer and learning-rate schedule.
    dataset: `stdlib`, `text:GLOB` or `tfds:NAME`.
    data_dir: tensorflow-datasets directory.
    batch_size: global batch B (a multiple of the data * expert mesh size).
    seq_len: L (<= model.max_len).
    steps: training steps.
    seed: params, data order and routing.
    log_every, eval_every: log / evaluate every n steps.
    eval_batches: validation batches per evaluation.
    checkpoint_every, keep_checkpoints: checkpoint cadence, how many to keep.
    max_bad_steps: stop after this many consecutive steps with a non-finite
      loss or gradient (each is skipped: no update).
    mesh: e.g. "data:2,expert:4" (None = every device on `data`).
    num_devices: use the first n devices (None = all).
    sample_tokens: tokens sampled after training (>= 0; 0 = none).
    sample_prompt: the sample's prompt.
    temperature: sampling temperature (0 = greedy; the default 0.8 samples,
      since greedy decoding of a small byte model loops on one phrase).
    progress: show a progress bar.
  """
  model: LMConfig = dataclasses.field(default_factory=LMConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  dataset: str = "stdlib"
  data_dir: str | None = None
  batch_size: int = 16
  seq_len: int = 128
  steps: int = 500
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  max_bad_steps: int = 10
  mesh: str | None = None
  num_devices: int | None = None
  sample_tokens: int = 160
  sample_prompt: str = "def "
  temperature: float = 0.8
  progress: bool = True

  def __post_init__(self):
    check_positive_ints(self, ("batch_size", "seq_len", "steps", "log_every",
                               "eval_every", "eval_batches", "checkpoint_every",
                               "keep_checkpoints", "max_bad_steps"))
    if self.seq_len > self.model.max_len:
      raise ValueError(f"seq_len={self.seq_len} exceeds model max_len="
                       f"{self.model.max_len}")
    if self.sample_tokens < 0:
      raise ValueError(f"sample_tokens={self.sample_tokens} is out of range; "
                       "allowed: >= 0")

  def task(self) -> LMTask:
    return LMTask(self)


class LMTask(Task):
  """Next-byte prediction: mean cross-entropy in nats per token."""
  name = "train"
  rate_key = "tokens_per_s"
  loss_format = ".3f"
  config: TrainConfig

  def build_model(self) -> nn.Module:
    return TransformerLM(self.config.model)

  def example_inputs(self) -> tuple[jax.Array]:
    """tokens int32[B, L]."""
    return (jnp.zeros((self.config.batch_size, self.config.seq_len),
                      jnp.int32),)

  def check(self, mesh) -> None:
    super().check(mesh)
    sharding.check_model(self.config.model, mesh)

  def data(self):
    cfg = self.config
    return get_lm_data(cfg.dataset, seq_len=cfg.seq_len,
                       batch_size=cfg.batch_size, seed=cfg.seed,
                       data_dir=cfg.data_dir)

  def items_per_step(self) -> int:
    return self.config.batch_size * self.config.seq_len

  def flops_per_step(self) -> float:
    """3 x the forward FLOPs of the global batch (`moejax.flops`)."""
    cfg = self.config
    return flops_lib.train_flops(cfg.model, cfg.batch_size, cfg.seq_len)

  def make_eval_step(self, model: nn.Module):
    return make_eval_step(model)

  def evaluate(self, eval_step, state: TrainState, batches) -> dict[str, Any]:
    return evaluate(eval_step, state, batches)

  def outputs(self, model: nn.Module, state: TrainState, workdir: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`sample`: the prompt and `sample_tokens` sampled bytes (UTF-8), and
    `sample_note`: how it was sampled and from what model size."""
    del workdir
    cfg = self.config
    if not cfg.sample_tokens:
      return {}, {}
    prompt = np.frombuffer(cfg.sample_prompt.encode(), np.uint8).astype(
        np.int32)
    out = sample(model, state.params, state.router_state, prompt[None],
                 cfg.sample_tokens, temperature=cfg.temperature,
                 rng=jax.random.PRNGKey(cfg.seed))
    num_params = sum(int(np.prod(x.shape))
                     for x in jax.tree_util.tree_leaves(state.params))
    how = (f"temperature {cfg.temperature:g}" if cfg.temperature > 0
           else "greedy")
    return {}, {
        "sample": cfg.sample_prompt + bytes(
            out[0].astype(np.uint8).tolist()).decode("utf-8", errors="replace"),
        "sample_note": (f"{cfg.sample_tokens} bytes, {how}, from a "
                        f"{num_params / 1e6:.2f}M-parameter byte-level model "
                        f"after {int(state.step)} steps")}

  def plot(self, records, path: str, target_fanout: float | None) -> str:
    return metrics_lib.plot_run(records, path, target_fanout)
