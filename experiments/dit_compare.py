"""Routers on the class-conditional DiT: top-k vs fixed top-p vs DTop-p vs dense.

  python experiments/dit_compare.py --config=tiny --steps=300 \
      --routers=top_k,top_p:0.3,dtop_p,dense --seeds=0,1

Every run is `experiments/train_dit.py` with the same flags (`--k` is top-k's k
and the target mean fanout of DTop-p; `top_p:P` is fixed top-p with p = P; the
dense model's MLP has the active FLOPs of top-k). Runs go seed by seed (all
routers of seed 0 first), results are appended to OUT/dit_results.json after
every run (a rerun skips the runs already there), and at the end OUT gets a
markdown table (dit_table.md), the fanout-by-timestep plot (dit_fanout_by_t.png)
and each router's seed-0 sample grid (dit_samples_<router>.png). Routers not
registered in this version of moejax are listed as not run. Each run's record
with its logged training history is also written to OUT/records/LABEL_sSEED.json.
`--deadline_s`
skips the runs that would start after that many seconds.
"""
from __future__ import annotations

import os
import shutil
import time

from absl import app, flags, logging

from moejax import experiment
from moejax.cli import dit_flags
from moejax.experiment import format_values

dit_flags.define_flags()
experiment.define_flags(out="experiments/reports/dit",
                        workroot="runs/dit_compare",
                        compile_cache_name="compilation_cache")
flags.DEFINE_string("routers", "top_k,top_p:0.3,dtop_p,dense",
                    "Comma-separated routers; top_p:P sets p.")
flags.DEFINE_float("deadline_s", None, "Skip runs starting after this many "
                   "seconds (None = no limit).")
flags.FLAGS.set_default("timestep_buckets", 8)

KEYS = ("eval_loss", "eval_loss_by_t", "eval_fanout_by_t",
        "eval_layer_fanout_by_t", "eval_experts_per_token", "eval_fanout_std",
        "eval_drop_fraction", "eval_max_vio", "class_accuracy",
        "class_accuracy_per_class", "frechet", "real_frechet",
        "classifier_val_accuracy", "train_seconds", "images_per_s",
        "target_fanout", "sample_seconds")

# Per-run JSONs (the record above plus the logged training history) under
# OUT/records/, tracked by git.
RECORDS = "records"
HISTORY_KEYS = ("step", "loss", "eval_loss", "experts_per_token", "fanout_std",
                "drop_fraction", "max_vio", "layer_fanout", "p", "p_mean",
                "gamma")


def parse_router(spec: str) -> tuple[str, dict]:
  name, _, p = spec.partition(":")
  return name, ({"p": float(p)} if p else {})


def run_label(spec: str) -> str:
  return spec.replace(":", "_p")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  values = flags.FLAGS.flag_values_dict()
  experiment.use_compile_cache(values["compilation_cache"])
  from moejax import routing  # pylint: disable=g-import-not-at-top

  os.makedirs(values["out"], exist_ok=True)
  results_path = os.path.join(values["out"], "dit_results.json")
  results = (experiment.load_json(results_path)
             if os.path.exists(results_path) else [])
  done = {(r["spec"], r["seed"]) for r in results}
  specs = [s.strip() for s in values["routers"].split(",") if s.strip()]
  seeds = experiment.seeds_flag()
  not_run = []
  t_start = time.perf_counter()
  for seed in seeds:
    for spec in specs:
      name, extra = parse_router(spec)
      if name != "dense" and name not in routing.available():
        not_run.append(f"{spec} (router not registered)")
        continue
      if (spec, seed) in done:
        continue
      elapsed = time.perf_counter() - t_start
      if values["deadline_s"] and elapsed > values["deadline_s"]:
        not_run.append(f"{spec} seed {seed} (deadline)")
        continue
      run_values = dict(values, router=name, seed=seed, **extra)
      run_values["workdir"] = experiment.workdir(values["workroot"],
                                                 run_label(spec), seed)
      cfg = dit_flags.build_dit_train_config(run_values)
      run = experiment.train_record(cfg, run_values["workdir"])
      summary = run.summary
      record = {"spec": spec, "router": name, "seed": seed,
                "steps": cfg.steps, "wall_seconds": run.wall_seconds,
                **{k: summary[k] for k in KEYS if k in summary}}
      # The training records (those with a loss); the last one holds the
      # controller state metrics such as p.
      history = [r for r in run.log if "loss" in r] or [{}]
      last = history[-1]
      for key in ("p", "p_mean", "gamma", "experts_per_token", "fanout_std"):
        if key in last:
          record[f"train_{key}"] = last[key]
      # Training-capacity drops and balance, last 25% of the logged steps.
      for key in ("drop_fraction", "max_vio"):
        value = experiment.tail_mean(history, key, round_up=False)
        if value is not None:
          record[f"train_{key}_last25"] = value
      results.append(record)
      experiment.save_json(results_path, results, indent=1)
      experiment.save_json(
          experiment.record_path(os.path.join(values["out"], RECORDS),
                                 run_label(spec), seed),
          dict(record, history=experiment.history(history, HISTORY_KEYS)))
      if seed == seeds[0] and summary.get("samples_overview"):
        shutil.copy(summary["samples_overview"], os.path.join(
            values["out"], f"dit_samples_{run_label(spec)}.png"))
      print(f"{spec} seed {seed}: eval_loss {record['eval_loss']:.4f} "
            f"fanout {record.get('eval_experts_per_token', float('nan')):.3f} "
            f"acc {record.get('class_accuracy', float('nan')):.3f} "
            f"frechet {record.get('frechet', float('nan')):.3f} "
            f"({record['wall_seconds']:.0f} s)", flush=True)
  specs = specs + [s for s in dict.fromkeys(r["spec"] for r in results)
                   if s not in specs]  # earlier invocations' runs too
  table = make_table(results, specs)
  with open(os.path.join(values["out"], "dit_table.md"), "w") as f:
    f.write(table + "\n")
    if not_run:
      f.write("\nNot run: " + "; ".join(sorted(set(not_run))) + "\n")
  plot_fanout(results, specs, os.path.join(values["out"],
                                           "dit_fanout_by_t.png"))
  print(table)
  if not_run:
    print("not run:", "; ".join(sorted(set(not_run))))


