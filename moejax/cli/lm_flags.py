"""absl flags of `experiments/train_lm.py` and their translation into configs.

`build_train_config(flag_values)` builds the run in three layers:
  1. `--config`: a registry name (`moejax.configs`: tiny, small, paper_dtop_p,
     ..., mixtral_8x7b) or a `.py` / `.yaml` config file;
  2. dotted overrides of any field, `--model.num_layers=24` or
     `model.num_layers=24` (`--override=PATH=VALUE`; the script's parser
     turns the first two forms into the third), see `moejax.configs.overrides`;
  3. the flat flags (`--num_experts`, `--k`, `--router`, `--steps`, ...): a
     flag that is set replaces the config's value; `--steps` also sets the
     schedule's length (and caps its warm-up), `--seq_len` the model's
     max_len, `--router` (or a router option) rebuilds the router from the
     config's (a new method keeps the target fanout k).
A flag left unset (None) keeps the config's value, which for a field the
config does not set is the dataclass's default (`moejax.cli.defaults`):
defaults are declared once, in the dataclasses. The frozen configs'
constructors validate values and name the field, the value and the allowed
range in their errors.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from typing import Any, Mapping

from absl import flags

from moejax import configs, routing
from moejax.checks import check_number
from moejax.cli import app, defaults
from moejax.configs import overrides
from moejax.models.lm import LMConfig
from moejax.nn.mod import MoDConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.config import LOOP_FIELDS
from moejax.train.state import OptimConfig

# Flags that set a config field, by config class: name -> help (the kind comes
# from the field's type). Each defaults to None and falls through to the
# class's default.
MOE_FLAGS = defaults.table(MoEConfig, {
    "capacity_factor": "Training capacity factor (> 0).",
    "eval_capacity_factor": "Evaluation capacity factor (> 0).",
    "strategy": "Dispatch strategy: auto (the backend's fastest capacity "
                "strategy), gather, index, einsum, dropless, sorted or "
                "ragged.",
    "group_size": "Tokens per routing group (None: a sequence).",
    "load_balance_weight": "Aux load-balance weight (None: the router's).",
    "z_loss_weight": "Router z-loss weight (None: the router's).",
    "entropy_weight": "Routing-entropy weight (None: the router's).",
    "num_noop_experts": "No-op experts added to the MoE router (integrated "
                        "MoDE).",
    "expert_parallel": "Expert parallelism: gspmd (sharding constraints) or "
                       "shard_map (explicit all-to-all).",
})
LM_MODEL_FLAGS = defaults.table(LMConfig, {
    "dtype": "Activation dtype: float32 or bfloat16.",
    "param_dtype": "Parameter dtype: float32 or bfloat16 (params created and "
                   "updated in it, computed with in --dtype; routing stays "
                   "float32).",
    "remat": "Remat: none, block (recompute each block in the backward), "
             "save_expert_inputs (block remat keeping the routed experts' "
             "dispatched inputs), save_dots (block remat keeping the "
             "attention projections and router logits), save_matmuls "
             "(save_dots and the expert matmuls' outputs), "
             "recompute_attention (recompute only the "
             "attention scores) or save_moe_operands (recompute_attention, "
             "and the MoE layer keeps only its expert matmuls' operands).",
    "mod_every": "MoD: every n-th block is routed.",
    "attention": "Attention implementation: xla (einsums, the reference), "
                 "dot_product (jax.nn.dot_product_attention: cuDNN flash "
                 "attention on GPU), splash (the Pallas TPU splash kernel) "
                 "or auto (per backend: xla on CPU, dot_product on GPU, "
                 "splash on TPU).",
    "num_kv_heads": "Key/value heads of grouped-query attention (divides "
                    "num_heads; 1 = multi-query; None: num_heads).",
})
# Mixture-of-Depths flags: flag -> (field of the model's `mod`, a
# `MoDConfig`; help). `--mod_capacity` switches MoD on (> 0) or off (0);
# the others set fields of a config that has MoD (or gets it).
MOD_FLAGS = {
    "mod_capacity": ("capacity", "Mixture-of-Depths capacity fraction in "
                     "[0, 1] (0 = off; the paper's setting is 0.125 with "
                     "--mod_every=2) (default: the config's; 0 for tiny and "
                     "small)"),
    "mod_score": ("score", "MoD: update multiplier raw (r) or sigmoid."),
    "mod_aux_weight": ("aux_weight", "MoD: weight of the router's causal "
                       "BCE."),
    "mod_predictor_weight": ("predictor_weight", "MoD: weight of the causal "
                             "predictor's BCE (trains the predictor only)."),
    "mod_causal": ("causal", "MoD: causal routing used for sampling: "
                   "predictor or router."),
}
RUN_FLAGS = defaults.table(TrainConfig, {
    "dataset": "stdlib, text:GLOB, tfds:NAME or tokens:DIR (a directory "
               "prepared by python -m moejax.data.prepare).",
    "data_dir": "tensorflow-datasets data directory.",
    "tokenizer": "bytes, a SentencePiece .model or a tokenizers .json file "
                 "(None: bytes, or for tokens:DIR the shards' own). The "
                 "model's vocabulary follows it, padded to a multiple of 128.",
    "packing": "Packed token data (tokens:DIR, or a tokenizer other than "
               "bytes): attention stays inside each document.",
    "grad_accum": "Gradient accumulation: microbatches per step (the batch "
                  "is split into N run one after the other, one update).",
    "seed": "Random seed (params, data order, routing).",
    "mesh": "Mesh over data, fsdp, expert, model, e.g. data:2,expert:4 or "
            "fsdp:4,expert:2 (None: all devices on data).",
    "num_devices": "Use the first n devices (None = all).",
    "log_every": "Log every n steps.",
    "eval_every": "Evaluate every n steps.",
    "eval_batches": "Validation batches per evaluation.",
    "checkpoint_every": "Checkpoint every n steps.",
    "keep_checkpoints": "Checkpoints kept.",
    "max_bad_steps": "Stop after this many consecutive steps with a "
                     "non-finite loss or gradient (each is skipped).",
    "sample_tokens": "Tokens sampled at the end (0 = none).",
    "temperature": "Sampling temperature (0 = greedy).",
    "progress": "Show a progress bar.",
})
# Router options, by router class (`routing.get`): name -> help, as above;
# None = the router's default.
ROUTER_FLAGS = {
    **defaults.table(routing.get("top_p"), {
        "p": "Fixed top-p threshold in (0, 1].",
    }),
    **defaults.table(routing.get("dtop_p"), {
        "dtop_p_scope": "dtop_p: global (one p from the mean fanout of all "
                        "MoE layers) or layer (one controller per layer).",
        "pi_kp": "dtop_p: PI proportional gain.",
        "pi_ki": "dtop_p: PI integral gain.",
        "p_init": "dtop_p: initial threshold p_0.",
        "p_min": "dtop_p: lower bound of p.",
        "p_max": "dtop_p: upper bound of p.",
    }),
    **defaults.table(routing.get("top_k"), {
        "balance": "top_k balancing: aux (load-balance loss) or none; "
                   "loss_free is --router=loss_free (selection bias, no loss).",
        "score_fn": "top_k / loss_free scores: softmax or sigmoid.",
        "normalize": "top_k / loss_free: renormalise the chosen weights to sum "
                     "to 1 per token (with k=1 the gate is then 1 and the "
                     "router learns from the aux loss alone).",
    }),
    **defaults.table(routing.get("loss_free"), {
        "bias_update_rate": "loss_free: bias speed u.",
    }),
    **defaults.table(routing.get("expert_threshold"), {
        "et_warmup_steps": "expert_threshold: expert-choice warm-up steps.",
        "et_beta": "expert_threshold: threshold EMA decay in [0, 1).",
        "et_capacity_bound": "expert_threshold: C of the training load "
                             "bounds (1 +- C) k, in [0, 1].",
    }),
}

# `--help`'s groups (flags of no group are listed under "other").
# Model-size flags (integers; None = the config's value).
SIZE_FLAGS = {
    "num_layers": "Transformer blocks (default: the config's).",
    "d_model": "Model width D (default: the config's).",
    "num_heads": "Attention heads (default: the config's).",
    "d_ff": "Dense MLP width (default: the config's).",
    "vocab_size": "Vocabulary V (default: the config's; 256 for bytes).",
    "num_experts": "Routed experts (default: the config's).",
    "expert_width": "Hidden width of each expert (default: the config's).",
}

HELP_GROUPS = {
    "model": ("config", "override", *SIZE_FLAGS, "num_shared", "moe_every",
              *LM_MODEL_FLAGS, *MOD_FLAGS),
    "routing": ("router", "k", "k_min", "k_max", "max_k", *ROUTER_FLAGS,
                *(n for n in MOE_FLAGS if n != "expert_parallel")),
    "data": ("dataset", "data_dir", "tokenizer", "packing", "seq_len",
             "batch_size"),
    "training": ("steps", "learning_rate", "warmup_steps", "grad_accum",
                 "seed", "log_every", "eval_every", "eval_batches",
                 "checkpoint_every",
                 "keep_checkpoints", "max_bad_steps", "sample_tokens",
                 "temperature", "progress", "workdir"),
    "scale-out": ("mesh", "num_devices", "expert_parallel",
                  "coordinator_address", "num_processes", "process_id",
                  "profile_steps", "compile_only", "topology"),
}


def define_flags() -> None:
  string, integer, float_ = (flags.DEFINE_string, flags.DEFINE_integer,
                             flags.DEFINE_float)
  string("config", "tiny", "Named config (" + ", ".join(configs.names()) +
         ") or a config file: .py (config() returning a TrainConfig or a "
         "dict of overrides) or .yaml (nested fields, optional base: NAME).")
  override_help = (
      "PATH=VALUE, repeatable: sets any config field after --config, before "
      "the flags; also written --PATH=VALUE or PATH=VALUE (e.g. "
      "--model.num_layers=24 model.moe.router.p_init=0.3; see 'config "
      "fields' below).")
  flags.DEFINE_multi_string("override", None, override_help)
  flags.FLAGS["override"].help = override_help  # without absl's suffix
  string("router", None, "Router: " + ", ".join(router_names()) +
         " (default: the config's; top_k for tiny and small).")
  for name, text in SIZE_FLAGS.items():
    integer(name, None, text)
  integer("k", None, "top-k's k and the target mean fanout (default: the "
          "config's).")
  integer("k_min", None, "dynamic_k: smallest subset size (default max(1, "
          "k_max - 2)).")
  integer("k_max", None, "dynamic_k: largest subset size, <= num_experts "
          "(default k).")
  integer("max_k", None, "top_p/dtop_p: static fanout cap, k <= max_k <= "
          "num_experts (default: num_experts).")
  defaults.define(ROUTER_FLAGS)
  integer("num_shared", None, "Always-on shared experts (default: the router's; "
          "1 for expert_threshold, else 0).")
  integer("moe_every", None, "Every n-th block is an MoE block (default: "
          "the config's).")
  defaults.define(MOE_FLAGS)
  defaults.define(LM_MODEL_FLAGS)
  make = {"float": float_, "string": string}
  for name, (field, text) in MOD_FLAGS.items():
    if name != "mod_capacity":
      text = defaults.with_default(text, MoDConfig, field)
    make[defaults.field_kind(MoDConfig, field)](name, None, text)
  integer("steps", None, "Training steps (default: the config's).")
  integer("batch_size", None, "Global batch size (default: the config's).")
  integer("seq_len", None, "Sequence length (default: the config's).")
  float_("learning_rate", None, "Peak learning rate (default: the "
         "config's).")
  integer("warmup_steps", None, "Warmup steps (default: the config's).")
  defaults.define(RUN_FLAGS)
  string("workdir", "runs/default", "Output directory; reused to resume.")
  string("coordinator_address", None, "Multi-host: host:port of process 0 "
         "(or env JAX_COORDINATOR_ADDRESS; cluster launches auto-detect).")
  integer("num_processes", None, "Multi-host: number of processes (or env "
          "JAX_NUM_PROCESSES).")
  integer("process_id", None, "Multi-host: this process's id in "
          "[0, num_processes) (or env JAX_PROCESS_ID).")
  string("profile_steps", None, "A:B: write a jax.profiler trace of steps "
         "A..B into WORKDIR/profile.")
  flags.DEFINE_bool("compile_only", False, "Compile the run's train step and "
                    "report memory per device, FLOPs, step time and MFU; "
                    "exit 0 if it fits, 1 if not.")
  string("topology", None, "With --compile_only: the TPU slice to compile "
         "for on this host (e.g. v5p-64; needs libtpu).")


def router_names() -> tuple[str, ...]:
  """`--router`'s values: the registered methods and `dense` (no MoE)."""
  return routing.available() + ("dense",)


