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
registered in this version of moejax are listed as not run. `--deadline_s`
skips the runs that would start after that many seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from moejax.cli import dit_flags  # noqa: E402

dit_flags.define_flags()
flags.DEFINE_string("routers", "top_k,top_p:0.3,dtop_p,dense",
                    "Comma-separated routers; top_p:P sets p.")
flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
flags.DEFINE_string("out", "experiments/reports/dit", "Results directory.")
flags.DEFINE_string("workroot", "runs/dit_compare", "Run workdirs go here.")
flags.DEFINE_float("deadline_s", None, "Skip runs starting after this many "
                   "seconds (None = no limit).")
flags.DEFINE_string("compilation_cache", None, "JAX persistent compilation "
                    "cache directory (seeds of one router share compiles).")
flags.FLAGS.set_default("timestep_buckets", 8)

KEYS = ("eval_loss", "eval_loss_by_t", "eval_fanout_by_t",
        "eval_layer_fanout_by_t", "eval_experts_per_token", "eval_fanout_std",
        "eval_drop_fraction", "eval_max_vio", "class_accuracy",
        "class_accuracy_per_class", "frechet", "real_frechet",
        "classifier_val_accuracy", "train_seconds", "images_per_s",
        "target_fanout", "sample_seconds")


def parse_router(spec: str) -> tuple[str, dict]:
  name, _, p = spec.partition(":")
  return name, ({"p": float(p)} if p else {})


def run_label(spec: str) -> str:
  return spec.replace(":", "_p")


def train_record(metrics_path: str) -> dict:
  """Last training record (controller state metrics such as p live there)."""
  last = {}
  with open(metrics_path) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        last = r
  return last


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  values = flags.FLAGS.flag_values_dict()
  if values["compilation_cache"]:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", values["compilation_cache"])
    for key, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                       ("jax_persistent_cache_min_entry_size_bytes", -1)):
      try:
        jax.config.update(key, value)
      except (AttributeError, KeyError, ValueError):  # older/newer jax
        pass
  from moejax import routing  # pylint: disable=g-import-not-at-top
  from moejax.train.loop import train as train_dit  # pylint: disable=g-import-not-at-top

  os.makedirs(values["out"], exist_ok=True)
  results_path = os.path.join(values["out"], "dit_results.json")
  results = []
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  done = {(r["spec"], r["seed"]) for r in results}
  specs = [s.strip() for s in values["routers"].split(",") if s.strip()]
  seeds = [int(s) for s in values["seeds"].split(",") if s.strip()]
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
      run_values["workdir"] = os.path.join(values["workroot"],
                                           f"{run_label(spec)}_s{seed}")
      cfg = dit_flags.build_dit_train_config(run_values)
      t0 = time.perf_counter()
      summary = train_dit(cfg, run_values["workdir"])
      record = {"spec": spec, "router": name, "seed": seed,
                "steps": cfg.steps, "wall_seconds": time.perf_counter() - t0,
                **{k: summary[k] for k in KEYS if k in summary}}
      last = train_record(summary["metrics"])
      for key in ("p", "p_mean", "gamma", "experts_per_token", "fanout_std"):
        if key in last:
          record[f"train_{key}"] = last[key]
      results.append(record)
      with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
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


def _mean_std(xs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  xs = [x for x in xs if x is not None]
  if not xs:
    return "n/a"
  if len(xs) == 1:
    return f"{xs[0]:.4g}"
  return f"{np.mean(xs):.4g} ± {np.std(xs, ddof=1):.2g}"


def make_table(results, specs) -> str:
  """Markdown: mean ± std over seeds per router."""
  rows = ["| router | seeds | val. denoising loss | experts/token | "
          "fanout std (tokens) | class acc. of samples | Fréchet (feat.) | "
          "drop frac. | images/s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for spec in specs:
    rs = [r for r in results if r["spec"] == spec]
    if not rs:
      continue
    col = lambda k: _mean_std([r.get(k) for r in rs])
    rows.append(
        f"| {spec} | {','.join(str(r['seed']) for r in rs)} | "
        f"{col('eval_loss')} | {col('eval_experts_per_token')} | "
        f"{col('eval_fanout_std')} | {col('class_accuracy')} | "
        f"{col('frechet')} | {col('eval_drop_fraction')} | "
        f"{col('images_per_s')} |")
  rows.append("")
  rows.append("Fanout (experts per token, validation) by timestep bucket, "
              "low t (clean) -> high t (noise), mean over seeds:")
  rows.append("")
  for spec in specs:
    rs = [r for r in results if r["spec"] == spec and "eval_fanout_by_t" in r]
    if rs:
      import numpy as np  # pylint: disable=g-import-not-at-top
      m = np.mean([r["eval_fanout_by_t"] for r in rs], axis=0)
      rows.append(f"- {spec}: " + " ".join(f"{v:.3f}" for v in m))
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
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
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
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