def make_table(results, specs) -> str:
  """Markdown: mean ± std over seeds per router."""
  cells = []
  for spec in specs:
    rs = [r for r in results if r["spec"] == spec]
    if rs:
      cells.append([spec, ",".join(str(r["seed"]) for r in rs)] + [
          format_values([r.get(k) for r in rs], ".4g", ".2g", missing="n/a")
          for k in ("eval_loss", "eval_experts_per_token", "eval_fanout_std",
                    "class_accuracy", "frechet", "eval_drop_fraction",
                    "images_per_s")])
  rows = [experiment.markdown_table(
      ["router", "seeds", "val. denoising loss", "experts/token",
       "fanout std (tokens)", "class acc. of samples", "Fréchet (feat.)",
       "drop frac.", "images/s"], cells), ""]
  rows.append("Fanout (experts per token, validation) by timestep bucket, "
              "low t (clean) -> high t (noise), mean over seeds:")
  rows.append("")
  for spec in specs:
    rs = [r for r in results if r["spec"] == spec and "eval_fanout_by_t" in r]
    if rs:
      import numpy as np  # pylint: disable=g-import-not-at-top
      m = np.mean([r["eval_fanout_by_t"] for r in rs], axis=0)
      rows.append(f"- {spec}: " + " ".join(f"{v:.3f}" for v in m))
  ref = specs[0] if specs else None
  paired = []
  for spec in specs[1:]:
    d = experiment.paired_delta(
        experiment.by_seed([r for r in results if r["spec"] == ref],
                           "eval_loss"),
        experiment.by_seed([r for r in results if r["spec"] == spec],
                           "eval_loss"))
    if d["seeds"]:
      paired.append([f"{spec} − {ref}", ",".join(map(str, d["seeds"])),
                     " / ".join(f"{x:+.4f}" for x in d["deltas"]),
                     f"{d['mean']:+.4f} ± {d['std'] or 0.0:.4f}"])
  if paired:
    rows += ["", "Paired validation-loss differences (same seed):", "",
             experiment.markdown_table(["runs", "seeds", "per seed",
                                        "mean ± std"], paired)]
  rows.append("")
  rows.append("Validation loss by timestep bucket, mean over seeds:")
  rows.append("")
  for spec in specs:
    rs = [r for r in results if r["spec"] == spec]
    if rs:
      import numpy as np  # pylint: disable=g-import-not-at-top
      m = np.mean([r["eval_loss_by_t"] for r in rs], axis=0)
      rows.append(f"- {spec}: " + " ".join(f"{v:.4f}" for v in m))
  return "\n".join(rows)


def plot_fanout(results, specs, path) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from moejax.experiment.plots import pyplot, save
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for spec in specs:
    rs = [r for r in results if r["spec"] == spec]
    if not rs:
      continue
    loss = np.mean([r["eval_loss_by_t"] for r in rs], axis=0)
    x = (np.arange(len(loss)) + 0.5) / len(loss)
    axes[1].plot(x, loss, "o-", label=spec)
    if "eval_fanout_by_t" in rs[0]:
      fan = np.array([r["eval_fanout_by_t"] for r in rs])
      axes[0].errorbar(x, fan.mean(0), yerr=fan.std(0) if len(rs) > 1 else None,
                       marker="o", capsize=2, label=spec)
  axes[0].set_xlabel("t / T (1 = pure noise)")
  axes[0].set_ylabel("experts per token (validation)")
  axes[0].legend()
  axes[1].set_xlabel("t / T (1 = pure noise)")
  axes[1].set_ylabel("validation denoising loss")
  axes[1].set_yscale("log")
  axes[1].legend()
  save(fig, path, dpi=100)


if __name__ == "__main__":
  app.run(main)
