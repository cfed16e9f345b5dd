"""absl flags of `experiments/train_lm.py` and their translation into configs.

Every router option is a flag; `build_train_config(flag_values)` turns them
into frozen configs, whose constructors validate values and name the field,
the value and the allowed range in their errors.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Mapping

from absl import flags

from moejax import configs, methods
from moejax.data import DataError
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig
from moejax.train.loop import TrainConfig
from moejax.train.state import OptimConfig

# Routers of the public API; those not registered yet are refused clearly.
API_ROUTERS = ("top_k", "expert_choice", "top_p", "dtop_p", "expert_threshold",
               "exact_k", "dynamic_k", "dense")


def define_flags() -> None:
  d = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float
  string, integer, float_ = d
  string("config", "tiny", "Preset: " + ", ".join(sorted(configs.PRESETS)))
  string("router", "top_k", "Router: " + ", ".join(API_ROUTERS))
  integer("num_experts", None, "Routed experts (default: preset).")
  integer("k", None, "top-k's k and the target mean fanout (default: preset).")
  float_("p", None, "Fixed top-p threshold in (0, 1].")
  integer("k_min", None, "dynamic_k: smallest subset size (default max(1, "
          "k_max - 2)).")
  integer("k_max", None, "dynamic_k: largest subset size, <= num_experts "
          "(default k).")
  integer("max_k", None, "top_p/dtop_p: static fanout cap, k <= max_k <= "
          "num_experts (default: num_experts).")
  string("dtop_p_scope", None, "dtop_p: global (one p from the mean fanout of "
         "all MoE layers) or layer (one controller per layer); default global.")
  float_("pi_kp", None, "dtop_p: PI proportional gain (default 0.1).")
  float_("pi_ki", None, "dtop_p: PI integral gain (default 0.1).")
  float_("p_init", None, "dtop_p: initial threshold p_0 (default 0.5).")
  float_("p_min", None, "dtop_p: lower bound of p (default 0.01).")
  float_("p_max", None, "dtop_p: upper bound of p (default 1.0).")
  integer("expert_width", None, "Hidden width of each expert (default: preset).")
  integer("num_shared", None, "Always-on shared experts (default: the router's; "
          "1 for expert_threshold, else 0).")
  string("balance", None, "top_k balancing: aux (load-balance loss), loss_free "
         "(selection bias, no loss) or none; default aux.")
  float_("bias_update_rate", None, "top_k --balance=loss_free: bias speed u "
         "(default 1e-3).")
  string("score_fn", None, "top_k scores: softmax or sigmoid (default softmax).")
  integer("et_warmup_steps", None, "expert_threshold: expert-choice warm-up "
          "steps (default 100).")
  float_("et_beta", None, "expert_threshold: threshold EMA decay in [0, 1) "
         "(default 0.999).")
  float_("et_capacity_bound", None, "expert_threshold: C of the training load "
         "bounds (1 +- C) k, in [0, 1] (default 0.5).")
  integer("moe_every", None, "Every n-th block is an MoE block.")
  float_("capacity_factor", 1.25, "Training capacity factor (> 0).")
  float_("eval_capacity_factor", 2.0, "Evaluation capacity factor (> 0).")
  string("strategy", "index", "Dispatch: einsum, index or dropless.")
  integer("group_size", None, "Tokens per routing group (default: a sequence).")
  float_("load_balance_weight", None, "Aux load-balance weight (default: router's).")
  float_("z_loss_weight", None, "Router z-loss weight (default: router's).")
  float_("entropy_weight", None, "Routing-entropy weight (default: router's).")
  float_("mod_capacity", 0.0, "Mixture-of-Depths capacity fraction in [0, 1] "
         "(0 = off; the paper's setting is 0.125 with --mod_every=2).")
  integer("mod_every", 2, "MoD: every n-th block is routed (2 = every other).")
  string("mod_score", "raw", "MoD: update multiplier raw (r) or sigmoid.")
  float_("mod_aux_weight", 0.01, "MoD: weight of the router's causal BCE.")
  float_("mod_predictor_weight", 1.0, "MoD: weight of the causal predictor's "
         "BCE (trains the predictor only).")
  string("mod_causal", "predictor", "MoD: causal routing used for sampling: "
         "predictor or router.")
  integer("num_noop_experts", 0, "No-op experts added to the MoE router "
          "(integrated MoDE).")
  string("dataset", "stdlib", "stdlib, text:GLOB or tfds:NAME.")
  string("data_dir", None, "tensorflow-datasets data directory.")
  integer("steps", None, "Training steps (default: preset).")
  integer("batch_size", None, "Global batch size (default: preset).")
  integer("seq_len", None, "Sequence length (default: preset).")
  float_("learning_rate", None, "Peak learning rate (default: preset).")
  integer("warmup_steps", None, "Warmup steps (default: preset).")
  integer("seed", 0, "Random seed (params, data order, routing).")
  string("workdir", "runs/default", "Output directory; reused to resume.")
  string("mesh", None, "Mesh, e.g. data:2,expert:4 (default: all on data).")
  string("expert_parallel", "gspmd", "Expert parallelism: gspmd (sharding "
         "constraints) or shard_map (explicit all-to-all).")
  string("coordinator_address", None, "Multi-host: host:port of process 0 "
         "(or env JAX_COORDINATOR_ADDRESS; cluster launches auto-detect).")
  integer("num_processes", None, "Multi-host: number of processes (or env "
          "JAX_NUM_PROCESSES).")
  integer("process_id", None, "Multi-host: this process's id in "
          "[0, num_processes) (or env JAX_PROCESS_ID).")
  string("dtype", "float32", "Activation dtype: float32 or bfloat16.")
  integer("log_every", 10, "Log every n steps.")
  integer("eval_every", 200, "Evaluate every n steps.")
  integer("eval_batches", 8, "Validation batches per evaluation.")
  integer("checkpoint_every", 100, "Checkpoint every n steps.")
  integer("keep_checkpoints", 3, "Checkpoints kept.")
  integer("sample_tokens", 160, "Tokens sampled at the end (0 = none).")
  float_("temperature", 0.0, "Sampling temperature (0 = greedy).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def build_router(name: str, options: Mapping[str, Any]) -> methods.RouterMethod:
  if name not in methods.available():
    if name in API_ROUTERS:
      raise ValueError(f"router={name!r} is not implemented in this version of "
                       f"moejax yet; available: "
                       f"{', '.join(methods.available() + ('dense',))}")
    raise ValueError(f"router={name!r} is unknown; allowed: "
                     f"{', '.join(API_ROUTERS)}")
  return methods.build(name, options)


def build_train_config(values: Mapping[str, Any]) -> TrainConfig:
  """Builds the run's config from flag values (a dict of name -> value)."""
  pre = configs.preset(values["config"])
  pick = lambda key: pre[key] if values.get(key) is None else values[key]
  p = values.get("p")
  if p is not None and not 0 < p <= 1:
    raise ValueError(f"p={p} is out of range; allowed: (0, 1]")
  mod = values.get("mod_capacity") or 0.0
  if not 0 <= mod <= 1:
    raise ValueError(f"mod_capacity={mod} is out of range; allowed: [0, 1]")
  router = values["router"]
  moe = None
  if router != "dense":
    options = dict(values)
    options["k"] = pick("k")
    method = build_router(router, options)
    moe = MoEConfig(
        num_experts=pick("num_experts"), expert_width=pick("expert_width"),
        router=method, num_shared=(
            getattr(method, "default_num_shared", 0)
            if values.get("num_shared") is None else values["num_shared"]),
        capacity_factor=values.get("capacity_factor", 1.25),
        eval_capacity_factor=values.get("eval_capacity_factor", 2.0),
        strategy=values.get("strategy", "index"),
        group_size=values.get("group_size"),
        load_balance_weight=values.get("load_balance_weight"),
        z_loss_weight=values.get("z_loss_weight"),
        entropy_weight=values.get("entropy_weight"),
        num_noop_experts=values.get("num_noop_experts") or 0,
        expert_parallel=values.get("expert_parallel") or "gspmd")
  seq_len = pick("seq_len")
  model = LMConfig(num_layers=pre["num_layers"], d_model=pre["d_model"],
                   num_heads=pre["num_heads"], d_ff=pre["d_ff"],
                   max_len=seq_len, moe=moe, moe_every=pick("moe_every"),
                   dtype=values.get("dtype", "float32"), mod_capacity=mod,
                   mod_every=values.get("mod_every") or 2,
                   mod_score=values.get("mod_score") or "raw",
                   mod_aux_weight=values.get("mod_aux_weight", 0.01),
                   mod_predictor_weight=values.get("mod_predictor_weight", 1.0),
                   mod_causal=values.get("mod_causal") or "predictor")
  steps = pick("steps")
  optim = OptimConfig(learning_rate=pick("learning_rate"),
                      warmup_steps=min(pick("warmup_steps"), steps),
                      total_steps=steps)
  return TrainConfig(
      model=model, optim=optim, dataset=values.get("dataset", "stdlib"),
      data_dir=values.get("data_dir"), batch_size=pick("batch_size"),
      seq_len=seq_len, steps=steps, seed=values.get("seed", 0),
      log_every=values.get("log_every", 10),
      eval_every=values.get("eval_every", 200),
      eval_batches=values.get("eval_batches", 8),
      checkpoint_every=values.get("checkpoint_every", 100),
      keep_checkpoints=values.get("keep_checkpoints", 3),
      mesh=values.get("mesh"), sample_tokens=values.get("sample_tokens", 160),
      temperature=values.get("temperature", 0.0),
      progress=values.get("progress", True))


