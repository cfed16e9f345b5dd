"""Train a routed Transformer LM (the main job).

  python experiments/train_lm.py --config=tiny --router=top_k --workdir=runs/tiny

--config names a registered config (tiny, small, paper_dtop_p, ...) or a .py /
.yaml file; --model.num_layers=24 (or model.num_layers=24) sets any field.

Writes WORKDIR/metrics.jsonl, WORKDIR/run.png and orbax checkpoints under
WORKDIR/checkpoints; run again with the same workdir to resume.
"""
from __future__ import annotations

from moejax.cli import app, lm_flags

lm_flags.define_flags()

if __name__ == "__main__":
  app.run(lm_flags.run, __doc__, lm_flags.HELP_GROUPS, overrides=True,
          footer=lm_flags.config_help)
