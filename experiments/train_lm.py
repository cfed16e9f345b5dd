"""Train a routed Transformer LM (the main job).

  python experiments/train_lm.py --config=tiny --router=top_k --workdir=runs/tiny

Writes WORKDIR/metrics.jsonl, WORKDIR/run.png and orbax checkpoints under
WORKDIR/checkpoints; run again with the same workdir to resume.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from moejax.cli import lm_flags  # noqa: E402

lm_flags.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  sys.exit(lm_flags.run(flags.FLAGS))


if __name__ == "__main__":
  app.run(main)
