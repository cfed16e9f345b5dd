"""Balance without aux losses: token choice (aux / loss-free), expert choice
(small / large pool) and Expert Threshold, with causal-vs-training evaluations.

  python experiments/compare_balance.py --config=tiny --steps=300 --seeds=0,1 \
      --out=experiments/reports/balance --workroot=runs/balance

Every flag of `experiments/train_lm.py` is accepted and is the base of every
run (this script sets `--num_shared=1`, `--eval_capacity_factor=E/k` so that
evaluation never drops, and `--et_warmup_steps=steps/10` unless given).
`--runs` lists `LABEL=ROUTER[,FLAG=VALUE...]` specs separated by ';'; the value
`BATCH` stands for batch_size * seq_len (one routing group = the whole batch).

Per (run, seed) the script trains (or resumes) in `WORKROOT/LABEL_sSEED`, then
evaluates the final state on `--eval_batches` validation batches:
  eval           the method's own evaluation routing (ET: frozen thresholds,
                 causal; expert choice: its pool, not causal; top-k: causal)
  eval_train     ET only: the training routing (capacity-bounded over the
                 validation batch as pool, thresholds frozen)
  eval_causal    expert choice only: each token routed alone by per-expert
                 probability thresholds calibrated on `--calib_batches` unseen
                 training batches (the mean of expert choice's cutoffs there)
and records MaxVio, drop fraction, fanout (mean, by token position) and, from
the training log, MaxVio over training and how often ET's bounds bind.
`--mode=report` only aggregates `OUT/records/*.json` into `OUT/results.json`,
`OUT/results.md` and PNG plots; `--mode=train` only trains and evaluates.

Axis legend:
  B  batch      L  sequence length (token position)
  G  groups     S  tokens in a group      E  experts
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import app, flags

from moejax import experiment
from moejax.cli import app as cli_app
from moejax.cli import lm_flags
from moejax.experiment import format_ms, mean_std
from moejax.experiment.tables import markdown_table

lm_flags.define_flags()
SHARED_FLAGS = experiment.define_flags(out="experiments/reports/balance",
                                       workroot="runs/balance")
DEFAULT_RUNS = ";".join([
    "tc_aux=top_k",
    "tc_loss_free=loss_free,score_fn=sigmoid",
    "ec_seq=expert_choice",
    "ec_batch=expert_choice,group_size=BATCH",
    "et=expert_threshold,group_size=BATCH",
    "et_beta0.99=expert_threshold,group_size=BATCH,et_beta=0.99",
])
flags.DEFINE_string("runs", DEFAULT_RUNS, "LABEL=ROUTER[,FLAG=VALUE...];...")
flags.DEFINE_string("only", None, "Comma-separated labels of --runs to run "
                    "(default: all).")
flags.DEFINE_integer("calib_batches", 4, "Training batches that calibrate "
                     "expert choice's causal thresholds.")
flags.DEFINE_enum("mode", "all", ["all", "train", "report"], "What to do.")
flags.DEFINE_string("paired_ref", "tc_aux", "Label the report pairs every "
                    "other run with (same seed).")
FLAGS = flags.FLAGS
# Per-run JSONs under OUT (tracked by git, unlike the runs/ workdirs).
RECORDS = "records"
OWN = SHARED_FLAGS + ("runs", "only", "calib_batches", "mode", "paired_ref")
HISTORY_KEYS = ("step", "loss", "max_vio", "max_vio_max", "drop_fraction",
                "experts_per_token", "zero_expert_fraction", "et_bound_low",
                "et_bound_high", "et_pass_fraction", "et_threshold", "et_warmup",
                "bias_spread", "aux_loss", "eval_loss", "eval_max_vio")


# ----------------------------------------------------------------- probes
def _probe_classes():
  """Evaluation-only router methods (not registered)."""
  import jax
  import jax.numpy as jnp
  from moejax.routing import ExpertChoice, ExpertThreshold
  from moejax.routing import losses
  from moejax.routing.base import Routing, RouterOutput

  @dataclasses.dataclass(frozen=True)
  class ETTrainRouting(ExpertThreshold):
    """ET with its training routing (pool bounds) at evaluation; no update."""

    def route_groups(self, logits, state, *, rng, train):
      return super().route_groups(logits, state, rng=rng, train=True)

  @dataclasses.dataclass(frozen=True)
  class ECCalibrate(ExpertChoice):
    """Expert choice that also reports each expert's cutoff probability."""

    def route(self, logits, state, *, rng, train):
      out = super().route(logits, state, rng=rng, train=train)
      num_tokens, num_experts = logits.shape
      cap = self.capacity(num_tokens, num_experts, 1.0)
      probs = jax.nn.softmax(logits, axis=-1)
      cutoff = jnp.min(jax.lax.top_k(probs.T, cap)[0], axis=-1)
      out.metrics["ec_cutoff"] = cutoff
      return out

  @dataclasses.dataclass(frozen=True)
  class ECThreshold(ExpertChoice):
    """Causal stand-in for expert choice: prob > calibrated threshold."""

    def init_state(self, num_experts):
      return {"ec_threshold": jnp.zeros((num_experts,), jnp.float32)}

    def capacity(self, num_tokens, num_experts, capacity_factor):
      return num_tokens  # variable loads: no drops

    def route(self, logits, state, *, rng, train):
      probs = jax.nn.softmax(logits, axis=-1)
      chosen = probs > state["ec_threshold"][None, :]
      gates = jnp.where(chosen, jnp.maximum(probs, 1e-30), 0.0)
      routing = Routing(gates=gates, priority=probs)
      return RouterOutput(routing=routing,
                          aux=losses.standard_aux(logits, probs, routing),
                          metrics=losses.routing_metrics(routing, probs, logits))

  return ETTrainRouting, ECCalibrate, ECThreshold


