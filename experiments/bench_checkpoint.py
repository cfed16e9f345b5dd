"""Train-step time with and without checkpoints: none, synchronous and
asynchronous orbax saves (`moejax.train.checkpoint.Checkpointer`).

  python experiments/bench_checkpoint.py --config=tiny --batch_size=4 \
      --seq_len=64 --steps=20 --every=5 --rounds=3

One device. Each mode runs the same jitted, donating train step of a preset
on synthetic tokens, saving the whole `TrainState` every `--every` steps the
way the training loop does (`save` after the due step, no wait for the
write), for `--steps`
timed steps after a warm-up; the modes take turns for `--rounds` rounds
(the machine's load drifts, turns spread it over the modes) and the table
shows medians. Per mode: the time per step (the steps' wall time, saves
included, up to the last step's result; the last write's drain at `close`
separately), the time `save` blocked the loop per save, and the overhead
per step against no checkpoints. Writes a table and JSON (default
experiments/reports/bench_checkpoint.json).
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import absl.logging  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "A config of the registry "
                    "(moejax.configs).")
flags.DEFINE_integer("batch_size", None, "Global batch (default: preset).")
flags.DEFINE_integer("seq_len", None, "Sequence length (default: preset).")
flags.DEFINE_integer("steps", 30, "Timed steps per mode and round.")
flags.DEFINE_integer("every", 5, "Save every n steps.")
flags.DEFINE_integer("rounds", 3, "Rounds (the modes take turns).")
flags.DEFINE_list("modes", ["none", "sync", "async"], "Checkpoint modes.")
flags.DEFINE_string("dir", "", "Checkpoint directory (default: a temporary "
                    "one, removed at the end).")
flags.DEFINE_string("out", "experiments/reports/bench_checkpoint.json",
                    "JSON output path ('' = none).")

MODES = ("none", "sync", "async")


def build_config(name: str, batch_size: int | None, seq_len: int | None):
  """The registry's config `name` on one device, batch and length
  overridden."""
  import dataclasses
  from moejax import configs
  cfg = configs.get(name)
  return dataclasses.replace(cfg, batch_size=batch_size or cfg.batch_size,
                             seq_len=seq_len or cfg.seq_len, num_devices=1,
                             mesh=None)


def run_mode(mode: str, cfg, state, step_fn, batch, directory: str) -> tuple:
  """(state, record) after `FLAGS.steps` steps saving in `mode`."""
  import jax
  from moejax.train.checkpoint import Checkpointer
  checkpointer = None
  if mode != "none":
    path = os.path.join(directory, f"{mode}_{time.time_ns()}")
    checkpointer = Checkpointer(path, every=FLAGS.every, keep=2,
                                async_save=(mode == "async"))
  saves, blocked = 0, 0.0
  t0 = time.perf_counter()
  for i in range(FLAGS.steps):
    state, metrics = step_fn(state, batch)
    if (i + 1) % FLAGS.every == 0:
      # The loop reads the due step's flags before saving (every mode waits
      # here alike), then `save` copies the state off the device (async) or
      # writes it (sync): the time the loop is blocked by the checkpoint.
      jax.block_until_ready(metrics["loss"])
      if checkpointer is not None:
        t1 = time.perf_counter()
        if checkpointer.save(state, force=True):
          saves += 1
        blocked += time.perf_counter() - t1
  jax.block_until_ready(metrics["loss"])
  steps_s = time.perf_counter() - t0
  drain = 0.0
  if checkpointer is not None:
    t1 = time.perf_counter()
    checkpointer.close()
    drain = time.perf_counter() - t1
    shutil.rmtree(checkpointer.directory, ignore_errors=True)
  return state, {"mode": mode, "step_ms": steps_s / FLAGS.steps * 1e3,
                 "saves": saves,
                 "save_blocked_ms": blocked / saves * 1e3 if saves else 0.0,
                 "close_drain_ms": drain * 1e3}


def main(argv):
  del argv
  absl.logging.set_verbosity(absl.logging.WARNING)  # orbax logs each save
  unknown = [m for m in FLAGS.modes if m not in MODES]
  if unknown:
    raise ValueError(f"modes={unknown} unknown; allowed: {', '.join(MODES)}")
  import jax
  import numpy as np
  from moejax import sharding
  from moejax.models.lm import TransformerLM
  from moejax.train.loop import build_state, make_step

  cfg = build_config(FLAGS.config, FLAGS.batch_size, FLAGS.seq_len)
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  model = TransformerLM(cfg.model)
  tokens = np.random.default_rng(0).integers(
      0, 256, (cfg.batch_size, cfg.seq_len + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32),
           "targets": tokens[:, 1:].astype(np.int32),
           "mask": np.ones((cfg.batch_size, cfg.seq_len), np.float32)}
  directory = FLAGS.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
  with jax.set_mesh(mesh):
    state = build_state(cfg, model, mesh)
    step_fn = make_step(cfg, model, mesh)  # donates the state, as the loop
    batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    for _ in range(2):  # compile and warm up
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics["loss"])
    records = []
    for r in range(FLAGS.rounds):
      for mode in FLAGS.modes:
        state, record = run_mode(mode, cfg, state, step_fn, batch, directory)
        records.append({"round": r, **record})
        print(f"round {r} {mode}: {record['step_ms']:.1f} ms/step, save "
              f"blocked {record['save_blocked_ms']:.1f} ms x "
              f"{record['saves']}, drain {record['close_drain_ms']:.1f} ms",
              flush=True)
  if not FLAGS.dir:
    shutil.rmtree(directory, ignore_errors=True)

  summary = []
  base = None
  for mode in FLAGS.modes:
    rows = [r for r in records if r["mode"] == mode]
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("step_ms", "save_blocked_ms", "close_drain_ms")}
    if mode == "none":
      base = med["step_ms"]
    summary.append({"mode": mode, **med, "saves_per_round": rows[0]["saves"]})
  for row in summary:
    row["overhead_ms_per_step"] = (row["step_ms"] - base
                                   if base is not None else None)
  header = ("| checkpoints | ms / step | overhead ms / step | save blocks the "
            "loop, ms | last write drained at close, ms |")
  lines = [header, "| --- | --- | --- | --- | --- |"]
  for row in summary:
    over = row["overhead_ms_per_step"]
    lines.append(
        f"| {row['mode']} | {row['step_ms']:.1f} | "
        f"{'-' if over is None or row['mode'] == 'none' else f'{over:+.1f}'}"
        f" | {row['save_blocked_ms']:.1f} | {row['close_drain_ms']:.1f} |")
  table = "\n".join(lines)
  print(f"\n{FLAGS.config} (batch {cfg.batch_size} x {cfg.seq_len}): state "
        f"{state_mb:.1f} MB, a save every "
        f"{FLAGS.every} steps, {FLAGS.steps} steps x {FLAGS.rounds} rounds "
        f"(medians)\n")
  print(table)
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"config": FLAGS.config, "batch_size": cfg.batch_size,
                 "seq_len": cfg.seq_len, "state_mb": state_mb,
                 "every": FLAGS.every, "steps": FLAGS.steps,
                 "rounds": FLAGS.rounds, "jax": jax.__version__,
                 "summary": summary, "records": records, "table": table}, f,
                indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
