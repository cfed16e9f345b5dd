"""The CPU presets: a ladder from a smoke run to the report config.

`tiny` trains on one CPU in minutes (tests, notebooks, the README job); `small`
is the comparison config of the reports (tens of minutes on a CPU). Both are
top-k MoE LMs on byte-level text; `PRESETS` keeps their numbers as flat dicts
(the scripts that sweep them read those), `preset_config(name)` is the run.
"""
from __future__ import annotations

from typing import Any

from moejax import routing
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.state import OptimConfig

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
  """The flat numbers of preset `name` (a copy)."""
  if name not in PRESETS:
    raise ValueError(f"config={name!r} is unknown; allowed: "
                     f"{', '.join(sorted(PRESETS))}")
  return dict(PRESETS[name])


def preset_config(name: str, router: str = "top_k") -> TrainConfig:
  """The run of preset `name`: a `router` MoE LM (top-k by default, k from the
  preset) on bytes, every other field at its dataclass default."""
  pre = preset(name)
  method = routing.build(router, {"k": pre["k"]})
  moe = MoEConfig(num_experts=pre["num_experts"],
                  expert_width=pre["expert_width"], router=method,
                  num_shared=method.default_num_shared)
  model = LMConfig(num_layers=pre["num_layers"], d_model=pre["d_model"],
                   num_heads=pre["num_heads"], d_ff=pre["d_ff"],
                   max_len=pre["seq_len"], moe=moe, moe_every=pre["moe_every"])
  steps = pre["steps"]
  optim = OptimConfig(learning_rate=pre["learning_rate"],
                      warmup_steps=min(pre["warmup_steps"], steps),
                      total_steps=steps)
  return TrainConfig(model=model, optim=optim, batch_size=pre["batch_size"],
                     seq_len=pre["seq_len"], steps=steps)
