"""ProbMoE comparison: exact-k vs top-k (same k) vs dynamic-k, and fine-tuning
a trained top-k model with exact-k vs top-k.

Axis legend:
  G  groups (sequences) of one batch
  S  tokens in a group
  E  experts
  L  routed layers

  python experiments/probmoe_report.py --config=tiny --steps=120 --seeds=0,1 \
      --finetune_steps=60 --out=experiments/reports/probmoe --workroot=runs/probmoe

Every flag of `experiments/train_lm.py` is accepted (the base of every run).
From scratch, per seed, the runs of --runs (default: `top_k` (k, weights
renormalised, moejax's default), `top_k_unnorm` (k, softmax weights not
renormalised: the conventional OLMoE router, and the same gate scale as
ProbMoE's), `exact_k` (k), `dynamic_k` (k_min..k_max, default
[max(1, k - 1), k])). Then, per seed in --finetune_seeds, the finished
--finetune_source run (default top_k_unnorm) is copied (checkpoints only) into
`ft_LABEL` workdirs, one per label of --finetune_runs, that continue for
--finetune_steps more steps with that router (params and optimizer state are
compatible; the learning-rate schedule is the one of steps + finetune_steps for
every arm). A finished run is reused, an interrupted one resumes.

Per run, on --analysis_batches validation batches with the final params:
validation loss (the run's own final evaluation; and on these batches, with
the evaluation routing and with the training routing: sampled subsets and the
training capacity factor, `eval_mode_val_loss` / `train_mode_val_loss`), expert
utilisation of the
evaluation routing (top-k for top_k / exact_k, the MAP subset for dynamic_k)
and of the training routing (sampled subsets for exact_k / dynamic_k):
  load_entropy   entropy (nats) of the expert load (fraction of assignments),
                 per layer, mean over layers; the maximum is log E;
  cover99        experts needed to cover 99% of the routing mass (sum of the
                 combine weights per expert), per layer, mean over layers;
  token_cover99  per token, experts needed to cover 99% of softmax(logits),
                 mean over tokens and layers;
  max_load       largest expert load / mean load (1 = uniform);
  cover90, token_cover90   the same at 90%;
  router_entropy mean over tokens of the entropy (nats) of softmax(logits);
  fanout         mean experts per token.
Writes OUT/results.json, OUT/results.md and OUT/loss.png.
"""
from __future__ import annotations

import json
import os
import shutil

from absl import app, flags
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import experiment
from moejax.cli import app as cli_app
from moejax.cli import lm_flags
from moejax.data import get_lm_data
from moejax.experiment import format_values, parse_seeds
from moejax.models.lm import TransformerLM
from moejax.nn.moe import MoE, to_groups
from moejax.train.step import make_loss_fn

lm_flags.define_flags()
SHARED_FLAGS = experiment.define_flags(
    out="experiments/reports/probmoe", workroot="runs/probmoe",
    compile_cache="/tmp/jax_cache_probmoe",
    seeds_help="Seeds of the from-scratch runs.")
flags.DEFINE_string("finetune_seeds", "0,1", "Seeds of the fine-tuning runs "
                    "('' = none).")
flags.DEFINE_integer("finetune_steps", 60, "Steps after the top-k checkpoint.")
flags.DEFINE_string("runs", "top_k;top_k_unnorm=top_k,normalize=0;exact_k;"
                    "dynamic_k", "From-scratch runs separated by ';': "
                    "[LABEL=]ROUTER[,FLAG=VALUE...] (flags of "
                    "experiments/train_lm.py).")
flags.DEFINE_string("finetune_source", "top_k_unnorm", "Label of the run whose "
                    "final checkpoint the fine-tuning runs start from.")
flags.DEFINE_string("finetune_runs", "top_k_unnorm;exact_k", "Labels (from "
                    "--runs) continued from the source checkpoint.")
flags.DEFINE_integer("finetune_source_seed", None, "Seed of the one source "
                     "run that every fine-tuning seed starts from (default: "
                     "each fine-tuning seed continues its own seed's run; "
                     "with one source, the seeds differ in data order).")
