"""Model-level benchmark: train-step tokens/s of an LM preset per router vs dense.

Axis legend:
  B  batch (sequences)
  L  sequence length
  D  model width
  E  experts
  k  experts per token (target mean fanout)

Times the jitted train step of `moejax.train.step.make_train_step` (forward,
backward, AdamW update, controller updates) on random byte tokens for the
`small` preset (or --config), once per router and once for the dense model
(--router=dense: every MLP dense with width d_ff), all in one process, round
robin over the models (the machine is shared: interleaving cancels slow
phases). FLOPs per token are counted from shapes by `moejax.flops` (matrix
products only, training = 3 x forward): "active" counts k experts per token
(the model FLOPs behind MFU), "computed" counts the rows the dispatch strategy
runs (E*C slots for capacity strategies). MFU = active FLOPs/s / --peak_tflops
(asked for only on GPUs/TPUs; e.g. 989 for an H100 SXM in bf16 dense).

  python experiments/bench_train.py                         # small, CPU
  # ~1B total parameters (32 experts of 768, k=4, 12 layers of 1024), GPU:
  python experiments/bench_train.py --routers=dense,top_k,dtop_p,expert_threshold \
      --dtype=bfloat16 --peak_tflops=989 --num_layers=12 --d_model=1024 \
      --num_heads=16 --d_ff=3072 --num_experts=32 --expert_width=768 --k=4 \
      --batch_size=32 --seq_len=1024
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import flops, routing
from moejax.cli import lm_flags
from moejax.experiment import timing
from moejax.models.lm import TransformerLM
from moejax.train.state import TrainState
from moejax.train.step import make_train_step

flags.DEFINE_string("config", "small", "model preset (moejax.configs)")
flags.DEFINE_list("routers", ["dense", "top_k", "expert_choice", "dtop_p",
                              "expert_threshold", "exact_k"],
                  "routers ('dense' = the dense model; unregistered routers "
                  "are skipped with a note)")
flags.DEFINE_string("strategy", "gather", "dispatch strategy of the MoE layers")
flags.DEFINE_string("dtype", "float32", "activation dtype: float32|bfloat16")
flags.DEFINE_integer("batch_size", None, "sequences per step (preset default)")
flags.DEFINE_integer("seq_len", None, "tokens per sequence (preset default)")
flags.DEFINE_integer("num_layers", None, "override the preset's layers")
flags.DEFINE_integer("d_model", None, "override the preset's width")
flags.DEFINE_integer("num_heads", None, "override the preset's heads")
flags.DEFINE_integer("d_ff", None, "override the preset's dense MLP width")
flags.DEFINE_integer("num_experts", None, "override the preset's experts")
flags.DEFINE_integer("expert_width", None, "override the preset's F")
flags.DEFINE_integer("k", None, "override the preset's k")
timing.define_flags(repeats=5, warmup=2)  # the median round is reported
flags.DEFINE_float("peak_tflops", None,
                   "device peak TFLOP/s for MFU (GPU/TPU; ignored on CPU "
                   "unless --mfu_on_cpu)")
flags.DEFINE_bool("mfu_on_cpu", False, "report MFU on CPU too")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("out", "experiments/reports/bench_train.json", "JSON path")
FLAGS = flags.FLAGS

OVERRIDES = ("num_layers", "d_model", "num_heads", "d_ff", "num_experts",
             "expert_width", "k")


def train_config(router: str):
  values = {"config": FLAGS.config, "router": router,
            "strategy": FLAGS.strategy, "dtype": FLAGS.dtype,
            "batch_size": FLAGS.batch_size, "seq_len": FLAGS.seq_len,
            "k": FLAGS.k, "num_experts": FLAGS.num_experts,
            "expert_width": FLAGS.expert_width, "steps": 1000,
            "sample_tokens": 0, "progress": False}
  cfg = lm_flags.build_train_config(values)
  model = cfg.model
  changes = {n: getattr(FLAGS, n) for n in ("num_layers", "d_model",
                                            "num_heads", "d_ff")
             if getattr(FLAGS, n) is not None}
  if changes:
    model = dataclasses.replace(model, **changes)
  return dataclasses.replace(cfg, model=model)


def build(cfg):
  model = TransformerLM(cfg.model)
  optimizer = cfg.optim.optimizer()
  tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
  rng = jax.random.PRNGKey(FLAGS.seed)

  @jax.jit
  def init(rng):
    variables = model.init({"params": rng, "router": rng}, tokens, train=False)
    params = nn.meta.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      router_state=variables.get("router_state", {}),
                      rng=rng, data_index=jnp.zeros((), jnp.int32))
  state = init(rng)
  method = cfg.model.moe.router if cfg.model.moe is not None else None
  step = make_train_step(model, optimizer, method, donate=False)
  batch = {"inputs": jax.random.randint(rng, (cfg.batch_size, cfg.seq_len), 0,
                                        256, jnp.int32)}
  batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)
  batch["mask"] = jnp.ones(batch["inputs"].shape, jnp.float32)
  return step, state, batch


def count_flops(cfg):
  model = cfg.model
  computed = flops.flops_per_token(model, cfg.seq_len)["total"]
  if model.moe is not None:
    active_model = dataclasses.replace(
        model, moe=dataclasses.replace(model.moe, strategy="dropless"))
    active = flops.flops_per_token(active_model, cfg.seq_len)["total"]
  else:
    active = computed
  return 3.0 * active, 3.0 * computed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  backend = jax.default_backend()
  notes, entries = [], []
  for router in FLAGS.routers:
    if router != "dense" and router not in routing.available():
      notes.append(f"router {router} not registered: skipped")
      continue
    try:
      cfg = train_config(router)
    except ValueError as err:
      print(f"error: {err}", file=sys.stderr)
      return 2
    t0 = time.perf_counter()
    step, state, batch = build(cfg)
    out = step(state, batch)  # compile
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    active, computed = count_flops(cfg)
    params = sum(int(v.size) for v in jax.tree.leaves(state.params))
    entries.append({"router": router, "cfg": cfg, "step": step,
                    "params": params,
                    "state": state, "batch": batch,
                    "compile_s": compile_s, "train_flops_per_token": active,
                    "computed_train_flops_per_token": computed})
    print(f"compiled {router} in {compile_s:.0f} s", flush=True)
  timings = timing.interleaved(
      {i: functools.partial(e["step"], e["state"], e["batch"])
       for i, e in enumerate(entries)}, FLAGS.repeats, warmup=FLAGS.warmup)
  for i, e in enumerate(entries):
    e["times"] = timings[i].wall
  dense = next((e for e in entries if e["router"] == "dense"), None)
  peak = FLAGS.peak_tflops
  show_mfu = peak is not None and (backend != "cpu" or FLAGS.mfu_on_cpu)
  rows = []
  print(f"\nbackend={backend} config={FLAGS.config} dtype={FLAGS.dtype} "
        f"strategy={FLAGS.strategy}")
  print(f"{'router':<17} {'params':>7} {'ms/step':>9} {'tok/s':>9} "
        f"{'vs dense':>8} "
        f"{'GFLOP/tok':>9} {'TFLOP/s':>8}" + (f" {'MFU':>6}" if show_mfu
                                               else ""))
  for e in entries:
    cfg = e["cfg"]
    tokens = cfg.batch_size * cfg.seq_len
    median = statistics.median(e["times"])
    tflops = e["train_flops_per_token"] * tokens / median / 1e12
    row = {"router": e["router"], "params": e["params"],
           "ms_per_step": 1e3 * median,
           "tokens_per_s": tokens / median,
           "step_time_vs_dense": (median / statistics.median(dense["times"])
                                  if dense else None),
           "train_flops_per_token": e["train_flops_per_token"],
           "computed_train_flops_per_token":
               e["computed_train_flops_per_token"],
           "tflops_per_s": tflops,
           "mfu": tflops / peak if show_mfu else None,
           "compile_s": e["compile_s"], "batch_size": cfg.batch_size,
           "seq_len": cfg.seq_len,
           "model": {k: v for k, v in dataclasses.asdict(cfg.model).items()
                     if k != "moe"},
           "moe": (None if cfg.model.moe is None else {
               "num_experts": cfg.model.moe.num_experts,
               "expert_width": cfg.model.moe.expert_width,
               "k": cfg.model.moe.router.k,
               "strategy": cfg.model.moe.strategy,
               "capacity_factor": cfg.model.moe.capacity_factor})}
    rows.append(row)
    ratio = ("-" if row["step_time_vs_dense"] is None
             else f"{row['step_time_vs_dense']:.2f}")
    print(f"{row['router']:<17} {row['params'] / 1e6:>6.1f}M "
          f"{row['ms_per_step']:>9.1f} "
          f"{row['tokens_per_s']:>9.0f} {ratio:>8} "
          f"{row['train_flops_per_token'] / 1e9:>9.4f} {tflops:>8.3f}"
          + (f" {row['mfu']:>6.1%}" if show_mfu else ""))
  for note in notes:
    print(f"note: {note}")
  result = {"command": " ".join(sys.argv), "backend": backend,
            "jax": jax.__version__, "machine": platform.machine(),
            "dtype": FLAGS.dtype, "strategy": FLAGS.strategy,
            "config": FLAGS.config, "peak_tflops": peak, "rows": rows,
            "notes": notes}
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as fh:
      json.dump(result, fh, indent=1, default=str)
    print(f"wrote {FLAGS.out}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
