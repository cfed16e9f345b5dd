"""Train-step throughput and MFU of an LM (dense or MoE) at a chosen size.

Axis legend:
  B  batch
  L  sequence length
  E  experts, k active, F expert width, D model width

Times one jit-compiled train step (forward, backward, AdamW update, controller
update) of `TransformerLM` on random tokens, after compilation and warm-up, for
each requested dispatch strategy, beside the dense model of the same active
FLOPs in the same process. FLOPs are counted from shapes (`moejax.flops`, train =
3 x forward); MFU = achieved FLOP/s / `--peak_tflops`.

  python experiments/bench_lm_step.py --preset=1b --dtype=bfloat16 \
      --strategies=gather,ragged --peak_tflops=989   # an H100/H200 (bf16 dense)
  python experiments/bench_lm_step.py --preset=1b --dense=false \
      --attention=xla,dot_product     # cuDNN flash attention against einsums
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags  # noqa: E402
import moejax  # noqa: F401,E402  (before jax: moejax.platforms)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import flops, routing  # noqa: E402
from moejax.experiment import timing  # noqa: E402
from moejax.models import LMConfig, TransformerLM  # noqa: E402
from moejax.nn import MoEConfig  # noqa: E402
from moejax.train import OptimConfig, create_train_state, make_train_step  # noqa: E402

# ~1.26B total parameters, ~0.2B active: 12 layers, D=1024, 16 experts of
# F=2048 with top-2 (active MLP width 4096 = the dense d_ff).
PRESETS = {
    "1b": dict(num_layers=12, d_model=1024, num_heads=16, d_ff=4096,
               num_experts=16, expert_width=2048, k=2, seq_len=1024, batch=16),
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, d_ff=256,
                 num_experts=8, expert_width=64, k=4, seq_len=64, batch=8),
}

flags.DEFINE_string("preset", "1b", "size: " + ", ".join(PRESETS))
flags.DEFINE_list("strategies", ["gather"], "MoE dispatch strategies to time")
flags.DEFINE_string("router", "top_k", "router method name")
flags.DEFINE_string("dtype", "bfloat16", "activation dtype")
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_float("peak_tflops", 0.0, "peak dense TFLOP/s for MFU (0 = none)")
flags.DEFINE_bool("dense", True, "also time the dense model")
flags.DEFINE_list("attention", ["xla"], "attention implementations to time "
                  "each model with (xla, dot_product, splash, auto); a model "
                  "with one other than xla is named MODEL+IMPL")
flags.DEFINE_string("out", "experiments/reports/bench_lm_step.json", "JSON path")
FLAGS = flags.FLAGS


def time_model(cfg: LMConfig, batch: int, seq_len: int) -> dict:
  model = TransformerLM(cfg)
  optim = OptimConfig(total_steps=1000)
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  variables = model.init({"params": jax.random.PRNGKey(0),
                          "router": jax.random.PRNGKey(0)}, tokens, train=False)
  state = create_train_state(variables["params"],
                             variables.get("router_state", {}),
                             optim.optimizer(), jax.random.PRNGKey(1))
  method = cfg.moe.router if cfg.moe is not None else None
  step = make_train_step(model, optim.optimizer(), method)
  rng = np.random.default_rng(0)
  batch_data = {
      "inputs": jnp.asarray(rng.integers(0, 256, (batch, seq_len)), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, 256, (batch, seq_len)), jnp.int32),
      "mask": jnp.ones((batch, seq_len), jnp.float32)}
  run = {"state": state}

  def advance():
    """One train step, carrying the state; its loss (to wait on)."""
    run["state"], run["metrics"] = step(run["state"], batch_data)
    return run["metrics"]["loss"]

  _, compile_s = timing.timed(advance)
  (step_s,) = timing.time_calls(advance, repeats=1, warmup=FLAGS.warmup,
                                calls=FLAGS.steps)
  state, metrics = run["state"], run["metrics"]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  train_flops = flops.train_flops(cfg, batch, seq_len)
  row = {"params": n_params, "compile_s": compile_s, "step_s": step_s,
         "tokens_per_s": batch * seq_len / step_s,
         "train_tflops_per_step": train_flops / 1e12,
         "achieved_tflops": train_flops / step_s / 1e12,
         "loss": float(metrics["loss"]),
         "drop_fraction": float(metrics.get("drop_fraction", 0.0))}
  if FLAGS.peak_tflops:
    row["mfu"] = row["achieved_tflops"] / FLAGS.peak_tflops
  return row


def main(argv):
  del argv
  p = PRESETS[FLAGS.preset]
  base = LMConfig(num_layers=p["num_layers"], d_model=p["d_model"],
                  num_heads=p["num_heads"], d_ff=p["d_ff"], max_len=p["seq_len"],
                  dtype=FLAGS.dtype)
  rows = []
  runs = [("dense", base)] if FLAGS.dense else []
  for strategy in FLAGS.strategies:
    moe = MoEConfig(num_experts=p["num_experts"], expert_width=p["expert_width"],
                    router=routing.build(FLAGS.router, {"k": p["k"]}),
                    strategy=strategy)
    runs.append((f"moe/{FLAGS.router}/{strategy}",
                 dataclasses.replace(base, moe=moe)))
  print(f"device: {jax.devices()[0].device_kind}  backend: {jax.default_backend()}"
        f"  jax {jax.__version__}  dtype {FLAGS.dtype}")
  header = (f"{'model':28s} {'params':>9s} {'compile s':>9s} {'step ms':>8s} "
            f"{'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'vs dense':>8s}")
  print(header)
  dense_step = None
  runs = [(name if impl == "xla" else f"{name}+{impl}",
           dataclasses.replace(cfg, attention=impl))
          for name, cfg in runs for impl in FLAGS.attention]
  for name, cfg in runs:
    row = {"model": name, "attention": cfg.attention,
           **time_model(cfg, p["batch"], p["seq_len"])}
    if name == "dense":
      dense_step = row["step_s"]
    if dense_step:
      row["step_vs_dense"] = row["step_s"] / dense_step
    rows.append(row)
    print(f"{name:28s} {row['params'] / 1e6:8.0f}M {row['compile_s']:9.1f} "
          f"{row['step_s'] * 1e3:8.1f} {row['tokens_per_s']:10.0f} "
          f"{row['achieved_tflops']:8.1f} {row.get('mfu', float('nan')):6.3f} "
          f"{row.get('step_vs_dense', float('nan')):8.2f}", flush=True)
    # Written after every model: a run cut short keeps the rows it has.
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"preset": FLAGS.preset, "shape": p, "dtype": FLAGS.dtype,
                 "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
