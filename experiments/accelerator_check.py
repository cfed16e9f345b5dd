"""One prepared accelerator check (one GPU such as an H100/H200), <= 9
minutes: two decisive training comparisons first, then the MoE layer against
the dense FFN, the ~1B LM train step and its attention implementations; JSON
+ a markdown table in OUT_DIR.

  experiments/accelerator_check.sh OUT_DIR            # on the accelerator
  experiments/accelerator_check.sh OUT_DIR --dry_run  # tiny sizes on a CPU

It needs only jax, flax, optax, orbax, chex and absl (no tensorflow-datasets:
the corpus is the `stdlib` bytes) and the project on PYTHONPATH (the .sh sets
it; nothing is installed). Axis legend (of the MoE sizes T x D x F x E x k):
  T  tokens, D model width, F expert width, E experts, k experts per token

Parts, ordered by value (a part that fails or runs out of its time is
recorded and the later ones still run); each prints its expected
device-minutes before it starts:
  1. `dtop_p`: DTop-p vs top-k (`compare_routers.py`) on the `small` preset,
     dropless, the library's PI defaults, the load-balance weight fixed before
     the run at 1e-2 for both arms (top-k's own weight), 1000 steps, seeds
     0-3: four processes at once on the one GPU (a `small` run does not fill
     it), each seed's two arms in one process; then the paired differences
     DTop-p - top-k with a paired t-test.
  2. `mod`: Mixture-of-Depths (12.5% capacity every other block) against the
     dense model of the same shape (D 512, 8 layers, 8 heads, F 2048, batch
     64 x 256 bytes) and two narrower dense models (D 384 and 256, F = 4 D),
     every run at the same training FLOPs (`--mod_flops`, default 5e14,
     counted by `moejax.flops`; steps = FLOPs / FLOPs per step), 2 seeds,
     two processes at once: does MoD match the best dense model of the same
     training FLOPs (the isoFLOP comparison)?
  3. `bench_moe.py`, top-k routing, strategies gather (+ batched matmul),
     dropless / sorted / ragged, index and einsum (einsum only at E <= 8), in
     bfloat16 and float32, at the three reference sizes and the two target
     sizes; ratio = MoE fwd+bwd / dense SwiGLU FFN of width k*F (equal active
     FLOPs) timed in the same rounds; TFLOP/s = the active FLOPs (18 T D k F
     for fwd+bwd) / time.
  4. `bench_lm_step.py --preset=1b` in bfloat16: the ~1B MoE (gather and
     ragged) and its dense equivalent: tokens/s and MFU against the device's
     dense bf16 peak.
  5. `attention`: the same ~1B MoE train step (gather) with
     `--attention=dot_product` (`jax.nn.dot_product_attention`, cuDNN flash
     attention: bf16, head width 64) against `xla` (einsums around
     materialised float32 scores): tokens/s of each.

How the device-minutes are estimated (no GPU was at hand to time these
parts; the numbers are extrapolated from the `small` runs of
experiments/reports/dtop_p.md on one H200: 600 steps in 11 s with a warm
compilation cache, 25-45 s with compilation, i.e. about 18 ms per step at
about 14 TFLOP/s achieved, launch-bound at this size):
  dtop_p  8 runs x 1000 steps x 25 ms (dropless: assumed 1.4x slower) =
          200 s of one stream; four processes overlap one another's launch
          overhead (assumed 2x): 100 s, + 2 compilations of about 30 s in
          each process (in parallel on the host's cores): about 2.7 minutes.
  mod     4 F of training per seed at about 70 TFLOP/s (D 512, 16k tokens
          per step: 17x the `small` step's FLOPs, assumed 5x its FLOP/s): at
          the default F = 5e14, 2 x 4 F / 7e13 = 57 s of GPU, + 4 compilations
          of about 25 s in each process: about 2.8 minutes. At F = 1e16, the
          scale the MoD comparison asks for, the GPU time alone is about 19
          minutes (8 x 1e16 / 7e13 s): more than the whole check; run it as
          `--parts=mod --mod_flops=1e16 --budget_s=1500` when a longer slot is
          available (a part that runs out of time keeps the runs it finished).
  moe     the five sizes at their shares: about 1.5 minutes.
  lm      about 1 minute.
  attention  two compilations and 12 steps each of the ~1B step: about 0.8
          minutes.
Together about 8.6 minutes of expected work. The default --budget_s, 470 s,
fits the 8-minute slot with its start-up; it is split in proportion to these
estimates, so each part runs to about 91% of its estimate at most, and a part
that overruns keeps the runs it finished (the parts come in order of value, so
a cut costs the least valuable results first).

The results (targets, paired differences, the markdown report):
`accelerator_results.py`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The results' side (targets, paired differences, records, the report).
if HERE not in sys.path:  # loaded by path (the tests), not run as a script
  sys.path.insert(0, HERE)
from accelerator_results import (  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
    PEAK_TFLOPS, TARGETS, load_json, load_records, markdown, moe_row, paired,
    peak_tflops, targets)

# name -> T x D x F x E x k. The reference sizes are bench_moe.py's default
# matrix; the targets are the accelerator targets' shapes (F = 8192 / 4 at
# E = 8, k = 2, and the fine-grained E = 64, k = 8 of the same active width).
SIZES = {
    "ref_e8": "4096x512x1024x8x2",
    "ref_e64": "4096x512x256x64x8",
    "ref_e128": "8192x256x128x128x8",
    "target_e8": "16384x2048x2048x8x2",
    "target_e64": "16384x2048x512x64x8",
}
# The dry run: the two target names at tiny sizes, bf16, one strategy.
DRY_SIZES = {
    "target_e8": "64x16x32x8x2",
    "target_e64": "64x16x8x16x4",
}
STRATEGIES = "gather,dropless,sorted,ragged,index,einsum"
DRY_STRATEGIES = "gather"

# The parts in order of value; the estimated device seconds of each (see the
# module docstring) and its share of --budget_s (its time limit).
PARTS = ("dtop_p", "mod", "moe", "lm", "attention")
EXPECTED_S = {"dtop_p": 160.0, "mod": 170.0, "moe": 90.0, "lm": 50.0,
              "attention": 45.0}

# Part 1: DTop-p vs top-k, fixed before the run.
DTOP_P_SEEDS = (0, 1, 2, 3)
DTOP_P_FLAGS = ["--config=small", "--steps=1000", "--strategy=dropless",
                "--load_balance_weight=0.01", "--eval_every=1000",
                "--eval_batches=16", "--log_every=10"]
DTOP_P_DRY_FLAGS = ["--config=tiny", "--steps=2", "--strategy=dropless",
                    "--load_balance_weight=0.01", "--eval_every=2",
                    "--eval_batches=1", "--batch_size=2", "--seq_len=16",
                    "--log_every=1", "--num_experts=4", "--k=2",
                    "--num_layers=1", "--d_model=32", "--num_heads=2",
                    "--d_ff=64", "--expert_width=32"]

# Part 2: MoD vs dense at equal training FLOPs. label -> LMConfig fields (dotted
# paths under `model`: "mod.capacity" adds the MoDConfig).
MOD_SHAPE = dict(num_layers=8, d_model=512, num_heads=8, d_ff=2048)
MOD_ARMS = {
    "dense_d512": dict(MOD_SHAPE),
    "mod_d512": dict(MOD_SHAPE, **{"mod.capacity": 0.125}, mod_every=2),
    "dense_d384": dict(MOD_SHAPE, d_model=384, d_ff=1536),
    "dense_d256": dict(MOD_SHAPE, d_model=256, d_ff=1024),
}
MOD_SEEDS = (0, 1)
MOD_BASE = dict(config="small", router="dense", batch_size=64, seq_len=256,
                warmup_steps=100, eval_batches=16, dtype="bfloat16")
# The dry run: two of the arms at toy sizes, one seed, a few steps.
MOD_DRY_ARMS = {
    "dense_d512": dict(num_layers=2, d_model=32, num_heads=2, d_ff=64),
    "mod_d512": dict(num_layers=2, d_model=32, num_heads=2, d_ff=64,
                     **{"mod.capacity": 0.25}, mod_every=2),
}
MOD_DRY_BASE = dict(config="tiny", router="dense", batch_size=2, seq_len=16,
                    warmup_steps=1, eval_batches=1, dtype="bfloat16")


def device_name() -> str:
  """The first GPU's name from nvidia-smi ('' when there is none)."""
  if not shutil.which("nvidia-smi"):
    return ""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name",
                          "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
  except (subprocess.SubprocessError, OSError):
    return ""
  return out.strip().splitlines()[0] if out.strip() else ""


