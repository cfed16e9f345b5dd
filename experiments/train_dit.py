"""Train a class-conditional Diffusion Transformer with routed MLPs.

  python experiments/train_dit.py --router=top_k --k=2 --workdir=runs/dit_topk
  python experiments/train_dit.py --router=dtop_p --k=2 --workdir=runs/dit_dtopp
  python experiments/train_dit.py --router=dense --workdir=runs/dit_dense

Default data set: scikit-learn's 8x8 digits (`--dataset=digits`); also
`tfds:mnist` / `tfds:cifar10` when prepared on disk (`--data_dir`). Writes
WORKDIR/metrics.jsonl (denoising loss, per-timestep loss and fanout),
WORKDIR/run.png, WORKDIR/samples/class_<c>.png (a grid per class),
WORKDIR/samples.png, WORKDIR/summary.json (validation loss, classifier accuracy
of the samples per class, Frechet distance) and orbax checkpoints under
WORKDIR/checkpoints; run again with the same workdir to resume.
"""
from __future__ import annotations

from moejax.cli import app, dit_flags

dit_flags.define_flags()

if __name__ == "__main__":
  app.run(dit_flags.run, __doc__, dit_flags.HELP_GROUPS,
          hidden=dit_flags.LM_ONLY_FLAGS)
