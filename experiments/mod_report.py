"""Dense vs Mixture-of-Depths vs MoDE: training runs, causal evaluation, plots.

  # all runs (subprocesses, --parallel at a time), then the report (the
  # command of experiments/reports/mod.md, tiny preset on a CPU):
  python experiments/mod_report.py --config=tiny --batch_size=8 --steps=200 \
      --eval_every=40 --eval_batches=4 --log_every=20 --sample_tokens=0 \
      --checkpoint_every=100000 --mod_capacity=0.125 --seeds=0,1 --parallel=3 \
      --workroot=runs/mod --out=experiments/reports/mod --compile_cache=runs/mod_cc
  # only the report from finished runs:
  python experiments/mod_report.py --phase=report --out=experiments/reports/mod

Runs (`--runs`, labels):
  dense            router=dense
  mod              dense MLPs, MoD 12.5% every other block (`--mod_capacity`)
  mod_iso          as mod, trained for more steps: the dense run's training
                   FLOPs (matched training FLOPs; FLOPs counted from shapes)
  moe              top-k MoE (the preset's experts, k)
  mode_staged      the MoE model with MoD every other block (staged MoDE)
  mode_integrated  the MoE model with `--noop_experts` no-op experts added to
                   every router (integrated MoDE)
Every flag of `experiments/train_lm.py` is the base of every run. Each (run,
seed) trains in WORKROOT/LABEL_sSEED, then is evaluated on the validation
batches with top-C routing and with both causal rules (`mod_routing`
"predictor" and "router": the realised capacity and the loss gap), and writes
OUT/records/LABEL_sSEED.json. The report phase writes OUT/results.json,
OUT/results.md (mean ± std over seeds) and PNGs: loss_vs_flops.png (final
validation loss vs forward FLOPs per token), eval_loss.png (validation loss
vs training FLOPs), predictor.png (predictor and router accuracy vs step).
`--save_params=LABEL` writes that run's seed-0 params as .npz files for
`experiments/bench_decode.py --params`.

Axis legend (of the logged arrays): none beyond scalars per step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

from moejax import experiment
from moejax.cli import lm_flags
from moejax.experiment import format_ms, mean_std

lm_flags.define_flags()
SHARED_FLAGS = experiment.define_flags(out="experiments/out/mod",
                                       workroot="runs/mod")
flags.DEFINE_string("runs", "dense,mod,mod_iso,moe,mode_staged,mode_integrated",
                    "Comma-separated run labels (see the module docstring).")
flags.DEFINE_string("phase", "all", "all (train + report), train, or report.")
flags.DEFINE_string("only", None, "Train only this label (with --seed).")
flags.DEFINE_integer("parallel", 1, "Runs trained at a time (subprocesses).")
flags.DEFINE_float("deadline_s", 0.0, "train phase: start no run after this "
                   "many seconds, kill the ones running at 1.25x (0 = none).")
flags.DEFINE_integer("noop_experts", None, "mode_integrated: no-op experts "
                     "(default: the preset's number of experts).")
flags.DEFINE_string("save_params", "mod", "Label whose seed-0 params are saved "
                    "as .npz ('' = none).")
FLAGS = flags.FLAGS
OWN = SHARED_FLAGS + ("runs", "phase", "only", "parallel", "deadline_s",
                      "noop_experts", "save_params")
LABELS = ("dense", "mod", "mod_iso", "moe", "mode_staged", "mode_integrated")
MOD_MODES = ("top_c", "predictor", "router")


def run_values(label: str, base: dict) -> dict:
  """Flag values of one run."""
  from moejax import configs
  values = dict(base)
  pre = configs.preset(values["config"])
  mod = values.get("mod_capacity") or 0.125
  values["mod_capacity"] = 0.0
  if label in ("dense", "mod", "mod_iso"):
    values["router"] = "dense"
  else:
    values["router"] = "top_k" if base["router"] == "dense" else base["router"]
  if label in ("mod", "mod_iso", "mode_staged"):
    values["mod_capacity"] = mod
  if label == "mode_integrated":
    values["num_noop_experts"] = (FLAGS.noop_experts if FLAGS.noop_experts
                                  is not None else
                                  values.get("num_experts") or pre["num_experts"])
  if label == "mod_iso":
    from moejax import flops
    dense = lm_flags.build_train_config(run_values("dense", base))
    modc = lm_flags.build_train_config(run_values("mod", base))
    ratio = (flops.flops_per_token(dense.model, dense.seq_len)["total"]
             / flops.flops_per_token(modc.model, modc.seq_len)["total"])
    values["steps"] = int(round(dense.steps * ratio))
    values["eval_every"] = max(1, int(round(dense.eval_every * ratio)))
  return values


def evaluate_modes(model, state, data, num_batches: int, modes) -> dict:
  """Validation loss and MoD metrics of the final state per routing mode."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moejax.train.step import cross_entropy, router_outputs, summarize

  out = {}
  for mode in modes:
    @jax.jit
    def step(params, router_state, batch, mode=mode):
      logits, coll = model.apply(
          {"params": params, "router_state": router_state}, batch["inputs"],
          train=False, mod_routing=mode, mutable=["router"])
      ce, count = cross_entropy(logits, batch["targets"], batch["mask"])
      metrics = summarize(router_outputs(coll.get("router", {})))
      metrics.pop("layer_fanout", None)
      return ce, count, metrics
    total, count, sums, n = 0.0, 0.0, {}, 0
    for batch in data.eval_batches(num_batches):
      batch = {k: jnp.asarray(np.asarray(v)) for k, v in batch.items()}
      ce, c, m = jax.device_get(step(state.params, state.router_state, batch))
      total, count, n = total + float(ce), count + float(c), n + 1
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    out[mode] = {"eval_loss": total / max(count, 1.0),
                 **{k: v / n for k, v in sums.items()}}
  return out