def _same_fields(cls, method):
  return cls(**{f.name: getattr(method, f.name)
                for f in dataclasses.fields(method) if f.init})


# ------------------------------------------------------------- evaluation
def evaluate_routing(lm_cfg, params, router_state, batches) -> dict[str, Any]:
  """Loss and routing statistics of `lm_cfg`'s routing on `batches`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax.models import TransformerLM
  from moejax.train.step import cross_entropy, router_outputs

  model = TransformerLM(lm_cfg)

  @jax.jit
  def step(batch):
    logits, coll = model.apply({"params": params, "router_state": router_state},
                               batch["inputs"], train=False, mutable=["router"])
    ce, count = cross_entropy(logits, batch["targets"], batch["mask"])
    layers = router_outputs(coll["router"])
    batch_size, length = batch["inputs"].shape
    pick = lambda key: jnp.stack([v["metrics"][key] for v in layers.values()])
    out = {"ce_sum": ce, "count": count,
           "fanout_by_position": jnp.stack([
               v["fanout"].reshape(batch_size, length).mean(0)
               for v in layers.values()]).mean(0),
           "expert_load": pick("expert_load"),
           # [layers, E] assignment counts, to pool loads over all batches
           "expert_counts": pick("expert_load") * pick("experts_per_token")[
               :, None] * (batch_size * length)}
    for key in ("max_vio", "drop_fraction", "experts_per_token",
                "zero_expert_fraction", "fanout_std"):
      out[key] = pick(key).mean()
    out["max_vio_max"] = pick("max_vio").max()
    for key in ("et_bound_low", "et_bound_high", "et_pass_fraction"):
      if key in next(iter(layers.values()))["metrics"]:
        out[key] = pick(key).mean()
    return out

  sums: dict[str, Any] = {}
  for batch in batches:
    out = jax.device_get(step(batch))
    for key, value in out.items():
      sums[key] = sums.get(key, 0) + np.asarray(value, np.float64)
  n = len(batches)
  result = {k: (v / n).tolist() for k, v in sums.items()
            if k not in ("ce_sum", "count")}
  result["loss"] = float(sums["ce_sum"] / sums["count"])
  counts = sums["expert_counts"]  # summed over batches: the whole val set
  vio = (counts.max(-1) - counts.mean(-1)) / np.maximum(counts.mean(-1), 1e-9)
  result["max_vio_pooled"] = float(vio.mean())
  result["max_vio_pooled_max"] = float(vio.max())
  return result


def calibrate_expert_choice(lm_cfg, params, batches) -> dict[tuple, Any]:
  """{layer path: float32[E]} mean expert-choice cutoff probabilities."""
  import jax
  import numpy as np
  from moejax.models import TransformerLM
  from moejax.train.step import router_outputs

  model = TransformerLM(lm_cfg)

  @jax.jit
  def step(batch):
    _, coll = model.apply({"params": params}, batch["inputs"], train=False,
                          mutable=["router"])
    return {path: v["metrics"]["ec_cutoff"]
            for path, v in router_outputs(coll["router"]).items()}

  sums: dict[tuple, Any] = {}
  for batch in batches:
    for path, value in jax.device_get(step(batch)).items():
      sums[path] = sums.get(path, 0) + np.asarray(value, np.float64)
  return {p: (v / len(batches)).astype(np.float32) for p, v in sums.items()}


def with_router(cfg, method):
  moe = dataclasses.replace(cfg.model.moe, router=method)
  return dataclasses.replace(cfg.model, moe=moe)


# ------------------------------------------------------------------ runs
def run_values(label: str, router: str, options: dict, seed: int,
               base: dict[str, Any]) -> dict[str, Any]:
  """The training flag values of one (run, seed)."""
  values = dict(base, **options, router=router, seed=seed)
  values["workdir"] = experiment.workdir(FLAGS.workroot, label, seed)
  return values


def check_runs(specs, base: dict[str, Any]) -> None:
  """Builds every run's config before the first step (an unknown router or a
  bad value is refused now, not after the runs before it have trained)."""
  for spec in specs:
    try:
      lm_flags.build_train_config(run_values(spec.label, spec.router,
                                             spec.options, 0, base))
    except ValueError as e:
      raise ValueError(f"run {spec.label!r}: {e}") from None


def run_one(label: str, router: str, options: dict, seed: int,
            base: dict[str, Any]) -> dict[str, Any]:
  import flax.traverse_util
  import jax
  import numpy as np
  from moejax.data import get_lm_data

  values = run_values(label, router, options, seed, base)
  cfg = lm_flags.build_train_config(values)
  run = experiment.train_record(cfg, values["workdir"])
  summary, wall = run.summary, run.wall_seconds
  state = summary["state"]
  method = cfg.model.moe.router
  data = get_lm_data(cfg.dataset, seq_len=cfg.seq_len,
                     batch_size=cfg.batch_size, seed=cfg.seed,
                     data_dir=cfg.data_dir)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  put = lambda b: jax.device_put({k: np.asarray(v) for k, v in b.items()},
                                 sharding)
  val = [put(b) for b in data.eval_batches(cfg.eval_batches)]
  params = jax.device_put(state.params, sharding)
  router_state = jax.device_put(state.router_state, sharding)
  ETTrainRouting, ECCalibrate, ECThreshold = _probe_classes()

  evals = {"eval": evaluate_routing(cfg.model, params, router_state, val)}
  if router == "expert_threshold":
    evals["eval_train"] = evaluate_routing(
        with_router(cfg, _same_fields(ETTrainRouting, method)), params,
        router_state, val)
  if router == "expert_choice":
    calib = [put(data.batch(cfg.steps + i)) for i in range(FLAGS.calib_batches)]
    cutoffs = calibrate_expert_choice(
        with_router(cfg, _same_fields(ECCalibrate, method)), params, calib)
    ec_state = flax.traverse_util.unflatten_dict(
        {path + ("state",): {"ec_threshold": c} for path, c in cutoffs.items()})
    evals["eval_causal"] = evaluate_routing(
        with_router(cfg, _same_fields(ECThreshold, method)), params, ec_state,
        val)
  history = run.history(HISTORY_KEYS)
  return {
      "label": label, "router": router, "seed": seed,
      "options": {k: v for k, v in options.items()},
      "method": repr(method), "num_shared": cfg.model.moe.num_shared,
      "group_size": cfg.model.moe.group_size,
      "config": {"preset": values["config"], "steps": cfg.steps,
                 "num_layers": cfg.model.num_layers, "d_model": cfg.model.d_model,
                 "num_experts": cfg.model.moe.num_experts,
                 "k": method.k, "batch_size": cfg.batch_size,
                 "seq_len": cfg.seq_len,
                 "eval_capacity_factor": cfg.model.moe.eval_capacity_factor},
      "device": str(jax.devices()[0]), "wall_seconds": wall,
      "tokens_per_s": summary["tokens_per_s"],
      "resumed_from": summary["resumed_from"],
      "evals": evals, "history": history,
  }


# ---------------------------------------------------------------- report
def _ms(values):
  """[mean, std] over seeds, None without a value (the JSON layout)."""
  mean, std = mean_std(values)
  return None if mean is None else [mean, std]


def summarize_run(r: dict[str, Any]) -> dict[str, Any]:
  """Headline numbers of one (run, seed)."""
  hist = [h for h in r["history"] if "loss" in h and "max_vio" in h]
  steps = r["config"]["steps"]
  late = [h for h in hist if h["step"] > 0.75 * steps]
  warm = r["options"].get("et_warmup_steps", 0)
  post = [h for h in hist if h.get("et_warmup", 1.0) == 0.0 or
          ("et_warmup" not in h and h["step"] > warm)]
  mean = lambda rows, k: (sum(h[k] for h in rows if k in h) /
                          max(1, sum(1 for h in rows if k in h))
                          if any(k in h for h in rows) else None)
  ev = r["evals"]["eval"]
  out = {
      "train_loss_last25": mean(late, "loss"),
      "train_max_vio_last25": mean(late, "max_vio"),
      "train_max_vio_all": mean(hist, "max_vio"),
      "train_drop_last25": mean(late, "drop_fraction"),
      "train_fanout_last25": mean(late, "experts_per_token"),
      "eval_loss": ev["loss"], "eval_max_vio": ev["max_vio"],
      "eval_max_vio_pooled": ev.get("max_vio_pooled"),
      "eval_max_vio_max": ev["max_vio_max"],
      "eval_drop": ev["drop_fraction"], "eval_fanout": ev["experts_per_token"],
      "eval_zero_expert": ev["zero_expert_fraction"],
  }
  if "eval_train" in r["evals"]:
    et = r["evals"]["eval_train"]
    out["eval_loss_train_routing"] = et["loss"]
    out["eval_max_vio_train_routing"] = et["max_vio"]
    out["causal_gap"] = (ev["loss"] - et["loss"]) / et["loss"]
    out["et_bound_low_post_warmup"] = mean(post, "et_bound_low")
    out["et_bound_high_post_warmup"] = mean(post, "et_bound_high")
    out["eval_et_bound_low"] = ev.get("et_bound_low")
    out["eval_et_bound_high"] = ev.get("et_bound_high")
  if "eval_causal" in r["evals"]:
    ec = r["evals"]["eval_causal"]
    out["eval_loss_causal"] = ec["loss"]
    out["eval_max_vio_causal"] = ec["max_vio"]
    out["eval_max_vio_causal_pooled"] = ec.get("max_vio_pooled")
    out["eval_fanout_causal"] = ec["experts_per_token"]
    out["causal_gap"] = (ec["loss"] - ev["loss"]) / ev["loss"]
  return out


def report(out_dir: str) -> None:
  import numpy as np
  results = experiment.load_records(os.path.join(out_dir, RECORDS))
  if not results:
    raise FileNotFoundError(f"no run results under {out_dir}/{RECORDS}")
  found = list(dict.fromkeys(r["label"] for r in results))
  order = [spec.partition("=")[0].strip() for spec in FLAGS.runs.split(";")]
  labels = [l for l in order if l in found] + [l for l in found
                                                 if l not in order]
  rows = []
  for label in labels:
    rs = [r for r in results if r["label"] == label]
    per = [summarize_run(r) for r in rs]
    row = {"label": label, "router": rs[0]["router"],
           "seeds": [r["seed"] for r in rs], "method": rs[0]["method"],
           "group_size": rs[0]["group_size"], "device": rs[0]["device"]}
    for key in per[0]:
      row[key] = _ms([p.get(key) for p in per])
    pos = np.mean([r["evals"]["eval"]["fanout_by_position"] for r in rs], 0)
    row["fanout_by_position"] = pos.tolist()
    if "eval_causal" in rs[0]["evals"]:
      row["fanout_by_position_causal"] = np.mean(
          [r["evals"]["eval_causal"]["fanout_by_position"] for r in rs],
          0).tolist()
    rows.append(row)
  experiment.save_json(os.path.join(out_dir, "results.json"),
                       {"config": results[0]["config"], "rows": rows}, indent=1)

  def fmt(v, digits=3, pct=False):
    return format_ms(v, ".2f" if pct else f".{digits}f", pct=pct, missing="—")

  lines = [markdown_table(
      ["run", "eval loss (own routing)", "causal / training-routing eval loss",
       "gap", "val MaxVio per batch / pooled", "train MaxVio (last 25%)",
       "train MaxVio (all)", "train drop", "train fanout (last 25%)",
       "val fanout", "val zero-expert"],
      [[row["label"], fmt(row["eval_loss"], 4),
        fmt(row.get("eval_loss_train_routing") or row.get("eval_loss_causal"),
            4), fmt(row.get("causal_gap"), pct=True),
        f"{fmt(row['eval_max_vio'])} / {fmt(row['eval_max_vio_pooled'])}",
        fmt(row["train_max_vio_last25"]), fmt(row["train_max_vio_all"]),
        fmt(row["train_drop_last25"], pct=True),
        fmt(row["train_fanout_last25"], 2), fmt(row["eval_fanout"]),
        fmt(row["eval_zero_expert"], pct=True)] for row in rows])]
  et_rows = [r for r in rows if r.get("et_bound_low_post_warmup")]
  if et_rows:
    lines += ["", markdown_table(
        ["ET run", "lower bound binds (train, after warm-up)",
         "upper bound binds", "would bind on validation (low / high)"],
        [[row["label"], fmt(row["et_bound_low_post_warmup"], pct=True),
          fmt(row["et_bound_high_post_warmup"], pct=True),
          f"{fmt(row['eval_et_bound_low'], pct=True)} / "
          f"{fmt(row['eval_et_bound_high'], pct=True)}"] for row in et_rows])]
  lines += ["", paired_table(results, labels, ref=FLAGS.paired_ref),
            "", position_table(rows)]
  with open(os.path.join(out_dir, "results.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  plot(results, rows, out_dir)


def paired_table(results, labels, ref: str) -> str:
  """Same-seed differences of the evaluation loss against run `ref`."""
  loss = lambda label: {r["seed"]: r["evals"]["eval"]["loss"]
                        for r in results if r["label"] == label}
  return (f"Paired eval loss differences, run − {ref} of the same seed "
          "(nats/byte):\n\n" + experiment.paired_table(
              [(label, loss(ref), loss(label)) for label in labels
               if label != ref], sem=True))


def position_table(rows) -> str:
  """Validation fanout by token position: quarters of the sequence."""
  import numpy as np
  body = []
  for row in rows:
    for key, name in (("fanout_by_position", ""),
                      ("fanout_by_position_causal", " (causal stand-in)")):
      if key not in row:
        continue
      pos = np.asarray(row[key])
      quarters = np.array_split(pos, 4)
      body.append([row["label"] + name,
                   *(f"{q.mean():.2f}" for q in quarters), f"{pos[0]:.2f}",
                   f"{pos.mean():.2f}"])
  return ("Validation fanout by token position (mean over layers, seeds and "
          "batches):\n\n" + markdown_table(
              ["run", "1st quarter", "2nd", "3rd", "4th", "position 0",
               "mean"], body))


def plot(results, rows, out_dir: str) -> None:
  import numpy as np

  from moejax.experiment.plots import figure

  with figure(os.path.join(out_dir, "max_vio.png")) as (_, ax):
    _plot_max_vio(ax, results)
  with figure(os.path.join(out_dir, "fanout_by_position.png")) as (_, ax):
    for i, row in enumerate(rows):
      pos = np.asarray(row["fanout_by_position"])
      ax.plot(np.arange(len(pos)), pos, color=f"C{i}", label=row["label"])
      if "fanout_by_position_causal" in row:
        ax.plot(np.arange(len(pos)), row["fanout_by_position_causal"],
                color=f"C{i}", ls="--", label=row["label"] + " (causal thr.)")
    ax.set_xlabel("token position")
    ax.set_ylabel("routed experts per token (validation)")
    ax.legend(fontsize=8)
  with figure(os.path.join(out_dir, "loss.png")) as (_, ax):
    for i, label in enumerate(dict.fromkeys(r["label"] for r in results)):
      for r in (r for r in results if r["label"] == label):
        h = [x for x in r["history"] if "loss" in x]
        ax.plot([x["step"] for x in h], [x["loss"] for x in h], color=f"C{i}",
                alpha=0.7, lw=1)
      ax.plot([], [], color=f"C{i}", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_ylim(top=3.0)
    ax.legend(fontsize=8)


def _plot_max_vio(ax, results) -> None:
  for i, label in enumerate(dict.fromkeys(r["label"] for r in results)):
    for r in (r for r in results if r["label"] == label):
      h = [x for x in r["history"] if "max_vio" in x and "loss" in x]
      ax.plot([x["step"] for x in h], [x["max_vio"] for x in h], color=f"C{i}",
              alpha=0.8, label=label if r["seed"] == min(
                  x["seed"] for x in results if x["label"] == label) else None)
  ax.set_yscale("log")
  ax.axhline(0.15, color="k", ls=":", lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("training MaxVio (mean over layers)")
  ax.legend(fontsize=8)


def main(argv):
  base = experiment.start(argv, OWN)
  from moejax import configs
  out_dir = FLAGS.out
  if FLAGS.mode in ("all", "train"):
    pre = configs.preset(base["config"])
    pick = lambda key: pre[key] if base.get(key) is None else base[key]
    steps = pick("steps")
    base["steps"] = steps
    if base.get("num_shared") is None:
      base["num_shared"] = 1
    if base.get("et_warmup_steps") is None:
      base["et_warmup_steps"] = max(1, steps // 10)
    if not FLAGS["eval_capacity_factor"].present:
      base["eval_capacity_factor"] = pick("num_experts") / pick("k")
    base["sample_tokens"] = 0
    batch_tokens = pick("batch_size") * pick("seq_len")
    try:
      parsed = experiment.parse_runs(  # `BATCH` = the batch's tokens
          FLAGS.runs, flag_values=FLAGS, exclude=OWN,
          substitute={"BATCH": str(batch_tokens)})
      labels = [s.label for s in parsed]
      only = FLAGS.only.split(",") if FLAGS.only else labels
      unknown = [label for label in only if label not in labels]
      if unknown:
        cli_app.fail(f"--only={FLAGS.only!r}: {', '.join(unknown)} not a label "
                     f"of --runs; allowed: {', '.join(labels)}")
      specs = {s.label: s for s in parsed if s.label in only}
      for spec in specs.values():
        spec.options.setdefault("et_warmup_steps", base["et_warmup_steps"])
      check_runs(specs.values(), base)
    except ValueError as e:
      cli_app.fail(f"--runs: {e}")

    def run(label, seed):
      spec = specs[label]
      result = run_one(label, spec.router, spec.options, seed, base)
      ev = result["evals"]
      print(f"   eval loss {ev['eval']['loss']:.4f}  val MaxVio "
            f"{ev['eval']['max_vio']:.3f}  "
            + "  ".join(f"{k} {v['loss']:.4f}" for k, v in ev.items()
                        if k != "eval"), flush=True)
      return result

    runs_dir = os.path.join(out_dir, RECORDS)
    experiment.run_grid(list(specs), experiment.seeds_flag(),
                        lambda label, seed: experiment.record_path(
                            runs_dir, label, seed), run)
  if FLAGS.mode in ("all", "report"):
    report(out_dir)


if __name__ == "__main__":
  app.run(main)
