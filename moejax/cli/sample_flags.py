"""Sample from a saved run: the newest checkpoint of a workdir, its model
(WORKDIR/config.json) and its tokenizer.

  python -m moejax.sample --workdir=runs/tiny --prompt="def " --tokens=200

Prints the prompt and its continuation. Temperature 0 is greedy; a positive
temperature samples with --seed.
"""
from __future__ import annotations

import sys

from absl import flags

HELP_GROUPS = {
    "sampling": ("workdir", "prompt", "tokens", "temperature", "seed", "step"),
}


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run's workdir (its config.json "
                      "and checkpoints/).")
  flags.DEFINE_string("prompt", "def ", "Prompt text.")
  flags.DEFINE_integer("tokens", 160, "Tokens to sample (>= 1).")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
  flags.DEFINE_integer("seed", 0, "Random seed of temperature sampling.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest "
                       "readable one).")


def run(flag_values) -> int:
  """Samples and prints; 2 after one line on bad input or a missing run."""
  from moejax import sample  # pylint: disable=g-import-not-at-top
  from moejax.data import DataError  # pylint: disable=g-import-not-at-top
  from moejax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  values = flag_values.flag_values_dict()
  try:
    if not values["workdir"]:
      raise ValueError("workdir is missing; allowed: the workdir of a run "
                       "(--workdir=runs/NAME)")
    saved = sample.load_run(values["workdir"], values["step"])
    text = sample.sample_text(saved, values["prompt"], values["tokens"],
                              temperature=values["temperature"],
                              seed=values["seed"])
  except (ValueError, DataError, FileNotFoundError, CheckpointError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  print(text)
  return 0
