"""Train a routed Transformer LM (the main job).

  python experiments/train_lm.py --config=tiny --router=top_k --workdir=runs/tiny

Writes WORKDIR/metrics.jsonl, WORKDIR/run.png and orbax checkpoints under
WORKDIR/checkpoints; run again with the same workdir to resume.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from moejax.cli import lm_flags

lm_flags.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  sys.exit(lm_flags.run(flags.FLAGS))


if __name__ == "__main__":
  app.run(main)
