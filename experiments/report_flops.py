"""Training FLOPs of the reports' run sets against the papers' settings.

  python experiments/report_flops.py [--json_out=PATH]

Each set below is the configuration of a run set of experiments/reports/*.md
(preset + the flags of its reproduce command); its training FLOPs per run are
3 x the forward FLOPs counted from the model's shapes by `moejax.flops`
(batch x sequence x steps; the DiT's blocks are counted the same way on its
patch tokens). The papers' training FLOPs are 6 x active parameters x
training tokens of their reported settings (None where a paper does not
state both). The verdict tables of the reports quote these numbers.

Axis legend: none (scalars per run set).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

# The papers' reported settings: (active parameters, training tokens, text).
PAPERS = {
    "dtop_p": (1.3e9, 100e9, "DTop-p LLM: 1.3B active, 100B tokens"),
    "dtop_p_dit": (0.9e9, None, "DTop-p DiT: 0.9B active, tokens not stated"),
    "expert_threshold": (195e6, 10e9, "ET d12: 195M active, 10B tokens"),
    "mod": (None, None, "MoD isoFLOP sweeps: 6e18 to 1e20 FLOPs"),
    "probmoe": (1.3e9, None, "ProbMoE: fine-tuning OLMoE-1B-7B (1.3B "
                "active); fine-tuning tokens not stated"),
    "loss_free": (None, None, "loss-free balancing: 1B parameters; "
                  "tokens not stated"),
    "deepseek_moe": (None, None, "DeepSeekMoE: not stated here; the papers "
                     "tested run at 0.2-7B parameters and 10-300B tokens"),
}
PAPER_FLOPS_OVERRIDE = {"mod": 6e18}   # the smallest budget of the sweeps

# name -> (report, paper key, flags of lm_flags.build_train_config, steps,
# extra: {"dit": True} for the DiT).
SETS = {
    "balance_300": ("balance.md", "expert_threshold",
                    dict(config="tiny", batch_size=8, seq_len=64,
                         num_shared=1), 300),
    "balance_matched_1000": ("balance.md", "expert_threshold",
                             dict(config="tiny", batch_size=8, seq_len=64,
                                  num_shared=1), 1000),
    "balance_matched_2000": ("balance.md", "expert_threshold",
                             dict(config="tiny", batch_size=8, seq_len=64,
                                  num_shared=1), 2000),
    "balance_paper_shape_1000": ("balance.md", "expert_threshold",
                                 dict(config="tiny", batch_size=8, seq_len=64,
                                      num_shared=1, num_experts=16, k=1),
                                 1000),
    "dtop_p_small_600": ("dtop_p.md", "dtop_p", dict(config="small"), 600),
    "dtop_p_small_2000": ("dtop_p.md", "dtop_p", dict(config="small"), 2000),
    "dtop_p_tiny_dropless_300": ("dtop_p.md", "dtop_p",
                                 dict(config="tiny", batch_size=8,
                                      strategy="dropless"), 300),
    "dtop_p_tiny_dropless_1000": ("dtop_p.md", "dtop_p",
                                  dict(config="tiny", batch_size=8,
                                       strategy="dropless"), 1000),
    "dtop_p_gpu_small_dropless_1000": ("accelerator check", "dtop_p",
                                       dict(config="small",
                                            strategy="dropless"), 1000),
    "dit_tiny_400": ("dit.md", "dtop_p_dit", {"dit": True}, 400),
    "dit_tiny_1500": ("dit.md", "dtop_p_dit", {"dit": True}, 1500),
    "finegrained_600": ("finegrained.md", "deepseek_moe",
                        dict(config="small", batch_size=8, seq_len=128,
                             num_experts=8, expert_width=512, k=2,
                             strategy="dropless"), 600),
    "mod_dense_200": ("mod.md", "mod", dict(config="tiny", batch_size=8,
                                            router="dense"), 200),
    "probmoe_small_150_60": ("probmoe.md", "probmoe", dict(config="small"),
                             210),
    "probmoe_tiny_120_60": ("probmoe.md", "probmoe", dict(config="tiny"), 180),
    "probmoe_regime_1500_300": ("probmoe.md", "probmoe", dict(config="tiny"),
                                1800),
    "probmoe_regime_pretrain3_800_200": ("probmoe.md", "probmoe",
                                         dict(config="tiny"), 1000),
    "loss_free_300": ("balance.md", "loss_free",
                      dict(config="tiny", batch_size=8, seq_len=64,
                           num_shared=1), 300),
}


def dit_train_flops(steps: int) -> float:
  """The `tiny` DiT (4 blocks, D 64, top-2 of 8 experts of width 64, 8x8
  images in 2x2 patches: 16 tokens, batch 64) counted like an LM block."""
  from moejax import flops  # pylint: disable=g-import-not-at-top
  from moejax.cli import lm_flags  # pylint: disable=g-import-not-at-top
  cfg = lm_flags.build_train_config(dict(config="tiny", router="top_k",
                                         steps=1, group_size=256))
  model = dataclasses.replace(cfg.model, d_model=64, num_heads=4,
                              moe=dataclasses.replace(cfg.model.moe,
                                                      expert_width=64))
  per_token = sum(sum(flops.block_flops(
      model, 16, model.moe).values()) for _ in range(model.num_layers))
  return 3.0 * per_token * 16 * 64 * steps


def run_flops(flag_values: dict, steps: int) -> float:
  from moejax import flops  # pylint: disable=g-import-not-at-top
  from moejax.cli import lm_flags  # pylint: disable=g-import-not-at-top
  if flag_values.get("dit"):
    return dit_train_flops(steps)
  cfg = lm_flags.build_train_config({"router": "top_k", **flag_values,
                                     "steps": steps})
  return flops.train_flops(cfg.model, cfg.batch_size, cfg.seq_len, steps)


def paper_flops(key: str) -> float | None:
  if key in PAPER_FLOPS_OVERRIDE:
    return PAPER_FLOPS_OVERRIDE[key]
  active, tokens, _ = PAPERS[key]
  return 6.0 * active * tokens if active and tokens else None


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args(argv)
  rows = []
  for name, (report, key, values, steps) in SETS.items():
    run = run_flops(values, steps)
    paper = paper_flops(key)
    rows.append({"set": name, "report": report, "steps": steps,
                 "run_flops": run, "paper": PAPERS[key][2],
                 "paper_flops": paper,
                 "ratio": paper / run if paper else None})
  print("| run set | report | steps | training FLOPs per run | paper | "
        "paper's training FLOPs | paper / run |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    paper = f"{r['paper_flops']:.1e}" if r["paper_flops"] else "not stated"
    ratio = f"{r['ratio']:.0e}" if r["ratio"] else "-"
    print(f"| {r['set']} | {r['report']} | {r['steps']} | "
          f"{r['run_flops']:.1e} | {r['paper']} | {paper} | {ratio} |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
