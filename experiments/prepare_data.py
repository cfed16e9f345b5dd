"""Tokenize text into shards for `train_lm.py --dataset=tokens:DIR` (and train a tokenizer).

  python experiments/prepare_data.py --source=stdlib --out=data/stdlib \
      --train_tokenizer=sentencepiece_bpe --vocab_size=4096

The same as `python -m moejax.data.prepare`; see `moejax.data.prepare`.
"""
from __future__ import annotations

from moejax.cli import app
from moejax.data import prepare

if __name__ == "__main__":
  prepare.define_flags()
  app.run(prepare.run, prepare.__doc__, prepare.HELP_GROUPS)