def _env(extra: dict | None = None) -> dict:
  """The steps' environment: the project on PYTHONPATH, one device (no forced
  host devices inherited, e.g. from a test session)."""
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if "xla_force_host_platform_device_count" not in f)
  return dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=ROOT + os.pathsep +
              os.environ.get("PYTHONPATH", ""), **(extra or {}))


def run_steps(names: list[str], cmds: list[list[str]], budget: float,
              log_dir: str) -> list[dict]:
  """Runs the commands at once (each its own process and log) within one
  time limit; those still running at the limit are killed. With several,
  each process may use 1/n of the GPU memory (jax preallocates otherwise)."""
  extra = ({"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / len(cmds):.2f}"}
           if len(cmds) > 1 else {})
  t0 = time.perf_counter()
  procs = []
  for name, cmd in zip(names, cmds):
    log = open(os.path.join(log_dir, f"{name}.log"), "w")
    procs.append((name, cmd, log, subprocess.Popen(
        cmd, cwd=ROOT, env=_env(extra), stdout=log,
        stderr=subprocess.STDOUT)))
  out = []
  for name, cmd, log, proc in procs:
    try:
      rc = proc.wait(timeout=max(1.0, budget - (time.perf_counter() - t0)))
      timed_out = False
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      rc, timed_out = None, True
    log.close()
    seconds = time.perf_counter() - t0
    print(f"[{name}] rc={rc} {seconds:.0f} s{' TIMEOUT' if timed_out else ''}",
          flush=True)
    out.append({"name": name, "cmd": " ".join(cmd), "rc": rc,
                "seconds": seconds, "timed_out": timed_out,
                "log": os.path.relpath(log.name, log_dir)})
  return out


