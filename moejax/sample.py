"""Autoregressive sampling (greedy or temperature) from a `TransformerLM`, and
from a saved run.

Axis legend:
  B  batch
  P  prompt length
  V  vocabulary

`sample` (defined in `moejax.decode`, which the tasks import: this module
loads saved runs, above the training layers) takes the model itself; the
sampler is `moejax.decode.generate`
(cached decoding where the model's routing allows it, else a full causal
forward pass per step). `load_run(workdir)` rebuilds a run's model from its
`config.json` and restores its newest (or a given) checkpoint; `sample_text`
encodes a prompt with the run's tokenizer and decodes it with its continuation.

From the command line (`moejax.cli.sample_flags`):

  python -m moejax.sample --workdir=runs/tiny --prompt="def " --tokens=200
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from moejax import decode
from moejax.decode import sample  # the sampling loop, importable here too


class Run(NamedTuple):
  """A saved run: its config, model, restored state, step and tokenizer."""
  config: Any
  model: nn.Module
  state: Any
  step: int
  tokenizer: Any


def load_run(workdir: str, step: int | None = None) -> Run:
  """The run in `workdir` (its `config.json`) restored from checkpoint `step`
  (None: the newest readable one), on one device.

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    ValueError: config.json does not parse; `step` is not saved.
    DataError: the run's tokenizer cannot be loaded.
    CheckpointError: no checkpoint is readable.
  """
  from moejax import aot, sharding  # pylint: disable=g-import-not-at-top
  from moejax.train import checkpoint, config_file  # pylint: disable=g-import-not-at-top
  config = config_file.load(workdir)
  if not hasattr(config, "model") or not hasattr(config.model, "vocab_size"):
    raise ValueError(f"{config_file.path(workdir)} holds a "
                     f"{type(config).__name__}; allowed: an LM run's config")
  task = config.task()  # the run's tokenizer (`moejax.tasks.lm.run_tokenizer`)
  model = task.build_model()
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  template = aot.abstract_state(config, mesh)
  directory = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint.Checkpointer(directory)
  try:
    if step is None:
      if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
      state, step = ckpt.restore_latest(template)
    else:
      if step not in ckpt.all_steps():
        raise ValueError(f"step={step} has no checkpoint in {directory}; "
                         f"allowed: {', '.join(map(str, ckpt.all_steps()))}")
      state = ckpt.restore(template, step)
  finally:
    ckpt.close()
  return Run(config, model, state, step, task.tokenizer)


def sample_text(run: Run, prompt: str, num_new: int, *,
                temperature: float = 0.0, seed: int = 0) -> str:
  """The prompt and its continuation by `num_new` tokens of the run's model
  (ids of the tokenizer's vocabulary only), decoded together; temperature
  sampling uses PRNGKey(seed)."""
  tokens = np.asarray(run.tokenizer.encode(prompt), np.int32)
  if tokens.size == 0:
    raise ValueError(f"prompt={prompt!r} encodes to no tokens; allowed: a "
                     "prompt of at least one token")
  if num_new < 1:
    raise ValueError(f"tokens={num_new} is out of range; allowed: >= 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} is out of range; allowed: "
                     ">= 0")
  # Packed training documents begin with EOS (`moejax.data.packed`), and so
  # does the model's context here, as in the run's own final sample.
  context = (np.concatenate([[run.tokenizer.eos_id], tokens]).astype(np.int32)
             if run.config.packed else tokens)
  out = sample(run.model, run.state.params, run.state.router_state,
               context[None], num_new, temperature=temperature,
               rng=jax.random.PRNGKey(seed), vocab=run.tokenizer.vocab_size)
  return run.tokenizer.decode(np.concatenate([tokens, np.asarray(out[0])]))


if __name__ == "__main__":
  from moejax.cli import app, sample_flags  # pylint: disable=g-import-not-at-top
  sample_flags.define_flags()
  app.run(sample_flags.run, sample_flags.__doc__, sample_flags.HELP_GROUPS)