def config_help() -> str:
  """`--help`'s list of the config fields, by dataclass."""
  groups: dict[str, list[str]] = {}
  for path in overrides.field_paths(TrainConfig):
    prefix, _, name = path.rpartition(".")
    groups.setdefault(prefix or "(run)", []).append(name)
  lines = ["config fields (set any one with --PATH=VALUE or PATH=VALUE, "
           "applied after --config and before the flags above; e.g. "
           "--model.num_layers=24 model.moe.router=dtop_p "
           "model.moe.router.p_init=0.3):"]
  lines = textwrap.wrap(lines[0], 79)
  for prefix, names in groups.items():
    lines += textwrap.wrap(f"{prefix}: {', '.join(names)}", 79,
                           initial_indent="  ", subsequent_indent="      ")
  lines.append("  model.moe.router: a router name; model.moe.router.NAME: its "
               "fields")
  return "\n".join(lines)


def build_router(name: str, options: Mapping[str, Any]) -> routing.RouterMethod:
  if routing.resolve(name, options) not in routing.available():
    raise ValueError(f"router={name!r} is unknown; allowed: "
                     f"{', '.join(router_names())}")
  return routing.build(name, options)


def build_moe_config(values: Mapping[str, Any], k: int, num_experts: int,
                     expert_width: int) -> MoEConfig | None:
  """The MoE layer config of the flags alone (None for `--router=dense`;
  no `--router`: top_k), for models without a registry config (the DiT)."""
  router = values.get("router") or "top_k"
  _check_p(values)
  if router == "dense":
    return None
  method = build_router(router, dict(values, k=k))
  num_shared = values.get("num_shared")
  if num_shared is None:
    num_shared = method.default_num_shared
  return MoEConfig(num_experts=num_experts, expert_width=expert_width,
                   router=method, num_shared=num_shared,
                   **defaults.given(values, MOE_FLAGS))