flags.DEFINE_string("finetune_dataset", None, "Dataset of the fine-tuning runs "
                    "and their evaluation (default: --dataset), e.g. "
                    "text:GLOB for a shift of domain after pretraining.")
flags.DEFINE_integer("dyn_k_min", None, "dynamic_k k_min (default max(1, k-1)).")
flags.DEFINE_integer("dyn_k_max", None, "dynamic_k k_max (default k).")
flags.DEFINE_integer("analysis_batches", 4, "Validation batches of the "
                     "utilisation analysis.")
flags.DEFINE_bool("reanalyse", False, "Train nothing: recompute the "
                  "utilisation of every finished run from its last checkpoint.")
FLAGS = flags.FLAGS
OWN = SHARED_FLAGS + ("finetune_seeds", "finetune_steps", "runs",
                      "finetune_source", "finetune_runs", "finetune_dataset",
                      "finetune_source_seed", "reanalyse",
                      "dyn_k_min", "dyn_k_max", "analysis_batches")


def coverage(mass: np.ndarray, frac: float = 0.99) -> np.ndarray:
  """Experts needed to cover `frac` of the mass. mass [..., E] -> [...]."""
  sorted_mass = -np.sort(-mass, axis=-1)
  cum = np.cumsum(sorted_mass, axis=-1)
  total = cum[..., -1:]
  return 1 + np.sum(cum < frac * total - 1e-12, axis=-1)


def layer_logits(model, params, router_state, inputs):
  """Router logits of every MoE layer: list of float32[G, S, E]."""
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, MoE) and context.method_name == "__call__":
      cfg = context.module.config
      kernel = nn.meta.unbox(context.module.variables["params"]["router"])
      groups = to_groups(args[0], cfg.group_size).astype(jnp.float32)
      captured.append(jnp.einsum("gsd,de->gse", groups,
                                 kernel.astype(jnp.float32)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params, "router_state": router_state}, inputs,
                train=False, mutable=["router"])
  return captured