def run(flag_values) -> int:
  """Runs the job; returns the process exit code (2 on bad input)."""
  values = flag_values.flag_values_dict()
  try:
    from moejax import sharding  # multi-host: before jax touches devices
    sharding.maybe_initialize_distributed(values.get("coordinator_address"),
                                          values.get("num_processes"),
                                          values.get("process_id"))
    cfg = build_train_config(values)
    from moejax.train.loop import train
    summary = train(cfg, values["workdir"])
  except (ValueError, DataError, FileNotFoundError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  workdir = os.path.abspath(values["workdir"])
  lines = [
      f"validation loss: {summary['eval_loss']:.4f} nats/byte "
      f"({summary['eval_loss'] / 0.6931471805599453:.3f} bits/byte)",
  ]
  if summary["tokens_per_s"]:
    lines.append(f"throughput: {summary['tokens_per_s']:.0f} tokens/s over "
                 f"{summary['train_seconds']:.0f} s")
  if summary.get("resumed_from") is not None:
    lines.append(f"resumed from step {summary['resumed_from']}")
  if "sample" in summary:
    lines.append("sample:\n" + summary["sample"])
  lines += [f"metrics:     {summary['metrics']}",
            f"plot:        {summary['plot']}",
            f"checkpoints: {summary['checkpoints']}  (workdir {workdir})"]
  print("\n".join(lines))
  return 0