def _check_p(values: Mapping[str, Any]) -> None:
  p = values.get("p")
  if p is not None and not 0 < p <= 1:
    raise ValueError(f"p={p} is out of range; allowed: (0, 1]")


def _router_fields(method: routing.RouterMethod) -> dict[str, Any]:
  return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
          if f.init}


def apply_moe_flags(moe: MoEConfig | None, values: Mapping[str, Any]
                    ) -> MoEConfig | None:
  """The config's MoE layer with the flags that are set: `--router` (dense:
  None), the router options, `--k`, the expert counts and widths and the
  MoE layer flags. The same method keeps its fields where no flag is set; a
  new method (or an MoE on a dense config) takes the flags, `k` and
  `num_shared` defaulting to the config's and the method's."""
  _check_p(values)
  router = values.get("router")
  if router == "dense":
    return None
  if moe is None and router is None:
    return None  # a dense config stays dense unless --router names one
  base = moe if moe is not None else MoEConfig()
  name = router or base.router.name
  k = values["k"] if values.get("k") is not None else base.router.k
  same = moe is not None and name == base.router.name
  options = {**(_router_fields(base.router) if same else {}),
             **{n: v for n, v in values.items() if v is not None}, "k": k}
  method = build_router(name, options)
  num_shared = values.get("num_shared")
  if num_shared is None:
    num_shared = base.num_shared if same else method.default_num_shared
  pick = lambda key: (getattr(base, key) if values.get(key) is None
                      else values[key])
  return dataclasses.replace(
      base, num_experts=pick("num_experts"), expert_width=pick("expert_width"),
      router=method, num_shared=num_shared,
      **defaults.given(values, MOE_FLAGS))