def save_params_npz(params, path_prefix: str, max_bytes: int = 15 * 2 ** 20):
  """Writes params as flat 'a/b/c' .npz files of at most ~max_bytes each."""
  import flax.traverse_util
  import numpy as np
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  files, part, size = [], {}, 0
  for key, value in sorted(flat.items()):
    value = np.asarray(value)
    if part and size + value.nbytes > max_bytes:
      files.append(part)
      part, size = {}, 0
    part[key] = value
    size += value.nbytes
  files.append(part)
  paths = []
  for i, part in enumerate(files):
    path = f"{path_prefix}_{i}.npz"
    np.savez(path, **part)
    paths.append(path)
  return paths


def train_one(label: str, seed: int, base: dict) -> dict:
  import jax

  from moejax import flops
  from moejax.data import get_lm_data
  from moejax.models.lm import TransformerLM

  values = run_values(label, base)
  values["seed"] = seed
  cfg = lm_flags.build_train_config(values)
  run = experiment.train_record(
      cfg, experiment.workdir(FLAGS.workroot, label, seed))
  summary, wall = run.summary, run.wall_seconds
  model = TransformerLM(cfg.model)
  data = get_lm_data(cfg.dataset, seq_len=cfg.seq_len,
                     batch_size=cfg.batch_size, seed=seed,
                     data_dir=cfg.data_dir)
  modes = MOD_MODES if cfg.model.mod is not None else ("top_c",)
  evals = evaluate_modes(model, summary["state"], data, cfg.eval_batches,
                         modes)
  per_token = flops.flops_per_token(cfg.model, cfg.seq_len)
  history = run.history(("step",), prefixes=(
      "eval_", "loss", "mod_", "experts_per_token", "noop_fraction",
      "mlp_skip_fraction", "drop_fraction"))
  result = {
      "label": label, "seed": seed, "steps": cfg.steps,
      "config": values["config"], "device": jax.devices()[0].device_kind,
      "flops_per_token": per_token["total"],
      "flops_parts": {k: v for k, v in per_token.items() if k != "layers"},
      "train_flops": flops.train_flops(cfg.model, cfg.batch_size, cfg.seq_len,
                                       cfg.steps),
      "eval_loss": summary["eval_loss"], "modes": evals,
      "train_seconds": summary["train_seconds"], "wall_seconds": wall,
      "tokens_per_s": summary["tokens_per_s"], "history": history,
      "model": {k: v for k, v in vars(cfg.model).items() if k != "moe"},
      "moe": None if cfg.model.moe is None else {
          "num_experts": cfg.model.moe.num_experts,
          "expert_width": cfg.model.moe.expert_width,
          "router": cfg.model.moe.router.name, "k": cfg.model.moe.router.k,
          "num_noop_experts": cfg.model.moe.num_noop_experts},
  }
  experiment.save_json(record_path(label, seed), result, indent=1)
  if FLAGS.save_params and label == FLAGS.save_params and seed == 0:
    result["params_files"] = save_params_npz(
        jax.device_get(summary["state"].params),
        os.path.join(FLAGS.out, f"params_{label}_s0"))
  print(f"{label} seed {seed}: eval_loss {summary['eval_loss']:.4f} "
        f"({wall:.0f} s)", flush=True)
  return result


