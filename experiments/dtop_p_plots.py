"""Extra figures of experiments/reports/dtop_p.md from the saved run JSONs.

  python experiments/dtop_p_plots.py --report=experiments/reports/dtop_p

Reads `REPORT/{main,variants,long}/runs/*.json` (written by
`experiments/compare_routers.py`) and writes `REPORT/controller_small.png`:
(a) the mean fanout of the first 300 steps (per step and 50-step mean) from
p_init 0.5 and 0.9, (b) a window of the 2000-step run where the gains
kp 0.5 / ki 0.2 ring once p ~ 0.9, (c) the per-layer p of the layer scope;
each panel's legend under it. Prints the numbers quoted in the report.

Axis legend:
  L  routed layers
"""
from __future__ import annotations

import os

from absl import app, flags

from moejax import experiment
from moejax.experiment.plots import pyplot, save
from moejax.train.metrics import legend_below

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flag (defined when it runs, not when a test imports it)."""
  flags.DEFINE_string("report", "experiments/reports/dtop_p",
                      "Report directory.")


def load(directory):
  """{(label, seed): record} of the finished runs recorded in `directory`."""
  return {(r["label"], r["seed"]): r for r in experiment.load_records(directory)
          if "error" not in r}


def series(run, key):
  return experiment.plots.series(run["history"], key)


def moving(values, w):
  return [sum(values[i - w + 1:i + 1]) / w for i in range(w - 1, len(values))]


def main(argv):
  del argv
  rep = FLAGS.report
  runs = {}
  for sub in ("main", "variants", "long"):
    runs.update(load(os.path.join(rep, sub, "runs")))
  print("plot:", save(controller_figure(runs),
                      os.path.join(rep, "controller_small.png")))


def controller_figure(runs):
  """The three panels (module docstring) of {(label, seed): record}."""
  import numpy as np
  plt = pyplot()
  target = 4.0
  fig, axes = plt.subplots(1, 3, figsize=(16, 5))
  ax = axes[0]
  for (label, color) in (("dtop_p_global", "C4"), ("dtop_p_pinit0.9", "C1")):
    for seed in (0, 1):
      if (label, seed) not in runs:
        continue
      steps, fan = series(runs[(label, seed)], "experts_per_token")
      keep = [i for i, s in enumerate(steps) if s <= 300]
      ax.plot([steps[i] for i in keep], [fan[i] for i in keep], color=color,
              lw=0.6, alpha=0.4)
      ma = moving(fan, 10)
      ax.plot([s for s in steps[9:] if s <= 300],
              [m for s, m in zip(steps[9:], ma) if s <= 300], color=color,
              lw=1.8, ls="-" if seed == 0 else ":",
              label=f"{label.replace('dtop_p_global', 'p_init 0.5')} "
                    f"s{seed} (50-step mean)")
      first = next((s for s, f in zip(steps, fan) if abs(f - target) <= 0.08),
                   None)
      print(f"{label} seed {seed}: first step within ±2% {first}; "
            f"fanout at step 5 {fan[0]:.2f}")
  ax.axhline(target, color="k", ls="--", lw=1)
  ax.axhspan(target * 0.98, target * 1.02, color="k", alpha=0.08)
  ax.set_xlabel("step")
  ax.set_ylabel("mean experts per token (thin: per step)")
  ax.set_title("(a) settling, small config, kp 0.5 / ki 0.2")
  legend_below(ax, ncol=2)

  ax = axes[1]
  run = runs.get(("dtop_p_2000", 1))
  if run is not None:
    steps, fan = series(run, "experts_per_token")
    _, ps = series(run, "p")
    keep = [i for i, s in enumerate(steps) if 500 <= s <= 1300]
    ax.plot([steps[i] for i in keep], [fan[i] for i in keep], color="C4",
            lw=0.8, label="mean fanout (every 5th step)")
    ax.axhline(target, color="k", ls="--", lw=1)
    ax.set_ylabel("mean experts per token")
    ax2 = ax.twinx()
    ax2.plot([steps[i] for i in keep], [ps[i] for i in keep], color="C3",
             lw=0.8, label="p")
    ax2.set_ylabel("p", color="C3")
    legend_below(ax, ax2)
    sd = lambda lo, hi: np.std([f for s, f in zip(steps, fan) if lo < s <= hi])
    print(f"dtop_p_2000 seed 1: step-to-step sd of the fanout, steps 300-600 "
          f"{sd(300, 600):.3f}, 1000-1300 {sd(1000, 1300):.3f}, "
          f"1700-2000 {sd(1700, 2000):.3f}; p at 600 / 1000 "
          f"{ps[steps.index(600)]:.3f} / {ps[steps.index(1000)]:.3f}")
  ax.set_xlabel("step")
  ax.set_title("(b) 2000 steps, seed 1: period-2 ringing once p ~ 0.9")

  ax = axes[2]
  for seed, ls in ((0, "-"), (1, ":")):
    run = runs.get(("dtop_p_layer", seed))
    if run is None:
      continue
    steps, pl = series(run, "p_layer")
    pl = np.array(pl)
    for i in range(pl.shape[1]):
      ax.plot(steps, pl[:, i], color=plt.cm.viridis(i / pl.shape[1]), ls=ls,
              lw=0.8, label=f"layer {i}" if seed == 0 else None)
  ax.set_xlabel("step")
  ax.set_ylabel("p of each layer")
  ax.set_title("(c) layer scope: deep layers reach p ~ 0.9 and ring")
  legend_below(ax)
  return fig


if __name__ == "__main__":
  define_flags()
  app.run(main)