def apply_mod_flags(mod: MoDConfig | None, values: Mapping[str, Any]
                    ) -> MoDConfig | None:
  """The model's MoD config with the `--mod_*` flags that are set:
  `--mod_capacity=0` removes it, `--mod_capacity > 0` adds one (from the
  `MoDConfig` defaults) where the model has none; the other flags set its
  fields (on a model without MoD and no `--mod_capacity` they do nothing)."""
  capacity = values.get("mod_capacity")
  if capacity is not None:
    check_number("mod_capacity", capacity, 0, 1)
    if not capacity:
      return None
  options = {field: values[name] for name, (field, _) in MOD_FLAGS.items()
             if values.get(name) is not None}
  if mod is None:
    return MoDConfig(**options) if capacity else None
  return dataclasses.replace(mod, **options)


def build_train_config(values: Mapping[str, Any]) -> TrainConfig:
  """Builds the run's config from flag values (a dict of name -> value; a
  missing or None value keeps the config's): `--config`, then the dotted
  overrides (`--override`), then the flat flags."""
  cfg = configs.load(values.get("config") or "tiny")
  cfg = overrides.override(
      cfg, overrides.parse_assignments(values.get("override") or ()))
  given = lambda names: defaults.given(values, names)
  model = dataclasses.replace(
      cfg.model, moe=apply_moe_flags(cfg.model.moe, values),
      mod=apply_mod_flags(cfg.model.mod, values),
      **given((*SIZE_FLAGS.keys() - {"num_experts", "expert_width"},
               "moe_every", *LM_MODEL_FLAGS)))
  run = given(("batch_size", *RUN_FLAGS))
  if values.get("seq_len") is not None:
    run["seq_len"] = values["seq_len"]
    model = dataclasses.replace(model, max_len=values["seq_len"])
  optim = cfg.loop.optim
  if values.get("steps") is not None:
    current = {"learning_rate": optim.learning_rate,
               "warmup_steps": optim.warmup_steps}
    optim = build_optim(optim, lambda key: (
        values[key] if values.get(key) is not None else current[key]))
    run["steps"] = optim.total_steps
  else:
    changes = given(("learning_rate",))
    if values.get("warmup_steps") is not None:
      changes["warmup_steps"] = min(values["warmup_steps"], optim.total_steps)
    optim = dataclasses.replace(optim, **changes)
  loop = dataclasses.replace(
      cfg.loop, optim=optim,
      **{name: run.pop(name) for name in LOOP_FIELDS if name in run})
  return dataclasses.replace(cfg, model=model, loop=loop, **run)


