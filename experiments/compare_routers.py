"""Train several routers × seeds on one config and compare them.

  python experiments/compare_routers.py --config=tiny --steps=300 \
      --runs="dense;top_k;top_p,p=0.3;dtop_p;dtop_p_layer=dtop_p,dtop_p_scope=layer" \
      --seeds=0,1 --out=experiments/reports/dtop_p --workroot=runs/compare

Every flag of `experiments/train_lm.py` is accepted and is the base of every
run. `--runs` lists run specs separated by ';', each
`[LABEL=]ROUTER[,FLAG=VALUE...]`: the router name (`dense` = no MoE) and the
flags that differ for that run (e.g. `top_p,p=0.3` or
`dtop_p_layer=dtop_p,dtop_p_scope=layer`); the label defaults to the spec text.
A FLAG must be a flag of `experiments/train_lm.py` (a typo or one of this
script's own flags exits 2 with one line instead of running the defaults), and
its VALUE is parsed by that flag's parser.
Each (run, seed) trains in `WORKROOT/LABEL_sSEED` (a finished one is reused, an
interrupted one resumes) and writes `OUT/records/LABEL_sSEED.json` (summary, router
params per layer, controller state, the logged history). Then `OUT/results.json`
and `OUT/results.md` (a table: mean ± std over seeds) and, with `--plots`, PNGs:
`loss.png`, `fanout.png` (mean fanout over steps vs target, plus p where logged),
`layer_fanout.png`, `fanout_std.png`, `router_params.png` (e.g. DTop-p's gamma).

Axis legend (of the logged arrays):
  L  routed layers
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

from absl import app, flags

from moejax import experiment
from moejax.cli import app as cli_app
from moejax.cli import lm_flags
from moejax.experiment import RunSpec, format_ms, mean_std, parse_runs

lm_flags.define_flags()
SHARED_FLAGS = experiment.define_flags(out="experiments/out/compare",
                                       workroot="runs/compare")
flags.DEFINE_string("runs", "dense;top_k;top_p;dtop_p",
                    "Run specs separated by ';': [LABEL=]ROUTER[,FLAG=VALUE...]")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_float("band", 0.02, "Fanout band (fraction of the target) for "
                   "the settling step.")
flags.DEFINE_integer("smooth_steps", 50, "Window (steps) of the moving "
                     "average of the fanout for the smoothed settling step.")
flags.DEFINE_bool("keep_going", True, "Record a failed run and go on.")
flags.DEFINE_bool("aggregate_only", False, "Train nothing: tabulate and plot "
                  "the run JSONs already in OUT/records (missing runs skipped).")

FLAGS = flags.FLAGS
# Flags of this script, not of the training runs.
# Per-run JSONs under OUT (tracked by git, unlike the runs/ workdirs).
RECORDS = "records"
OWN_FLAGS = SHARED_FLAGS + ("runs", "plots", "band", "keep_going",
                            "aggregate_only", "smooth_steps")
HISTORY_KEYS = ("step", "loss", "eval_loss", "experts_per_token", "fanout_std",
                "layer_fanout", "drop_fraction", "drop_fraction_above_mean",
                "kept_per_token", "max_fanout", "p", "p_layer", "pi_integral",
                "gamma", "max_vio", "top_p_capped", "zero_expert_fraction",
                "router_entropy", "tokens_per_s", "aux_loss")


def settling(steps, values, target: float, band: float) -> dict[str, Any]:
  """Settling of a logged fanout series to `target` within ±band·target.

  Returns the first logged step after which every later value stays in the
  band (None if the last value is outside), the largest deviation after it and
  over the second half (fractions of the target).
  """
  pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
  if not pairs or not target:
    return {"settle_step": None, "max_dev_after_settle": None,
            "max_dev_second_half": None}
  dev = [abs(v - target) / target for _, v in pairs]
  settle = None
  for i in range(len(pairs) - 1, -1, -1):
    if dev[i] > band:
      settle = pairs[i + 1][0] if i + 1 < len(pairs) else None
      break
  else:
    settle = pairs[0][0]
  after = [d for (s, _), d in zip(pairs, dev) if settle is not None and s >= settle]
  half = pairs[-1][0] / 2
  second = [d for (s, _), d in zip(pairs, dev) if s > half]
  return {"settle_step": settle,
          "max_dev_after_settle": max(after) if after else None,
          "max_dev_second_half": max(second) if second else None}


def router_params_per_layer(params, method, num_experts: int) -> dict[str, Any]:
  """{param name: {layer path: value}} for the method's `router_params`."""
  import flax.traverse_util
  import numpy as np
  names = set(method.router_params(num_experts)) if method is not None else set()
  out: dict[str, dict[str, Any]] = {}
  if not names:
    return out
  for path, value in flax.traverse_util.flatten_dict(params).items():
    if path[-1] in names:
      out.setdefault(path[-1], {})["/".join(path[:-1])] = np.asarray(
          value).tolist()
  return out


