"""Dense controls of the MoD isoFLOP comparison: same tokens, same FLOPs.

`experiments/mod_report.py` trains `mod_iso`, the MoD model trained for the
training FLOPs of the dense run (more steps, so more tokens). This script
trains the two dense controls that separate "MoD" from "more tokens":

  dense_tokens  the dense preset trained for mod_iso's steps: the same tokens
                as mod_iso, about 1.7x its training FLOPs.
  dense_small   the dense preset with the MLP width d_ff chosen so that its
                forward FLOPs per token equal the MoD model's, trained to the
                dense run's training FLOPs: the same FLOPs per token and the
                same training FLOPs as mod_iso (so about the same steps).

  # train (the flags of the runs in experiments/reports/mod.md):
  python experiments/mod_isoflop.py --config=tiny --batch_size=8 --steps=200 \
      --eval_every=40 --eval_batches=4 --log_every=20 \
      --checkpoint_every=100000 --sample_tokens=0 --mod_capacity=0.125 \
      --seeds=0,1,2 --workroot=runs/mod_isoflop \
      --out=experiments/reports/mod/isoflop
  # the router-BCE cost: mod_report's `mod` run with the BCE weight at 0
  python experiments/mod_report.py ...the same flags... --mod_aux_weight=0 \
      --only=mod --seed=SEED --out=experiments/reports/mod/aux0
  # paired tables against mod_report's records (mod_iso, dense, mod):
  python experiments/mod_isoflop.py --phase=report \
      --out=experiments/reports/mod/isoflop \
      --mod_records=experiments/reports/mod/records \
      --aux0_records=experiments/reports/mod/aux0/records

`--steps` is the dense run's step count (mod_report's `--steps`); every run
writes OUT/records/LABEL_sSEED.json in mod_report's record format.

Axis legend (of the logged arrays): none beyond scalars per step.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

from absl import app, flags, logging

from moejax import experiment
from moejax.cli import lm_flags
from moejax.experiment.stats import mean_std

lm_flags.define_flags()
flags.DEFINE_string("arms", "dense_tokens,dense_small", "Comma-separated arms.")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
flags.DEFINE_string("phase", "train", "train or report.")
flags.DEFINE_string("out", "experiments/out/mod_isoflop", "Results directory.")
flags.DEFINE_string("mod_records", "experiments/reports/mod/records",
                    "mod_report's records (the MoD arms of the table).")
flags.DEFINE_string("aux0_records", "experiments/reports/mod/aux0/records",
                    "Records of mod_report's `mod` run with --mod_aux_weight=0 "
                    "(the router-BCE cost table; skipped when missing).")
flags.DEFINE_string("workroot", "runs/mod_isoflop", "Root of the run workdirs.")
flags.DEFINE_string("compile_cache", None, "Persistent JAX compilation cache.")
FLAGS = flags.FLAGS
OWN = ("arms", "seeds", "phase", "out", "mod_records", "aux0_records",
       "workroot", "compile_cache")
ARMS = ("dense_tokens", "dense_small")


def arm_config(arm: str, base: dict):
  """TrainConfig of one arm, from the base flag values (dense run's steps)."""
  from moejax import flops
  dense_values = dict(base, router="dense", mod_capacity=0.0)
  dense = lm_flags.build_train_config(dense_values)
  mod = lm_flags.build_train_config(
      dict(base, router="dense", mod_capacity=base.get("mod_capacity") or 0.125))
  per_token = lambda c: flops.flops_per_token(c.model, c.seq_len)["total"]
  if arm == "dense_tokens":
    steps = int(round(dense.steps * per_token(dense) / per_token(mod)))
    model = dense.model
  elif arm == "dense_small":
    target = per_token(mod)
    widths = range(8, dense.model.d_ff + 1)
    d_ff = min(widths, key=lambda f: abs(per_token(dataclasses.replace(
        dense, model=dataclasses.replace(dense.model, d_ff=f))) - target))
    model = dataclasses.replace(dense.model, d_ff=d_ff)
    small = dataclasses.replace(dense, model=model)
    steps = int(round(dense.steps * per_token(dense) / per_token(small)))
  else:
    raise ValueError(f"arm={arm!r} is unknown; allowed: {', '.join(ARMS)}")
  ratio = steps / dense.steps
  optim = dataclasses.replace(dense.optim, total_steps=steps)
  return dataclasses.replace(
      dense, model=model, optim=optim, steps=steps,
      eval_every=max(1, int(round(dense.eval_every * ratio))))


def train_one(arm: str, seed: int, base: dict) -> dict:
  import jax

  from moejax import flops

  cfg = dataclasses.replace(arm_config(arm, base), seed=seed)
  run = experiment.train_record(cfg, experiment.workdir(FLAGS.workroot, arm,
                                                        seed))
  summary, wall = run.summary, run.wall_seconds
  per_token = flops.flops_per_token(cfg.model, cfg.seq_len)
  history = run.history(("step",), prefixes=("eval_", "loss"))
  result = {
      "label": arm, "seed": seed, "steps": cfg.steps, "config": base["config"],
      "device": jax.devices()[0].device_kind,
      "flops_per_token": per_token["total"],
      "flops_parts": {k: v for k, v in per_token.items() if k != "layers"},
      "train_flops": flops.train_flops(cfg.model, cfg.batch_size, cfg.seq_len,
                                       cfg.steps),
      "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
      "eval_loss": summary["eval_loss"],
      "train_seconds": summary["train_seconds"], "wall_seconds": wall,
      "tokens_per_s": summary["tokens_per_s"], "history": history,
      "model": {k: v for k, v in vars(cfg.model).items() if k != "moe"},
  }
  experiment.save_json(experiment.record_path(
      os.path.join(FLAGS.out, "records"), arm, seed), result, indent=1)
  print(f"{arm} seed {seed}: {cfg.steps} steps, d_ff {cfg.model.d_ff}, "
        f"eval_loss {summary['eval_loss']:.4f} ({wall:.0f} s)", flush=True)
  return result


def load(directory: str) -> dict[tuple[str, int], dict]:
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    r = json.load(open(path))
    out[(r["label"], r["seed"])] = r
  return out


def aux_cost(runs: dict, aux0: dict) -> list[dict]:
  """Loss cost of the router's causal BCE: `mod` with it minus without it.

  "top-C" compares both models under top-C routing (the cost on the LM loss of
  training with the BCE); "causal router" takes the BCE model under its own
  causal rule (sigmoid(r) > 0.5), the loss a sampler would see.
  """
  out = []
  seeds = sorted(s for (l, s) in aux0 if l == "mod" and ("mod", s) in runs)
  for name, mode in (("top-C", "top_c"), ("causal router", "router")):
    diffs, rel = [], []
    for s in seeds:
      base = aux0[("mod", s)]["modes"]["top_c"]["eval_loss"]
      value = runs[("mod", s)]["modes"][mode]["eval_loss"]
      diffs.append(value - base)
      rel.append((value - base) / base)
    if diffs:
      out.append({"name": name, "seeds": seeds, "diffs": diffs,
                  "delta": mean_std(diffs), "relative": mean_std(rel)})
  return out


def report(out: str, mod_records: str, aux0_records: str) -> dict:
  """Per-arm means and paired (same-seed) differences against mod_iso."""
  runs = {**load(mod_records), **load(os.path.join(out, "records"))}
  labels = ("dense", "mod", "mod_iso", "dense_tokens", "dense_small")
  rows, lines = [], [
      "| run | seeds | steps | d_ff | fwd FLOPs/token | train FLOPs | val. loss "
      "| mod_iso − run, paired (mean ± std) | per seed |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for label in labels:
    seeds = sorted(s for (l, s) in runs if l == label)
    if not seeds:
      continue
    rs = [runs[(label, s)] for s in seeds]
    loss = mean_std([r["eval_loss"] for r in rs])
    paired = [s for s in seeds if ("mod_iso", s) in runs]
    diffs = [runs[("mod_iso", s)]["eval_loss"] - runs[(label, s)]["eval_loss"]
             for s in paired]
    d = mean_std(diffs) if diffs and label != "mod_iso" else None
    row = {"label": label, "seeds": seeds, "steps": rs[0]["steps"],
           "d_ff": rs[0]["model"]["d_ff"],
           "flops_per_token": rs[0]["flops_per_token"],
           "train_flops": rs[0]["train_flops"],
           "eval_loss": loss, "paired_seeds": paired if d else [],
           "mod_iso_minus_run": d, "diffs": diffs if d else []}
    rows.append(row)
    lines.append(
        f"| {label} | {','.join(map(str, seeds))} | {row['steps']} | "
        f"{row['d_ff']} | {row['flops_per_token'] / 1e6:.2f} M | "
        f"{row['train_flops'] / 1e12:.3f} T | {loss[0]:.4f} ± {loss[1]:.4f} | "
        + (f"{d[0]:+.4f} ± {d[1]:.4f} (n = {len(diffs)}) | "
           + " / ".join(f"{x:+.4f}" for x in diffs) if d else "— | —") + " |")
  aux = aux_cost(runs, load(aux0_records)) if os.path.isdir(aux0_records) else None
  if aux:
    lines += ["", "Router-BCE cost: `mod` (BCE weight 0.01) vs the same run with "
              "weight 0, paired by seed (relative to the weight-0 top-C loss):", "",
              "| comparison | seeds | Δ loss (mean ± std) | relative | per seed |",
              "| --- | --- | --- | --- | --- |"]
    for row in aux:
      lines.append(
          f"| {row['name']} | {','.join(map(str, row['seeds']))} | "
          f"{row['delta'][0]:+.4f} ± {row['delta'][1]:.4f} | "
          f"{100 * row['relative'][0]:+.2f}% ± {100 * row['relative'][1]:.2f} | "
          + " / ".join(f"{x:+.4f}" for x in row["diffs"]) + " |")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"rows": rows, "aux_cost": aux}, f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return {"rows": rows}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.compile_cache:
    import jax
    jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if FLAGS.phase == "report":
    report(FLAGS.out, FLAGS.mod_records, FLAGS.aux0_records)
    return
  values = FLAGS.flag_values_dict()
  base = {k: v for k, v in values.items() if k not in OWN}
  base["progress"] = False
  for seed in [int(s) for s in FLAGS.seeds.split(",")]:
    for arm in [a for a in FLAGS.arms.split(",") if a]:
      if not os.path.exists(os.path.join(FLAGS.out, "records",
                                         f"{arm}_s{seed}.json")):
        train_one(arm, seed, base)


if __name__ == "__main__":
  app.run(main)