def utilisation(gates: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """gates, probs float[T, E] of one layer (T tokens)."""
  routed = gates != 0
  counts = routed.sum(0).astype(np.float64)
  load = counts / max(counts.sum(), 1.0)
  nz = load[load > 0]
  safe = np.maximum(probs, 1e-30)
  return {"load_entropy": float(-np.sum(nz * np.log(nz))),
          "max_load": float(load.max() * len(load)),  # 1 = uniform
          "cover99": float(coverage(gates.sum(0))),
          "cover90": float(coverage(gates.sum(0), 0.9)),
          "token_cover99": float(np.mean(coverage(probs))),
          "token_cover90": float(np.mean(coverage(probs, 0.9))),
          "router_entropy": float(np.mean(-np.sum(probs * np.log(safe), -1))),
          "fanout": float(routed.sum(1).mean())}


def analyse(cfg, state, num_batches: int, seed: int) -> dict[str, float]:
  """Utilisation of eval (deterministic) and train (sampled) routing."""
  model = TransformerLM(cfg.model)
  method = cfg.model.moe.router
  data = get_lm_data(cfg.dataset, seq_len=cfg.seq_len,
                     batch_size=cfg.batch_size, seed=cfg.seed,
                     data_dir=cfg.data_dir)
  params = jax.device_get(state.params)
  router_state = jax.device_get(state.router_state)

  @jax.jit
  def route(inputs, key):
    out = []
    for i, logits in enumerate(layer_logits(model, params, router_state,
                                            inputs)):
      ev = method.route_groups(logits, {}, rng=None, train=False)
      tr = method.route_groups(logits, {}, rng=jax.random.fold_in(key, i),
                               train=True) if method.uses_rng else ev
      num_experts = logits.shape[-1]
      out.append((jax.nn.softmax(logits).reshape(-1, num_experts),
                  ev.routing.gates.reshape(-1, num_experts),
                  tr.routing.gates.reshape(-1, num_experts)))
    return out

  losses = {mode: make_loss_fn(model, train=(mode == "train"))
            for mode in ("eval", "train")}

  @jax.jit
  def ce_sums(batch, key):
    return {mode: fn(params, router_state, batch, key)[1][2:4]
            for mode, fn in losses.items()}

  per = {"eval": [], "train": []}
  ce = {"eval": [0.0, 0.0], "train": [0.0, 0.0]}
  key = jax.random.PRNGKey(seed + 1234)
  layers = None
  for b, batch in enumerate(data.eval_batches(num_batches)):
    for mode, (total, count) in jax.device_get(ce_sums(
        {k: jnp.asarray(v) for k, v in batch.items()},
        jax.random.fold_in(key, 10_000 + b))).items():
      ce[mode][0] += float(total)
      ce[mode][1] += float(count)
    res = jax.device_get(route(jnp.asarray(batch["inputs"]),
                               jax.random.fold_in(key, b)))
    if layers is None:
      layers = [[[], [], []] for _ in res]
    for acc, arrays in zip(layers, res):
      for lst, arr in zip(acc, arrays):
        lst.append(np.asarray(arr))
  for probs, ev, tr in layers:
    probs, ev, tr = (np.concatenate(x) for x in (probs, ev, tr))
    per["eval"].append(utilisation(ev, probs))
    per["train"].append(utilisation(tr, probs))
  out = {}
  for mode, rows in per.items():
    for key_ in rows[0]:
      out[f"{mode}_{key_}"] = float(np.mean([r[key_] for r in rows]))
  for mode, (total, count) in ce.items():
    out[f"{mode}_mode_val_loss"] = total / max(count, 1.0)
  out["num_experts"] = int(cfg.model.moe.num_experts)
  return out


def reanalyse(cfg, workdir, seed):
  """Utilisation of a finished run from its latest checkpoint."""
  from moejax import sharding
  from moejax.train.checkpoint import Checkpointer
  from moejax.train.loop import build_state
  model = TransformerLM(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  with mesh:
    state = build_state(cfg, model, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state = ckpt.restore(state, ckpt.latest_step())
    ckpt.close()
  return analyse(cfg, state, FLAGS.analysis_batches, seed)


def run_one(label, values, workdir, source=None):
  """Trains (or reuses) one run; returns its record."""
  cfg = lm_flags.build_train_config(values)
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done):
    with open(done) as fh:
      record = json.load(fh)
    if FLAGS.reanalyse:
      record.update(reanalyse(cfg, workdir, values["seed"]))
      with open(done, "w") as fh:
        json.dump(record, fh)
      print(f"[{label}] reanalysed {workdir}")
    else:
      print(f"[{label}] reused {workdir}")
    return record
  if FLAGS.reanalyse:
    raise FileNotFoundError(f"{done}: run not finished (--reanalyse)")
  if source is not None and not os.path.exists(workdir):
    os.makedirs(workdir)
    shutil.copytree(os.path.join(source, "checkpoints"),
                    os.path.join(workdir, "checkpoints"))
  run = experiment.train_record(cfg, workdir)
  summary, wall = run.summary, run.wall_seconds
  logged = [r for r in run.log if "loss" in r and "experts_per_token" in r]
  tail = logged[-max(1, len(logged) // 4):]
  record = {
      "label": label, "router": values["router"], "seed": values["seed"],
      "steps": cfg.steps, "eval_loss": summary["eval_loss"],
      "resumed_from": summary["resumed_from"], "wall_s": wall,
      "train_fanout_last25": float(np.mean([r["experts_per_token"]
                                            for r in tail])),
      "train_loss_last25": float(np.mean([r["loss"] for r in tail])),
      "k": cfg.model.moe.router.k,
      "method": repr(cfg.model.moe.router),
      **analyse(cfg, summary["state"], FLAGS.analysis_batches,
                values["seed"]),
      "history": run.history(("step", "loss", "eval_loss",
                              "experts_per_token"), fill=True),
  }
  with open(done, "w") as fh:
    json.dump(record, fh)
  print(f"[{label}] eval_loss {record['eval_loss']:.4f} in {wall:.0f} s")
  return record


def keep_other_seeds(path, records, steps):
  """`records` plus those of an existing results.json at the same `steps`
  whose (label, seed) this invocation did not run (a new seed adds to the
  table instead of replacing it); sorted by label order, then seed."""
  if not os.path.exists(path):
    return records
  with open(path) as fh:
    old = json.load(fh)
  if old.get("steps") != steps:
    return records
  ran = {(r["label"], r["seed"]) for r in records}
  kept = [r for r in old.get("records", [])
          if (r["label"], r["seed"]) not in ran]
  merged = kept + records
  order = list(dict.fromkeys(r["label"] for r in merged))
  return sorted(merged, key=lambda r: (order.index(r["label"]), r["seed"]))


def table(records, labels, columns):
  lines = []
  for label in labels:
    rows = [r for r in records if r["label"] == label]
    if not rows:
      continue
    cells = []
    for _, keys, fmt in columns:
      parts = []
      for key in (keys if isinstance(keys, tuple) else (keys,)):
        vals = [r.get(key) for r in rows]
        if fmt == "loss":
          parts.append(format_values(vals, ".4f"))
        else:
          vals = [v for v in vals if v is not None]
          parts.append(f"{np.mean(vals):.2f}" if vals else "–")
      cells.append(" / ".join(parts))
    lines.append([label, ",".join(str(r["seed"]) for r in rows), *cells])
  return experiment.markdown_table(["run", "seeds", *(c[0] for c in columns)],
                                   lines)


def paired_table(records, pairs):
  """Same-seed differences of the validation loss, run − reference."""
  loss = lambda label: experiment.by_seed(
      [r for r in records if r["label"] == label], "eval_loss")
  return ("Paired validation-loss differences (same seed, nats/byte):\n\n"
          + experiment.paired_table([(f"{label} − {ref}", loss(ref),
                                      loss(label)) for label, ref in pairs],
                                    first="runs"))


def main(argv):
  base = experiment.start(argv, OWN)
  k = lm_flags.build_train_config({**base, "router": "top_k"}).model.moe.router.k
  k_max = FLAGS.dyn_k_max or k
  k_min = FLAGS.dyn_k_min or max(1, k_max - 1)
  steps = lm_flags.build_train_config({**base, "router": "top_k"}).steps
  seeds = experiment.seeds_flag()
  ft_seeds = parse_seeds(FLAGS.finetune_seeds)
  try:  # {label: flag values}
    runs = {r.label: {"router": r.router, **r.options}
            for r in experiment.parse_runs(FLAGS.runs, flag_values=FLAGS,
                                           exclude=OWN, label_from="router")}
  except ValueError as e:
    cli_app.fail(f"--runs: {e}")

  def values_of(label, seed, **over):
    values = {**base, "seed": seed, "k": k, **runs[label], **over}
    if values["router"] == "dynamic_k":
      values.setdefault("k_min", k_min)
      values.setdefault("k_max", k_max)
      values["k"] = values["k_max"]
    return values

  records = []
  for seed in seeds:
    for label in runs:
      records.append(run_one(label, values_of(label, seed), experiment.workdir(
          FLAGS.workroot, label, seed)))
  src = FLAGS.finetune_source
  for seed in ft_seeds:
    src_seed = (seed if FLAGS.finetune_source_seed is None
                else FLAGS.finetune_source_seed)
    source = experiment.workdir(FLAGS.workroot, src, src_seed)
    if (src, src_seed) not in {(r["label"], r["seed"]) for r in records}:
      records.append(run_one(src, values_of(src, src_seed), source))
    for label in filter(None, FLAGS.finetune_runs.split(";")):
      shift = ({"dataset": FLAGS.finetune_dataset} if FLAGS.finetune_dataset
               else {})
      values = values_of(label, seed, steps=steps + FLAGS.finetune_steps,
                         **shift)
      records.append(run_one(f"ft_{label}", values, experiment.workdir(
          FLAGS.workroot, f"ft_{label}", seed), source=source))
  records = keep_other_seeds(os.path.join(FLAGS.out, "results.json"), records,
                             steps)
  experiment.save_json(os.path.join(FLAGS.out, "results.json"), {
      "k": k, "k_min": k_min, "k_max": k_max, "steps": steps,
      "finetune_steps": FLAGS.finetune_steps, "config": FLAGS.config,
      "finetune_dataset": FLAGS.finetune_dataset,
      "finetune_source_seed": FLAGS.finetune_source_seed,
      "records": records}, indent=1)
  loss_cols = [
      ("val. loss", "eval_loss", "loss"),
      ("val. loss, first batches: eval / train routing",
       ("eval_mode_val_loss", "train_mode_val_loss"), "loss"),
      ("train loss (last 25%)", "train_loss_last25", "loss"),
      ("train fanout (last 25%)", "train_fanout_last25", "f"),
      ("eval fanout", "eval_fanout", "f")]
  util_cols = [
      ("load entropy eval / train", ("eval_load_entropy",
                                     "train_load_entropy"), "f"),
      ("max load eval / train", ("eval_max_load", "train_max_load"), "f"),
      ("experts for 99% mass eval / train", ("eval_cover99", "train_cover99"),
       "f"),
      ("experts for 90% mass eval / train", ("eval_cover90", "train_cover90"),
       "f"),
      ("experts for 99% / 90% of a token's softmax",
       ("eval_token_cover99", "eval_token_cover90"), "f"),
      ("router entropy", "eval_router_entropy", "f")]
  ft_labels = [src] + [f"ft_{l}" for l in FLAGS.finetune_runs.split(";") if l]
  md = [f"From scratch ({steps} steps, k = {k}, dynamic-k range "
        f"[{k_min}, {k_max}]); loss = CE, nats/byte; mean ± std over seeds.",
        "", table(records, list(runs), loss_cols), "",
        table(records, list(runs), util_cols), "",
        f"Fine-tuning: the {src} checkpoint at step {steps}, then "
        f"{FLAGS.finetune_steps} more steps" + (
            f" on `{FLAGS.finetune_dataset}` (validation loss on its "
            "held-out part)." if FLAGS.finetune_dataset else "."), "",
        table(records, ft_labels, loss_cols), "",
        table(records, ft_labels, util_cols), "",
        paired_table(records, [(l, ref) for ref in dict.fromkeys(
            ("top_k", src)) for l in runs if l not in ("top_k", src)]
                     + [(f"ft_{l}", f"ft_{src}") for l in
                        FLAGS.finetune_runs.split(";") if l and l != src])]
  with open(os.path.join(FLAGS.out, "results.md"), "w") as fh:
    fh.write("\n".join(md) + "\n")
  print("\n".join(md))
  plot(records, os.path.join(FLAGS.out, "loss.png"))


def plot(records, path):
  from moejax.experiment.plots import pyplot, save
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {"top_k": "C0", "exact_k": "C1", "dynamic_k": "C2",
            "top_k_unnorm": "C3", "ft_top_k_unnorm": "C3", "ft_exact_k": "C1"}
  for r in records:
    hist = [h for h in r["history"] if h.get("loss") is not None]
    ax = axes[1] if r["label"].startswith("ft_") else axes[0]
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist],
            color=colors.get(r["label"], "k"), alpha=0.7,
            ls="-" if r["seed"] == 0 else "--",
            label=f"{r['label']} s{r['seed']}")
  axes[0].set_title("from scratch: training loss")
  axes[1].set_title(f"fine-tuning from {FLAGS.finetune_source}: training loss")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("CE (nats/byte)")
    ax.legend(fontsize=7)
  save(fig, path, dpi=100)


if __name__ == "__main__":
  app.run(main)