def run_one(spec: RunSpec, seed: int, base: dict[str, Any], workroot: str,
            band: float) -> dict[str, Any]:
  """Trains one (run, seed) and returns its JSON-able result."""
  import jax
  from moejax.train import metrics as metrics_lib
  from moejax.train.step import router_states

  values = dict(base)
  values.update(spec.options)
  values["router"] = spec.router
  values["seed"] = seed
  workdir = experiment.workdir(workroot, spec.label, seed)
  values["workdir"] = workdir
  cfg = lm_flags.build_train_config(values)
  run = experiment.train_record(cfg, workdir)
  summary, wall = run.summary, run.wall_seconds
  moe = cfg.model.moe
  method = moe.router if moe is not None else None
  history = run.history(HISTORY_KEYS)
  final = [r for r in run.log if r.get("final")]
  state = jax.device_get(summary["state"])
  controller = {"/".join(k): metrics_lib.to_python(v) for k, v in
                router_states(state.router_state).items()}
  target = method.target_fanout if method is not None else None
  train_rows = [r for r in history if "loss" in r]
  result = {
      "label": spec.label, "router": spec.router, "seed": seed,
      "options": spec.options, "workdir": workdir,
      "config": {"preset": values.get("config"), "steps": cfg.steps,
                 "num_layers": cfg.model.num_layers,
                 "d_model": cfg.model.d_model,
                 "num_experts": moe.num_experts if moe else None,
                 "expert_width": moe.expert_width if moe else None,
                 "target_fanout": target,
                 "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                 "method": repr(method) if method is not None else "dense"},
      "eval_loss": summary["eval_loss"],
      "final_eval": final[-1] if final else {},
      "tokens_per_s": summary["tokens_per_s"],
      "train_seconds": summary["train_seconds"], "wall_seconds": wall,
      "resumed_from": summary["resumed_from"],
      "router_params": router_params_per_layer(
          state.params, method, moe.num_experts if moe else 0),
      "controller_state": controller,
      "tail": {k: experiment.tail_mean(history, k) for k in (
          "experts_per_token", "fanout_std", "layer_fanout", "drop_fraction",
          "drop_fraction_above_mean", "p", "p_layer", "gamma", "max_vio",
          "top_p_capped") if experiment.tail_mean(history, k) is not None},
      "history": history,
  }
  if target is not None and train_rows:
    result["settling"] = settling([r["step"] for r in train_rows],
                                  [r.get("experts_per_token")
                                   for r in train_rows], target, band)
  return result


def fanout_control(history, target: float, band: float,
                   smooth_steps: int) -> dict[str, Any]:
  """Settling of the logged per-step mean fanout and of its moving average
  over `smooth_steps` steps; the step-to-step sd over the second half."""
  rows = [r for r in history if "loss" in r and "experts_per_token" in r]
  if not rows or target is None:
    return {}
  steps = [r["step"] for r in rows]
  fan = [r["experts_per_token"] for r in rows]
  every = steps[1] - steps[0] if len(steps) > 1 else 1
  w = max(1, int(round(smooth_steps / every)))
  smooth = [sum(fan[i - w + 1:i + 1]) / w for i in range(w - 1, len(fan))]
  half = [f for s, f in zip(steps, fan) if s > steps[-1] / 2]
  mean = sum(half) / len(half)
  return {"raw": settling(steps, fan, target, band),
          "smoothed": settling(steps[w - 1:], smooth, target, band),
          "sd_second_half": math.sqrt(sum((f - mean) ** 2 for f in half)
                                      / len(half))}


def aggregate(results: list[dict[str, Any]], specs: list[RunSpec],
              band: float = 0.02, smooth_steps: int = 50):
  """One row per run label: mean ± std over seeds of the headline numbers."""
  rows = []
  for spec in specs:
    rs = [r for r in results if r["label"] == spec.label and "error" not in r]
    if not rs:
      rows.append({"label": spec.label, "router": spec.router, "seeds": []})
      continue
    row = {"label": spec.label, "router": spec.router,
           "seeds": [r["seed"] for r in rs],
           "target": rs[0]["config"]["target_fanout"]}
    row["eval_loss"] = mean_std([r["eval_loss"] for r in rs])
    for key in ("experts_per_token", "fanout_std", "drop_fraction",
                "drop_fraction_above_mean", "max_vio"):
      row[key] = mean_std([r["tail"].get(key) for r in rs])
    control = [fanout_control(r["history"], row["target"], band, smooth_steps)
               for r in rs] if "history" in rs[0] else []
    row["settle_step"] = [c.get("raw", {}).get("settle_step") for c in control]
    row["settle_step_smoothed"] = [c.get("smoothed", {}).get("settle_step")
                                   for c in control]
    row["max_dev_smoothed"] = [c.get("smoothed", {}).get(
        "max_dev_after_settle") for c in control]
    row["fanout_sd_steps"] = mean_std([c.get("sd_second_half")
                                        for c in control])
    row["tokens_per_s"] = mean_std([r["tokens_per_s"] for r in rs])
    first = [r for r in results if r["label"] == specs[0].label
             and "error" not in r]
    if spec is not specs[0] and first:
      # Same-seed differences: seeds share data order and initialisation.
      row["eval_loss_vs_" + specs[0].label] = experiment.paired_delta(
          experiment.by_seed(first, "eval_loss"),
          experiment.by_seed(rs, "eval_loss"))
    rows.append(row)
  return rows


def _fmt(ms, digits=3, pct=False):
  return format_ms(ms, ".1f" if pct else f".{digits}f", pct=pct)


def markdown_table(rows, band: float = 0.02, smooth_steps: int = 50) -> str:
  """The comparison table (per-seed lists where a mean would hide a None)."""
  b = f"±{100 * band:g}%"
  head = ("| run | router | seeds | val. loss (nats/byte) | mean fanout, last "
          "25% (target) | per-token fanout std | drop | drop, above-mean "
          f"tokens | settle step, per-step fanout ({b}) | settle step, "
          f"{smooth_steps}-step mean ({b}) | max dev. of the {smooth_steps}-step "
          "mean after settling | step-to-step fanout sd, 2nd half |")
  lines = [head, "|" + "---|" * 12]
  seq = lambda xs, f: ", ".join("–" if x is None else f(x) for x in xs) or "–"
  for r in rows:
    if not r["seeds"]:
      lines.append(f"| {r['label']} | {r['router']} | failed |" + " |" * 9)
      continue
    target = r.get("target")
    fan = _fmt(r["experts_per_token"], 2)
    if target is not None and fan != "–":
      fan += f" ({target:g})"
    routed = target is not None
    lines.append(
        f"| {r['label']} | {r['router']} | {','.join(map(str, r['seeds']))} "
        f"| {_fmt(r['eval_loss'], 4)} | {fan} | {_fmt(r['fanout_std'], 2)} "
        f"| {_fmt(r['drop_fraction'], pct=True)} "
        f"| {_fmt(r['drop_fraction_above_mean'], pct=True)} "
        f"| {seq(r['settle_step'], str) if routed else '–'} "
        f"| {seq(r['settle_step_smoothed'], str) if routed else '–'} "
        f"| {seq(r['max_dev_smoothed'], lambda d: f'{100 * d:.1f}%') if routed else '–'} "
        f"| {_fmt(r['fanout_sd_steps'], 3) if routed else '–'} |")
  return "\n".join(lines) + "\n"


def plot_all(results, specs, out: str) -> list[str]:
  """Writes the comparison PNGs; returns their paths."""
  import numpy as np

  from moejax.experiment.plots import pyplot, save
  from moejax.train.metrics import legend_below
  plt = pyplot()
  ok = [r for r in results if "error" not in r]
  labels = [s.label for s in specs if any(r["label"] == s.label for r in ok)]
  colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
  paths = []
  seeds_of = lambda lab: [r for r in ok if r["label"] == lab]

  # Loss: training curves and final validation loss ± std.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
  for lab in labels:
    for j, r in enumerate(seeds_of(lab)):
      tr = [h for h in r["history"] if "loss" in h]
      steps = np.array([h["step"] for h in tr])
      loss = np.array([h["loss"] for h in tr])
      w = max(1, len(loss) // 30)
      smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
      axes[0].plot(steps[w - 1:], smooth, color=colors[lab], alpha=0.8,
                   lw=1, label=lab if j == 0 else None)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("train loss (nats/byte, smoothed)")
  legend_below(axes[0])
  means = [mean_std([r["eval_loss"] for r in seeds_of(lab)]) for lab in labels]
  axes[1].bar(range(len(labels)), [m[0] for m in means],
              yerr=[m[1] for m in means], capsize=4,
              color=[colors[lab] for lab in labels])
  for i, lab in enumerate(labels):
    axes[1].plot([i] * len(seeds_of(lab)),
                 [r["eval_loss"] for r in seeds_of(lab)], "k.", ms=4)
  lo = min(m[0] - 3 * max(m[1], 1e-3) for m in means)
  hi = max(m[0] + 3 * max(m[1], 1e-3) for m in means)
  axes[1].set_ylim(lo, hi)
  axes[1].set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
  axes[1].set_ylabel("validation loss (mean ± std, dots = seeds)")
  paths.append(save(fig, os.path.join(out, "loss.png")))

  routed = [lab for lab in labels
            if seeds_of(lab)[0]["config"]["target_fanout"] is not None]
  if not routed:
    return paths
  # Fanout trajectory (controller step response) and p.
  has_p = [lab for lab in routed
           if any("p" in h for h in seeds_of(lab)[0]["history"])]
  fig, axes = plt.subplots(1, 2 if has_p else 1, figsize=(12 if has_p else 6,
                                                          4.8), squeeze=False)
  ax = axes[0, 0]
  targets = set()
  for lab in routed:
    for j, r in enumerate(seeds_of(lab)):
      tr = [h for h in r["history"] if "experts_per_token" in h and "loss" in h]
      ax.plot([h["step"] for h in tr], [h["experts_per_token"] for h in tr],
              color=colors[lab], lw=1.5 if j == 0 else 1, alpha=0.8,
              ls="-" if j == 0 else ":", label=lab if j == 0 else None,
              zorder=3)
      targets.add(r["config"]["target_fanout"])
  for t in targets:  # under the curves: a fixed-k router's lies on it
    ax.axhline(t, color="0.5", ls="--", lw=1, zorder=1)
    ax.axhspan(t * (1 - FLAGS.band), t * (1 + FLAGS.band), color="k",
               alpha=0.08, zorder=0)
  ax.set_xlabel("step")
  ax.set_ylabel("mean experts per token\n(dashed: target ±%g%%)"
                % (100 * FLAGS.band))
  legend_below(ax)
  if has_p:
    ax = axes[0, 1]
    for lab in has_p:
      for j, r in enumerate(seeds_of(lab)):
        tr = [h for h in r["history"] if "p" in h and "loss" in h]
        ax.plot([h["step"] for h in tr], [h["p"] for h in tr],
                color=colors[lab], lw=1, ls="-" if j == 0 else ":",
                label=lab if j == 0 else None)
        if tr and "p_layer" in tr[0] and r["options"].get(
            "dtop_p_scope") == "layer" and j == 0:
          layer_p = np.array([h["p_layer"] for h in tr])
          for i in range(layer_p.shape[1]):
            ax.plot([h["step"] for h in tr], layer_p[:, i],
                    color=colors[lab], lw=0.5, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("controller threshold p (thin: per layer)")
    legend_below(ax)
  paths.append(save(fig, os.path.join(out, "fanout.png")))

  # Per-layer fanout and per-token fanout std (last quarter of training).
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  width = 0.8 / len(routed)
  for i, lab in enumerate(routed):
    layer = np.array([r["tail"]["layer_fanout"] for r in seeds_of(lab)])
    x = np.arange(layer.shape[1]) + (i - (len(routed) - 1) / 2) * width
    axes[0].bar(x, layer.mean(0), width,
                yerr=layer.std(0, ddof=1) if len(layer) > 1 else None,
                color=colors[lab], label=lab, capsize=2)
  for t in targets:
    axes[0].axhline(t, color="k", ls="--", lw=1)
  axes[0].set_xlabel("MoE layer")
  axes[0].set_ylabel("mean experts per token (last 25% of steps)")
  legend_below(axes[0])
  for lab in routed:
    for j, r in enumerate(seeds_of(lab)):
      tr = [h for h in r["history"] if "fanout_std" in h and "loss" in h]
      axes[1].plot([h["step"] for h in tr], [h["fanout_std"] for h in tr],
                   color=colors[lab], lw=1, ls="-" if j == 0 else ":",
                   label=lab if j == 0 else None)
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("per-token fanout std (mean over layers)")
  legend_below(axes[1])
  paths.append(save(fig, os.path.join(out, "layer_fanout.png")))

  fig, ax = plt.subplots(figsize=(6, 3.6))
  stds = [mean_std([r["tail"].get("fanout_std") for r in seeds_of(lab)])
          for lab in routed]
  fans = [mean_std([r["tail"].get("experts_per_token") for r in seeds_of(lab)])
          for lab in routed]
  ax.bar(range(len(routed)), [s[0] for s in stds], yerr=[s[1] for s in stds],
         color=[colors[lab] for lab in routed], capsize=4)
  for i, f in enumerate(fans):
    ax.text(i, stds[i][0], f"mean {f[0]:.2f}", ha="center", va="bottom",
            fontsize=8)
  ax.set_xticks(range(len(routed)), routed, rotation=20, fontsize=8)
  ax.set_ylabel("per-token fanout std (last 25%)")
  paths.append(save(fig, os.path.join(out, "fanout_std.png")))

  with_params = [lab for lab in routed if seeds_of(lab)[0]["router_params"]]
  if with_params:
    names = sorted({n for lab in with_params
                    for n in seeds_of(lab)[0]["router_params"]})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.4),
                             squeeze=False)
    for k, name in enumerate(names):
      ax = axes[0, k]
      for lab in with_params:
        for j, r in enumerate(seeds_of(lab)):
          per_layer = r["router_params"].get(name, {})
          ax.plot(range(len(per_layer)), list(per_layer.values()), marker="o",
                  color=colors[lab], ls="-" if j == 0 else ":",
                  label=lab if j == 0 else None)
      ax.set_xlabel("MoE layer")
      ax.set_ylabel(f"learned {name} (end of training)")
      legend_below(ax)
    paths.append(save(fig, os.path.join(out, "router_params.png")))
  return paths


def main(argv):
  base = experiment.start(argv, OWN_FLAGS)
  try:
    specs = parse_runs(FLAGS.runs, flag_values=FLAGS, exclude=OWN_FLAGS)
  except ValueError as e:
    cli_app.fail(f"--runs: {e}")
  by_label = {s.label: s for s in specs}

  def run(label, seed):
    result = run_one(by_label[label], seed, base, FLAGS.workroot, FLAGS.band)
    s = result.get("settling", {})
    print(f"  eval loss {result['eval_loss']:.4f}, fanout "
          f"{result['tail'].get('experts_per_token', float('nan')):.3f}, "
          f"settle {s.get('settle_step')}, "
          f"{result['wall_seconds']:.0f} s", flush=True)
    return result

  results = experiment.run_grid(
      [s.label for s in specs], experiment.seeds_flag(),
      lambda label, seed: experiment.record_path(
          os.path.join(FLAGS.out, RECORDS), label, seed),
      run, train=not FLAGS.aggregate_only, keep_going=FLAGS.keep_going,
      error_record=lambda label, seed, message: {
          "label": label, "router": by_label[label].router, "seed": seed,
          "error": message})
  results.sort(key=lambda r: ([s.label for s in specs].index(r["label"]),
                              r["seed"]))
  rows = aggregate(results, specs, FLAGS.band, FLAGS.smooth_steps)
  table = markdown_table(rows, FLAGS.band, FLAGS.smooth_steps)
  experiment.save_json(os.path.join(FLAGS.out, "results.json"), {
      "rows": rows, "runs": [{k: v for k, v in r.items() if k != "history"}
                             for r in results], "argv": sys.argv}, indent=1)
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(table)
  print(table)
  if FLAGS.plots and any("error" not in r for r in results):
    for p in plot_all(results, specs, FLAGS.out):
      print("plot:", p)


if __name__ == "__main__":
  app.run(main)