def run_step(name: str, cmd: list[str], budget: float, log_dir: str) -> dict:
  """Runs one step's command with a time limit; its output goes to a log."""
  return run_steps([name], [cmd], budget, log_dir)[0]


def mod_plan(arms: dict, base: dict, train_flops: float, dry: bool) -> list:
  """[(label, fields, steps, FLOPs per step)]: each arm's steps for the
  training FLOPs `train_flops` (dry: 2 steps)."""
  from moejax import flops  # pylint: disable=g-import-not-at-top
  from moejax.cli import lm_flags  # pylint: disable=g-import-not-at-top
  plan = []
  for label, fields in arms.items():
    cfg = with_model_fields(lm_flags.build_train_config(dict(base, steps=1)),
                            fields)
    per_step = flops.train_flops(cfg.model, cfg.batch_size, cfg.seq_len)
    steps = 2 if dry else max(1, round(train_flops / per_step))
    plan.append((label, fields, steps, per_step))
  return plan


def with_model_fields(cfg, fields: dict):
  """`cfg` with the model fields `fields` ({dotted path under model: value})."""
  from moejax import configs  # pylint: disable=g-import-not-at-top
  return configs.override(cfg, {f"model.{k}": v for k, v in fields.items()})


def mod_worker(spec_path: str) -> int:
  """Trains the runs of a JSON spec {"base", "runs": [{label, seed, fields,
  steps, workdir, record}]} one after another; writes each run's record."""
  from moejax import experiment  # pylint: disable=g-import-not-at-top
  from moejax.cli import lm_flags  # pylint: disable=g-import-not-at-top
  with open(spec_path) as f:
    spec = json.load(f)
  for run in spec["runs"]:
    values = dict(spec["base"], seed=run["seed"], steps=run["steps"],
                  eval_every=run["steps"], log_every=max(1, run["steps"] // 20),
                  checkpoint_every=10 ** 9, sample_tokens=0, progress=False)
    cfg = with_model_fields(lm_flags.build_train_config(values),
                            run["fields"])
    trained = experiment.train_record(cfg, run["workdir"])
    record = {"label": run["label"], "seed": run["seed"],
              "steps": run["steps"], "fields": run["fields"],
              "train_flops": run["train_flops"],
              "eval_loss": float(trained.summary["eval_loss"]),
              "tokens_per_s": trained.summary.get("tokens_per_s"),
              "wall_seconds": trained.wall_seconds}
    with open(run["record"], "w") as f:
      json.dump(record, f, indent=1)
    print(f"[{run['label']} s{run['seed']}] eval loss "
          f"{record['eval_loss']:.4f} in {record['wall_seconds']:.0f} s",
          flush=True)
  return 0


def part_dtop_p(py: str, out: str, dry: bool, budget: float,
                logs: str) -> tuple[list[dict], dict]:
  """DTop-p vs top-k: one process per seed at once, then the table."""
  cmp_out = os.path.join(out, "dtop_p")
  seeds = (0,) if dry else DTOP_P_SEEDS
  cmd = [py, "experiments/compare_routers.py",
         *(DTOP_P_DRY_FLAGS if dry else DTOP_P_FLAGS), "--runs=top_k;dtop_p",
         "--dtype=bfloat16", "--noplots", "--sample_tokens=0",
         "--checkpoint_every=100000",
         f"--workroot={os.path.join(out, 'dtop_p_runs')}", f"--out={cmp_out}"]
  steps = run_steps([f"dtop_p_s{s}" for s in seeds],
                    [cmd + [f"--seeds={s}"] for s in seeds],
                    budget - (30 if len(seeds) > 1 else 0), logs)
  if len(seeds) > 1:  # each process tabulated its own seed: all of them now
    steps.append(run_step("dtop_p_table", cmd + [
        "--seeds=" + ",".join(map(str, seeds)), "--aggregate_only"], 60, logs))
  rows = (load_json(os.path.join(cmp_out, "results.json")) or {}).get("rows", [])
  loss = {label: {r["seed"]: r["eval_loss"] for r in load_records(
      os.path.join(cmp_out, "records")) if r.get("label") == label
                  and r.get("eval_loss") is not None}
          for label in ("top_k", "dtop_p")}
  return steps, {"rows": rows, "paired": paired(loss["top_k"],
                                                loss["dtop_p"])}


def part_mod(py: str, out: str, dry: bool, budget: float, logs: str,
             train_flops: float) -> tuple[list[dict], dict]:
  """MoD vs dense at equal training FLOPs: one process per seed at once."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  arms, base = (MOD_DRY_ARMS, MOD_DRY_BASE) if dry else (MOD_ARMS, MOD_BASE)
  plan = mod_plan(arms, base, train_flops, dry)
  mod_dir = os.path.join(out, "mod")
  records = os.path.join(mod_dir, "records")
  os.makedirs(records, exist_ok=True)
  seeds = (0,) if dry else MOD_SEEDS
  names, cmds = [], []
  for seed in seeds:
    runs = [{"label": label, "seed": seed, "fields": fields, "steps": n,
             "train_flops": n * per_step,
             "workdir": os.path.join(out, "mod_runs", f"{label}_s{seed}"),
             "record": os.path.join(records, f"{label}_s{seed}.json")}
            for label, fields, n, per_step in plan]
    spec = os.path.join(mod_dir, f"spec_s{seed}.json")
    with open(spec, "w") as f:
      json.dump({"base": base, "runs": runs}, f, indent=1)
    names.append(f"mod_s{seed}")
    cmds.append([py, "experiments/accelerator_check.py",
                 f"--mod_worker={spec}"])
  steps = run_steps(names, cmds, budget, logs)
  recs = load_records(records)
  loss = {label: {r["seed"]: r["eval_loss"] for r in recs
                  if r["label"] == label} for label in arms}
  rows = []
  for label, fields, n, per_step in plan:
    vals = list(loss[label].values())
    mean = sum(vals) / len(vals) if vals else None
    std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
           if len(vals) > 1 else None)
    rows.append({"label": label, "fields": fields, "steps": n,
                 "train_flops": n * per_step, "seeds": sorted(loss[label]),
                 "eval_loss": [mean, std]})
  ref = "mod_d512"
  return steps, {"rows": rows, "train_flops": train_flops, "paired": {
      f"{ref} - {label}": paired(loss[label], loss[ref])
      for label in arms if label != ref}}


def part_moe(py: str, out: str, dry: bool, budget: float,
             logs: str) -> tuple[list[dict], list[dict]]:
  """MoE layer vs dense: one process per size on the accelerator (a size
  that runs out of time loses only itself), one for all in a dry run."""
  sizes = DRY_SIZES if dry else SIZES
  groups = [list(sizes)] if dry else [[n] for n in sizes]
  steps, moe = [], []
  for group in groups:
    label = "moe_" + ("all" if len(group) > 1 else group[0])
    path = os.path.join(out, f"{label}.json")
    cmd = [py, "experiments/bench_moe.py",
           "--sizes=" + ",".join(sizes[n] for n in group),
           f"--strategies={DRY_STRATEGIES if dry else STRATEGIES}",
           "--routers=top_k",
           f"--dtype={'bfloat16' if dry else 'bfloat16,float32'}",
           "--bf16_strategies=all",
           f"--repeats={2 if dry else 5}", "--warmup=1", "--meshes=",
           f"--out={path}"]  # one accelerator: no mesh rows
    steps.append(run_step(label, cmd, budget * len(group) / len(sizes), logs))
    by_size = {sizes[n]: n for n in group}
    for r in (load_json(path) or {}).get("rows", []):
      moe.append(moe_row(by_size.get(r["size"].replace(",", "x"), "?"), r))
  return steps, moe


def part_lm(py: str, out: str, dry: bool, budget: float, logs: str,
            peak: float) -> tuple[list[dict], dict]:
  """The ~1B MoE train step and its dense equivalent."""
  lm_path = os.path.join(out, "lm_step.json")
  cmd = [py, "experiments/bench_lm_step.py",
         f"--preset={'tiny' if dry else '1b'}", "--dtype=bfloat16",
         f"--strategies={'gather' if dry else 'gather,ragged'}",
         f"--steps={2 if dry else 10}",
         f"--warmup={1 if dry else 2}", f"--out={lm_path}"]
  if peak:
    cmd.append(f"--peak_tflops={peak}")
  return [run_step("lm_step", cmd, budget, logs)], load_json(lm_path) or {}


def part_attention(py: str, out: str, dry: bool, budget: float,
                   logs: str) -> tuple[list[dict], list[dict]]:
  """The ~1B MoE train step with dot_product attention against xla."""
  path = os.path.join(out, "attention_step.json")
  cmd = [py, "experiments/bench_lm_step.py",
         f"--preset={'tiny' if dry else '1b'}", "--dtype=bfloat16",
         "--strategies=gather", "--dense=false",
         "--attention=xla,dot_product", f"--steps={2 if dry else 10}",
         f"--warmup={1 if dry else 2}", f"--out={path}"]
  step = run_step("attention_step", cmd, budget, logs)
  return [step], (load_json(path) or {}).get("rows", [])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="output directory")
  parser.add_argument("--dry_run", action="store_true",
                      default=bool(os.environ.get("DRY_RUN")),
                      help="tiny sizes, a few steps, on any backend")
  parser.add_argument("--budget_s", type=float, default=470.0,
                      help="total seconds for the parts (each gets a share "
                      "in proportion to its expected time)")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help="comma-separated parts to run, in this order: "
                      + ", ".join(PARTS))
  parser.add_argument("--mod_flops", type=float, default=5e14,
                      help="training FLOPs of every run of the `mod` part")
  parser.add_argument("--mod_worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.mod_worker:
    if ROOT not in sys.path:
      sys.path.insert(0, ROOT)
    return mod_worker(args.mod_worker)
  if not args.out:
    parser.error("--out is required")
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  bad = [p for p in parts if p not in PARTS]
  if bad or not parts:
    parser.error(f"--parts={args.parts!r} is not supported; allowed: a "
                 f"comma-separated subset of {', '.join(PARTS)}")
  if not args.mod_flops > 0:
    parser.error(f"--mod_flops={args.mod_flops} is out of range; allowed: > 0")
  out = os.path.abspath(args.out)
  logs = os.path.join(out, "logs")
  os.makedirs(logs, exist_ok=True)
  py, dry = sys.executable, args.dry_run
  name = device_name()
  peak = peak_tflops(name)
  start = time.perf_counter()
  total = sum(EXPECTED_S[p] for p in parts)
  print(f"accelerator check: parts {', '.join(parts)}; expected about "
        f"{total / 60:.1f} device-minutes on one H100/H200, limit "
        f"{args.budget_s:.0f} s{' (DRY RUN)' if dry else ''}", flush=True)
  steps, moe, lm_result, dtop_p, mod, attention = [], [], {}, {}, {}, []
  for part in parts:
    budget = args.budget_s * EXPECTED_S[part] / total
    print(f"== part {part}: expected about {EXPECTED_S[part] / 60:.1f} "
          f"device-minutes, limit {budget:.0f} s", flush=True)
    if part == "dtop_p":
      done, dtop_p = part_dtop_p(py, out, dry, budget, logs)
    elif part == "mod":
      done, mod = part_mod(py, out, dry, budget, logs, args.mod_flops)
    elif part == "moe":
      done, moe = part_moe(py, out, dry, budget, logs)
    elif part == "attention":
      done, attention = part_attention(py, out, dry, budget, logs)
    else:
      done, lm_result = part_lm(py, out, dry, budget, logs, peak)
    steps += done
  lm = lm_result.get("rows", [])
  result = {"device": name, "device_kind": lm_result.get("device", "?"),
            "dry_run": dry, "peak_tflops": peak, "jax": lm_result.get("jax"),
            "parts": parts, "wall_s": time.perf_counter() - start,
            "sizes": DRY_SIZES if dry else SIZES,
            "targets": targets(moe, lm), "moe_layer": moe,
            "lm_step": lm, "attention_step": attention, "dtop_p": dtop_p,
            "mod": mod, "steps": steps}
  with open(os.path.join(out, "accelerator_check.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, "accelerator_check.md"), "w") as f:
    f.write(markdown(result))
  print(markdown(result))
  return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
  sys.exit(main())
