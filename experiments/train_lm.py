"""Train a routed Transformer LM (the main job).

  python experiments/train_lm.py --config=tiny --router=top_k --workdir=runs/tiny

Writes WORKDIR/metrics.jsonl, WORKDIR/run.png and orbax checkpoints under
WORKDIR/checkpoints; run again with the same workdir to resume.
"""
from __future__ import annotations

from moejax.cli import app, lm_flags

lm_flags.define_flags()

if __name__ == "__main__":
  app.run(lm_flags.run, __doc__, lm_flags.HELP_GROUPS)