def build_optim(base: OptimConfig, pick) -> OptimConfig:
  """`base` with the learning rate, warmup and length of `pick(flag name)`.

  `--steps` is checked here, so that its error names it (not the schedule
  fields it sets)."""
  steps = pick("steps")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps={steps!r} is out of range; allowed: integer >= 1")
  return dataclasses.replace(base, learning_rate=pick("learning_rate"),
                             warmup_steps=min(pick("warmup_steps"), steps),
                             total_steps=steps)


def compile_only(values: Mapping[str, Any]) -> int:
  """`--compile_only`: compiles the run's step (`moejax.aot.compile_report`)
  for `--topology` or the local devices and prints the report; 0 if it fits,
  1 if not, 2 after one line on bad input or without libtpu."""
  from moejax import aot  # pylint: disable=g-import-not-at-top
  try:
    cfg = build_train_config(values)
    report = aot.compile_report(cfg, values.get("topology"))
  except ValueError as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  except ImportError as e:
    sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
    return 2
  print(aot.format_report(report))
  return 1 if report["fits"] is False else 0


def run(flag_values) -> int:
  """Runs the job; returns the process exit code (2 on bad input)."""
  values = flag_values.flag_values_dict()
  try:
    from moejax import sharding  # multi-host: before jax touches devices
    sharding.maybe_initialize_distributed(values.get("coordinator_address"),
                                          values.get("num_processes"),
                                          values.get("process_id"))
  except ValueError as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  if values.get("compile_only"):
    return compile_only(values)
  if values.get("topology"):
    sys.stderr.write("error: topology is only used with --compile_only\n")
    return 2
  code, summary = app.train(lambda: build_train_config(values),
                            values["workdir"],
                            profile_steps=values.get("profile_steps"))
  if code:
    return code
  workdir = os.path.abspath(values["workdir"])
  unit = summary.get("loss_unit", "byte")  # per token with a tokenizer
  lines = [
      f"validation loss: {summary['eval_loss']:.4f} nats/{unit} "
      f"({summary['eval_loss'] / 0.6931471805599453:.3f} bits/{unit})",
  ]
  if summary["tokens_per_s"]:
    lines.append(f"throughput: {summary['tokens_per_s']:.0f} tokens/s over "
                 f"{summary['train_seconds']:.0f} s")
  if summary.get("resumed_from") is not None:
    lines.append(f"resumed from step {summary['resumed_from']}")
  if "sample" in summary:
    lines.append(f"sample: {summary['sample_note']}\n" + summary["sample"])
  lines += [f"metrics:     {summary['metrics']}",
            f"plot:        {summary['plot']}",
            f"checkpoints: {summary['checkpoints']}  (workdir {workdir})"]
  print("\n".join(lines))
  return 0