def record_path(label: str, seed: int) -> str:
  """OUT/records/LABEL_sSEED.json."""
  return experiment.record_path(os.path.join(FLAGS.out, "records"), label,
                                seed)


def train_parallel(labels, seeds, argv_flags) -> None:
  """Trains every (label, seed) in subprocesses, seeds in waves."""
  jobs = [(label, seed) for seed in seeds for label in labels
          if not os.path.exists(record_path(label, seed))]
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  t0, running = time.time(), []
  os.makedirs(os.path.join(FLAGS.out, "logs"), exist_ok=True)
  while jobs or running:
    elapsed = time.time() - t0
    if FLAGS.deadline_s and elapsed > FLAGS.deadline_s and jobs:
      print(f"deadline: not starting {jobs}", flush=True)
      jobs = []
    while jobs and len(running) < FLAGS.parallel:
      label, seed = jobs.pop(0)
      log = open(os.path.join(FLAGS.out, "logs", f"{label}_s{seed}.log"), "w")
      cmd = [sys.executable, os.path.abspath(__file__), *argv_flags,
             f"--only={label}", f"--seed={seed}", "--phase=train"]
      running.append((label, seed, subprocess.Popen(
          cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
      print(f"[{elapsed:6.0f} s] started {label} seed {seed}", flush=True)
    time.sleep(2)
    for item in list(running):
      label, seed, proc, log = item
      hard = FLAGS.deadline_s and time.time() - t0 > 1.25 * FLAGS.deadline_s
      if proc.poll() is None and hard:
        proc.kill()
        print(f"killed {label} seed {seed} at the hard deadline", flush=True)
      if proc.poll() is not None:
        log.close()
        running.remove(item)
        print(f"[{time.time() - t0:6.0f} s] {label} seed {seed} exited "
              f"{proc.returncode}", flush=True)


def fmt(m, s, digits=4):
  return format_ms((m, s), f".{digits}f", missing="—")


def report(out: str) -> dict:
  from moejax.experiment.plots import pyplot, save
  plt = pyplot()

  runs = experiment.load_records(os.path.join(out, "records"))
  if not runs:
    raise ValueError(f"no runs under {out}/records")
  by_label: dict[str, list] = {}
  for r in runs:
    by_label.setdefault(r["label"], []).append(r)
  order = [l for l in LABELS if l in by_label] + sorted(
      set(by_label) - set(LABELS))
  dense_flops = (by_label["dense"][0]["flops_per_token"]
                 if "dense" in by_label else None)
  rows = []
  for label in order:
    rs = by_label[label]
    row = {"label": label, "seeds": [r["seed"] for r in rs],
           "steps": rs[0]["steps"], "flops_per_token": rs[0]["flops_per_token"],
           "flops_ratio": (rs[0]["flops_per_token"] / dense_flops
                           if dense_flops else None),
           "train_flops": rs[0]["train_flops"]}
    row["eval_loss"] = mean_std([r["modes"]["top_c"]["eval_loss"] for r in rs])
    for mode in ("predictor", "router"):
      if mode in rs[0]["modes"]:
        row[f"eval_loss_{mode}"] = mean_std(
            [r["modes"][mode]["eval_loss"] for r in rs])
        row[f"gap_{mode}"] = mean_std(
            [r["modes"][mode]["eval_loss"] - r["modes"]["top_c"]["eval_loss"]
             for r in rs])
        row[f"capacity_{mode}"] = mean_std(
            [r["modes"][mode].get("mod_capacity") for r in rs])
    top = rs[0]["modes"]["top_c"]
    for key in ("mod_pred_accuracy", "mod_pred_precision", "mod_pred_recall",
                "mod_router_accuracy", "noop_fraction", "mlp_skip_fraction"):
      if key in top:
        row[key] = mean_std([r["modes"]["top_c"][key] for r in rs])
    row["tokens_per_s"] = mean_std([r["tokens_per_s"] for r in rs])
    rows.append(row)

  lines = ["| run | steps | fwd FLOPs/token | × dense | val loss (top-C) | "
           "val loss (causal: predictor) | gap | val loss (causal: router) | "
           "gap | capacity (predictor / router) | predictor acc / prec / rec | "
           "train tokens/s |", "|" + " --- |" * 12]
  for r in rows:
    cap = " / ".join(fmt(*r[f"capacity_{m}"], 3) if f"capacity_{m}" in r
                     else "—" for m in ("predictor", "router"))
    acc = " / ".join(fmt(*r[k], 3) if k in r else "—" for k in (
        "mod_pred_accuracy", "mod_pred_precision", "mod_pred_recall"))
    lines.append(
        f"| {r['label']} | {r['steps']} | {r['flops_per_token'] / 1e6:.2f} M | "
        f"{r['flops_ratio']:.3f} | {fmt(*r['eval_loss'])} | "
        f"{fmt(*r.get('eval_loss_predictor', (None, None)))} | "
        f"{fmt(*r.get('gap_predictor', (None, None)))} | "
        f"{fmt(*r.get('eval_loss_router', (None, None)))} | "
        f"{fmt(*r.get('gap_router', (None, None)))} | {cap} | {acc} | "
        f"{fmt(*r['tokens_per_s'], 0)} |")
  table = "\n".join(lines)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  experiment.save_json(os.path.join(out, "results.json"), {
      "rows": rows, "devices": sorted({r["device"] for r in runs})}, indent=1)
  print(table)

  # Final validation loss vs forward FLOPs per token.
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    m, s = r["eval_loss"]
    ax.errorbar(r["flops_per_token"] / 1e6, m, yerr=s, fmt="o", capsize=3,
                label=f"{r['label']} ({r['steps']} steps)")
  ax.set_xlabel("forward FLOPs per token (M, from shapes)")
  ax.set_ylabel("validation loss (nats/byte, top-C)")
  ax.legend(fontsize=7)
  save(fig, os.path.join(out, "loss_vs_flops.png"))

  # Validation loss vs training FLOPs.
  fig, ax = plt.subplots(figsize=(6, 4))
  for label in order:
    for r in by_label[label]:
      per_step = r["train_flops"] / r["steps"]
      ev = [h for h in r["history"] if "eval_loss" in h]
      ax.plot([h["step"] * per_step for h in ev],
              [h["eval_loss"] for h in ev], "-" if r["seed"] == 0 else "--",
              color=f"C{order.index(label)}",
              label=label if r["seed"] == by_label[label][0]["seed"] else None)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (3 x forward, from shapes)")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.legend(fontsize=7)
  save(fig, os.path.join(out, "eval_loss.png"))

  # Predictor / router accuracy against top-C on validation data vs step.
  mod_labels = [l for l in order if "mod_capacity" in by_label[l][0]["modes"]
                ["top_c"]]
  if mod_labels:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in mod_labels:
      for r in by_label[label]:
        ev = [h for h in r["history"] if "eval_mod_pred_accuracy" in h]
        c = f"C{order.index(label)}"
        ax.plot([h["step"] for h in ev],
                [h["eval_mod_pred_accuracy"] for h in ev], "-", color=c,
                label=f"{label} s{r['seed']} predictor")
        ax.plot([h["step"] for h in ev],
                [h["eval_mod_router_accuracy"] for h in ev], ":", color=c,
                label=f"{label} s{r['seed']} router (r > 0)")
    ax.axhline(0.97, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy vs top-C (validation)")
    ax.legend(fontsize=6)
    save(fig, os.path.join(out, "predictor.png"))
  return {"rows": rows}


def main(argv):
  base = experiment.start(argv, OWN)
  labels = [l for l in FLAGS.runs.split(",") if l]
  for label in labels:
    if label not in LABELS:
      raise app.UsageError(f"--runs: label {label!r} is unknown; allowed: "
                           f"{', '.join(LABELS)}")
  seeds = experiment.seeds_flag()
  if FLAGS.only:
    train_one(FLAGS.only, FLAGS.seed, base)
    return
  if FLAGS.phase in ("all", "train"):
    if FLAGS.parallel > 1:
      passed = [a for a in sys.argv[1:] if not a.startswith(
          ("--phase", "--only", "--seed=", "--parallel", "--deadline_s"))]
      train_parallel(labels, seeds, passed)
    else:
      experiment.run_grid(labels, seeds, record_path,
                          lambda label, seed: train_one(label, seed, base),
                          indent=1)
  if FLAGS.phase in ("all", "report"):
    report(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
