"""Named model/training presets: a ladder from a CPU smoke run to the report config.

`tiny` trains on one CPU in minutes (tests, notebooks, the README job); `small`
is the comparison config of the reports (tens of minutes on a CPU).
"""
from __future__ import annotations

import dataclasses
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, d_ff=512,
                 num_experts=8, expert_width=256, k=2, moe_every=1,
                 seq_len=128, batch_size=16, learning_rate=3e-3,
                 warmup_steps=50, steps=600),
    "small": dict(num_layers=6, d_model=256, num_heads=8, d_ff=1024,
                  num_experts=16, expert_width=256, k=4, moe_every=1,
                  seq_len=256, batch_size=16, learning_rate=2e-3,
                  warmup_steps=100, steps=2000),
}


def preset(name: str) -> dict[str, Any]:
  if name not in PRESETS:
    raise ValueError(f"config={name!r} is unknown; allowed: "
                     f"{', '.join(sorted(PRESETS))}")
  return dict(PRESETS[name])
