"""The one training loop: mesh, sharded init, batch placement, jitted steps,
eval cadence, checkpoints and resume, logs, summary; for any task.

Axis legend:
  B  global batch (each process feeds its rows of it)

`train(run, workdir)` trains a `Task` (`moejax.train.task`) or a run config
that names its task (`moejax.train.config.RunConfig`: the LM's `TrainConfig`,
the DiT's `DiTTrainConfig`). The task owns the model, data, loss, evaluation,
samples and plots; this module owns what every run shares and reads its
settings from the run config's `loop` (`LoopConfig`).

Throughput: each training record holds `tokens_per_s` (`rate_key`; over the
whole run so far), `tokens_per_s_per_device` (over the steps since the
previous record, the first step's compilation left out) and, where the
devices' peak is known (`moejax.flops.peak_flops`) and the task counts its
FLOPs, `mfu`; the progress bar shows them. The records also go to TensorBoard
event files in `workdir/tensorboard` (`moejax.train.metrics`).

Profiling: `train(..., profile_steps=(a, b))` writes a `jax.profiler` trace of
steps a..b (1-based, as logged) into `workdir/profile`.

Bad steps: a step whose loss or gradient is not finite changes nothing but
the step counter and the data position (`moejax.train.step`); the loop counts
them (`skipped_steps` in the log records), saves no periodic checkpoint right
after one, and after `max_bad_steps` consecutive ones stops with
`TrainingStopped`, leaving the last checkpoint (of a good step) as it was.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import flops as flops_lib
from moejax import sharding
from moejax.train import checkpoint as ckpt_lib
from moejax.train import config_file
from moejax.train import metrics as metrics_lib
from moejax.train.config import RunConfig
from moejax.train.state import TrainState
from moejax.train.step import make_train_step
from moejax.train.task import Task

class TrainingStopped(RuntimeError):
  """The run stopped early: too many consecutive non-finite steps."""


class _BadSteps:
  """Counts skipped (non-finite) steps from each step's `skipped` metric, read
  one step late (`add`) so that the host never waits for the step it has just
  dispatched; `resolve` reads the newest at once."""

  def __init__(self, limit: int):
    self.limit, self.total, self.streak = limit, 0, 0
    self._pending = None

  def add(self, skipped: jax.Array, step: int) -> None:
    self.resolve()
    self._pending = (skipped, step)

  def resolve(self) -> bool:
    """Reads the newest step's flag; True when that step was skipped."""
    if self._pending is None:
      return self.streak > 0
    skipped, step = self._pending
    self._pending = None
    if float(jax.device_get(skipped)):
      self.total += 1
      self.streak += 1
      if self.streak >= self.limit:
        raise TrainingStopped(
            f"stopped at step {step}: {self.streak} consecutive steps had a "
            f"non-finite loss, gradient or update (max_bad_steps={self.limit})")
    else:
      self.streak = 0
    return self.streak > 0


def routing_settings(method: Any) -> dict[str, Any]:
  """{"router": name, field: value, ...} of a routing method (dense: None)."""
  if method is None:
    return {"router": "dense"}
  return {"router": method.name, **{f.name: getattr(method, f.name)
                                    for f in dataclasses.fields(method)}}


def _say(progress, message: str) -> None:
  """One line for the user, above the progress bar when there is one."""
  if progress is not None:
    progress.write(message)
  else:
    print(message, flush=True)


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 8


def _cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
  """One jitted function per key among the last few used: a resumed or
  repeated run (same model and settings) reuses the compiled program."""
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  value = _CACHE[key] = build()
  if len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return value


# What the loop trains: a task, or a run config that names its task.
Run = Union[Task, RunConfig]


def as_task(run: Run) -> Task:
  """A task, or the task a run config names (`config.task()`)."""
  return run if isinstance(run, Task) else run.task()


def init_state(run: Run, model: nn.Module, rng: jax.Array) -> TrainState:
  """The initial (boxed) TrainState of a run: `model.init` on the task's
  example inputs, the optimizer state of its `loop.optim`, step and data
  index 0.

  Pure in `rng` (jit, `jax.eval_shape` and sharded `out_shardings` apply).
  """
  task = as_task(run)
  params_rng, state_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "router": params_rng},
                         *task.example_inputs(), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=task.config.loop.optim.optimizer().init(
                        params),
                    router_state=variables.get("router_state", {}),
                    rng=state_rng, data_index=jnp.zeros((), jnp.int32))


def state_shardings(run: Run, model: nn.Module, mesh) -> Any:
  """NamedShardings of every TrainState leaf on `mesh` (logical rules of
  `moejax.sharding`; optimizer moments follow their params), from shapes only."""
  abstract = jax.eval_shape(lambda rng: init_state(run, model, rng),
                            jax.random.PRNGKey(0))
  return sharding.train_state_shardings(abstract, mesh)


def build_state(run: Run, model: nn.Module, mesh) -> TrainState:
  """Initialises the state directly with its shardings (no single-device copy):
  one jit whose outputs are created sharded on `mesh`."""
  task = as_task(run)
  loop = task.config.loop
  inputs = tuple((x.shape, x.dtype) for x in
                 jax.eval_shape(task.example_inputs))
  jitted = _cached(
      ("init", model, loop.optim, inputs, mesh),
      lambda: jax.jit(lambda rng: init_state(task, model, rng),
                      out_shardings=state_shardings(task, model, mesh)))
  return nn.meta.unbox(jitted(jax.random.PRNGKey(loop.seed)))


def make_step(run: Run, model: nn.Module, mesh=None, donate: bool = True
              ) -> Callable:
  """Jitted `train_step(state, batch) -> (state, metrics)` of a run (the
  generic step with the task's loss); with `mesh`, the new state keeps the
  shardings of `build_state`."""
  task = as_task(run)
  loop = task.config.loop
  grad_accum = loop.grad_accum
  return _cached(
      ("train", model, loop.optim, task.step_key(), donate, mesh, grad_accum),
      lambda: make_train_step(
          model, loop.optim.optimizer(), task.method, loop.optim.schedule(),
          donate=donate, loss_fn=task.loss_fn(model),
          state_sharding=(None if mesh is None else
                          state_shardings(task, model, mesh)),
          grad_accum=grad_accum))


def make_eval(run: Run, model: nn.Module) -> Callable:
  """The task's jitted eval step (cached like `make_step`)."""
  task = as_task(run)
  return _cached(("eval", model, task.step_key()),
                 lambda: task.make_eval_step(model))


def select_devices(num_devices: int | None) -> list[Any]:
  """The first `num_devices` devices (all when None)."""
  devices = jax.devices()
  if num_devices is None:
    return devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices={num_devices} is out of range; "
                     f"allowed: [1, {len(devices)}]")
  return devices[:num_devices]


def _save_config(cfg: RunConfig, workdir: str, resumed_from: int | None) -> None:
  """Writes `workdir/config.json`; on a resumed run whose config differs
  from the saved one, says which fields changed first (one line)."""
  if resumed_from is not None and os.path.exists(config_file.path(workdir)):
    try:
      changed = config_file.changes(config_file.load(workdir), cfg)
    except ValueError:
      changed = ["config.json was unreadable"]
    if changed:
      print(f"note: resuming from step {resumed_from} with a changed "
            f"configuration: {'; '.join(changed)}", flush=True)
  config_file.save(cfg, workdir)


def _keep_stored_optim(cfg: RunConfig, workdir: str, resumed_from: int,
                       say: bool = True) -> RunConfig:
  """On a resume: `cfg` with the optimizer settings of `workdir/config.json`
  (the learning-rate schedule depends on `optim.total_steps`, so a resume with
  a larger `--steps` would otherwise change the rate at steps already
  trained). Says so in one line when they differ from `cfg`'s; steps past the
  stored schedule's end train at its final learning rate."""
  try:
    stored = getattr(getattr(config_file.load(workdir), "loop", None),
                     "optim", None)
  except (FileNotFoundError, ValueError):
    return cfg
  given = cfg.loop.optim
  if stored is None or type(stored) is not type(given) or stored == given:
    return cfg
  kept = "; ".join(
      f"optim.{f.name}: stored {getattr(stored, f.name)!r}, given "
      f"{getattr(given, f.name)!r}" for f in dataclasses.fields(stored)
      if getattr(stored, f.name) != getattr(given, f.name))
  past = ""
  if cfg.loop.steps > stored.total_steps:
    final = stored.learning_rate * stored.min_lr_ratio
    past = (f"; steps after {stored.total_steps} train at its final learning "
            f"rate {final:.3g}")
  if say:
    print(f"note: resuming from step {resumed_from} on the stored "
          f"learning-rate schedule and optimizer ({kept}){past}; a new "
          "--workdir starts another", flush=True)
  return dataclasses.replace(
      cfg, loop=dataclasses.replace(cfg.loop, optim=stored))


def _refuse_other_config(cfg: RunConfig, workdir: str) -> None:
  """When no checkpoint of `workdir` restores into this run's state and its
  `config.json` holds another configuration: a ValueError saying so (stored
  against new, first fields) and what to do. The checkpoints stay put."""
  try:
    changed = config_file.changes(config_file.load(workdir), cfg)
  except (FileNotFoundError, ValueError):
    return
  if changed:
    more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
    raise ValueError(
        f"workdir={workdir!r} holds a run of another configuration (stored -> "
        f"new: {'; '.join(changed[:4])}{more}); its checkpoints do not fit "
        "this run: use a new --workdir (or the stored configuration to "
        "resume)")


def _remaining(task: Task, per_step: float, done: int,
               evaluate: Callable[[], Any], compile_seconds: float) -> str:
  """The line announcing the rest of a run after step `done`: its training
  steps at `per_step` seconds, the evaluations still to come (one evaluation
  batch timed here with `evaluate`, after compiling it) and the task's
  outputs (`Task.output_seconds`; `compile_seconds`: the train step's)."""
  cfg = task.config.loop
  evaluate()  # compiles the evaluation step (a cost the run has anyway)
  t = time.perf_counter()
  evaluate()
  batch = time.perf_counter() - t
  evals = (cfg.steps - 1) // cfg.eval_every - done // cfg.eval_every + 1
  parts = {"training": per_step * (cfg.steps - done),
           f"{evals} evaluation{'s' if evals > 1 else ''}":
               evals * cfg.eval_batches * batch,
           "samples": task.output_seconds(batch, compile_seconds)}
  detail = ", ".join(f"{name} {seconds / 60:.1f}"
                     for name, seconds in parts.items() if seconds)
  return (f"about {sum(parts.values()) / 60:.1f} min remaining: {detail} "
          f"({per_step:.2f} s/step)")


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
  """`"A:B"` -> (A, B) with 1 <= A <= B (None or "" -> None)."""
  if not spec:
    return None
  parts = spec.split(":")
  try:
    a, b = (int(p) for p in parts) if len(parts) == 2 else (0, -1)
  except ValueError:
    a, b = 0, -1
  if not 1 <= a <= b:
    raise ValueError(f"profile_steps={spec!r} is invalid; allowed: A:B with "
                     "integers 1 <= A <= B (steps A..B are traced)")
  return a, b


class _Profile:
  """A `jax.profiler` trace of steps a..b into `directory` (1-based steps)."""

  def __init__(self, steps: tuple[int, int] | None, directory: str):
    self.steps, self.directory, self.active = steps, directory, False

  def before(self, step: int) -> None:
    """Called before running step `step` (1-based)."""
    if (self.steps and not self.active and
        self.steps[0] <= step <= self.steps[1]):
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    """Called after dispatching step `step`; ends the trace after step b."""
    if self.active and step >= self.steps[1]:
      self.stop(state)

  def stop(self, state: Any = None) -> None:
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False


class _Throughput:
  """Items per second per device and MFU over the steps since the last
  record (`record`); `restart` leaves out what came before (compilation)."""

  def __init__(self, task: Task, mesh):
    self.devices = mesh.devices.size
    self.peak = flops_lib.peak_flops(mesh.devices.flat[0].device_kind)
    flops = task.flops_per_step()
    self.flops_per_item = (flops / task.items_per_step() if flops else None)
    self.key = f"{task.rate_key}_per_device"
    self.restart()

  def restart(self) -> None:
    self.t, self.items = time.perf_counter(), 0

  def add(self, items: int) -> None:
    self.items += items

  def record(self) -> dict[str, float]:
    """{`<rate_key>_per_device`, `mfu` (where known)} since the last call."""
    now = time.perf_counter()
    out = {}
    if self.items and now > self.t:
      rate = self.items / (now - self.t) / self.devices
      out[self.key] = rate
      if self.peak and self.flops_per_item:
        out["mfu"] = rate * self.flops_per_item / self.peak
    self.t, self.items = now, 0
    return out


def postfix(record: dict[str, Any], loss_format: str, rate_key: str
            ) -> dict[str, str]:
  """The progress bar's fields of a training record: loss, items/s per
  device, MFU (those it has)."""
  out = {"loss": format(record["loss"], loss_format)}
  rate = record.get(f"{rate_key}_per_device")
  if rate is not None:
    unit = "tok" if rate_key == "tokens_per_s" else rate_key.split("_per_")[0]
    out[f"{unit}/s/dev"] = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"
  if record.get("mfu") is not None:
    out["mfu"] = f"{100 * record['mfu']:.1f}%"
  return out


def train(run: Run, workdir: str, *,
          profile_steps: tuple[int, int] | str | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes) a run and returns a summary dict.

  Writes `workdir/metrics.jsonl` (records `step`, `loss`, the routing metrics,
  the throughput; eval records `eval_loss`, ...; a final record with
  `final: true`; other processes of a multi-host run write
  `metrics.process<i>.jsonl`; the first record, `step` 0, holds the
  effective `routing` hyperparameters), `workdir/config.json` (the run's
  config, `moejax.train.config_file`), `workdir/tensorboard/` (the same
  records as TensorBoard scalars), `workdir/checkpoints/` (orbax; a
  second call with the same workdir resumes from the newest readable one, see
  `moejax.train.checkpoint`, on the stored optimizer settings and
  learning-rate schedule, `_keep_stored_optim`), `workdir/run.png`,
  `workdir/summary.json` and the task's samples. The summary also holds the
  final `state` and `skipped_steps`. `profile_steps` (A, B) or "A:B": trace
  steps A..B into `workdir/profile` (`parse_profile_steps`).

  Raises:
    ValueError: `workdir` is not a directory, the run does not fit the
      devices, or its newest checkpoint is past `steps`.
    CheckpointError: checkpoints exist but none is readable.
    TrainingStopped: `max_bad_steps` consecutive non-finite steps.
  """
  task = as_task(run)
  cfg = task.config
  loop = cfg.loop
  if isinstance(profile_steps, str) or profile_steps is None:
    profile_steps = parse_profile_steps(profile_steps)
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    blocker = os.path.abspath(workdir)
    while not os.path.exists(blocker):
      blocker = os.path.dirname(blocker)
    raise ValueError(f"workdir={workdir!r} is not a directory ({blocker!r} "
                     "is a file)") from None
  except OSError as e:  # e.g. a read-only or virtual file system, no access
    raise ValueError(f"workdir={workdir!r} cannot be created ({e.strerror}); "
                     "allowed: a writable directory") from None
  mesh = sharding.make_mesh(loop.mesh, select_devices(loop.num_devices))
  task.check(mesh)
  main = sharding.is_main_process()  # multi-host: process 0 logs and plots
  data = task.data()
  model = task.build_model()
  batch_sharding = sharding.batch_sharding(mesh)

  def put(batch):  # each process feeds its rows of the global batch
    return sharding.put_batch(batch, batch_sharding)

  # Data that can read a process's rows alone (`rows=`) reads only those.
  rows = (sharding.process_batch_rows(loop.batch_size, batch_sharding)
          if jax.process_count() > 1 and getattr(data, "reads_rows", False)
          else None)

  def train_batch(index):
    if rows is None:
      return put(data.batch(index))
    return sharding.put_batch(data.batch(index, rows=rows), batch_sharding,
                              local=True)

  with jax.set_mesh(mesh):
    state = build_state(task, model, mesh)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), loop.checkpoint_every,
        loop.keep_checkpoints)
    metrics_path = os.path.join(
        workdir, "metrics.jsonl" if main else
        f"metrics.process{jax.process_index()}.jsonl")
    try:
      state, resumed_from = checkpointer.restore_latest(state)
    except ckpt_lib.CheckpointError:
      _refuse_other_config(cfg, workdir)
      raise
    if resumed_from is not None and resumed_from > loop.steps:
      checkpointer.close()
      raise ValueError(
          f"steps={loop.steps} is below the step of the newest checkpoint in "
          f"workdir={workdir!r} ({resumed_from}); allowed: >= {resumed_from}, "
          "or a new --workdir")
    if resumed_from is not None:
      cfg = task.config = _keep_stored_optim(cfg, workdir, resumed_from,
                                            main)
      loop = cfg.loop
    if main:
      _save_config(cfg, workdir, resumed_from)
    task.start(workdir, data, resumed_from)
    if resumed_from is not None:
      metrics_lib.truncate_after(metrics_path, resumed_from)
    elif os.path.exists(metrics_path):
      os.remove(metrics_path)
    writer = metrics_lib.MetricsWriter(
        metrics_path, os.path.join(workdir, "tensorboard") if main else None,
        purge_step=None if resumed_from is None else resumed_from + 1)
    if resumed_from is None:
      writer.write({"step": 0, "routing": routing_settings(task.method)})
    train_step = make_step(task, model, mesh)
    eval_step = make_eval(task, model)

    def run_eval(batches=None):
      return task.evaluate(eval_step, state, (
          put(b) for b in data.eval_batches(batches or loop.eval_batches)))

    start = int(jax.device_get(state.step))
    data_index = int(jax.device_get(state.data_index))
    progress, progress_lines = None, False
    if loop.progress and main:
      if sys.stderr.isatty():
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        progress = tqdm(total=loop.steps, initial=start, desc=task.name,
                        dynamic_ncols=True)
      else:  # a log file: one plain line per logged step, not a redrawn bar
        progress_lines = True
    t0, items_seen = time.perf_counter(), 0
    bad, t_first = _BadSteps(loop.max_bad_steps), None
    throughput = _Throughput(task, mesh)
    profile = _Profile(profile_steps, os.path.join(workdir, "profile"))
    try:
      for step in range(start, loop.steps):
        profile.before(step + 1)
        state, metrics = train_step(state, train_batch(data_index))
        data_index += 1
        items_seen += task.items_per_step()
        throughput.add(task.items_per_step())
        done = step + 1
        profile.after(done, state)
        bad.add(metrics["skipped"], done)
        if done - start in (1, 11):  # the duration, from steps 2..11
          bad.resolve()  # waits for this step
          if done - start == 1:
            t_first = time.perf_counter()
            throughput.restart()  # without the compilation
          else:
            per_step = (time.perf_counter() - t_first) / 10
            t = time.perf_counter()
            estimate = _remaining(task, per_step, done, lambda: run_eval(1),
                                  max(t_first - t0 - per_step, 0.0))
            throughput.t += time.perf_counter() - t  # not the timed evaluation
            if main:
              _say(progress, estimate)
        if done % loop.log_every == 0 or done == loop.steps:
          bad.resolve()
          record = {"step": done, **jax.device_get(metrics),
                    "skipped_steps": bad.total}
          record[task.rate_key] = items_seen / (time.perf_counter() - t0)
          record.update(throughput.record())
          writer.write(record)
          if progress is not None:
            progress.set_postfix(postfix(record, task.loss_format,
                                         task.rate_key), refresh=False)
          elif progress_lines:
            fields = postfix(record, task.loss_format, task.rate_key)
            line = " ".join(f"{k}={v}" for k, v in fields.items())
            sys.stderr.write(f"{task.name}: step {done}/{loop.steps} {line}\n")
            sys.stderr.flush()
        if done % loop.eval_every == 0 and done != loop.steps:
          writer.write({"step": done, **run_eval()})
        if done % checkpointer.every == 0 and not bad.resolve():
          checkpointer.save(state)
        if progress is not None:
          progress.update(1)
      bad.resolve()
    except TrainingStopped as e:
      checkpointer.close()
      last = checkpointer.latest_step()
      message = (f"{e}; the last checkpoint is step {last}" if last is not None
                 else f"{e}; no checkpoint was saved")
      writer.write({"step": done, "stopped": message,
                    "skipped_steps": bad.total})
      writer.close()
      raise TrainingStopped(message) from None
    finally:
      profile.stop()
      if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - t0
    final = run_eval()
    checkpointer.save(state, force=True)
    checkpointer.close()

  final_extra, outputs = {}, {}
  if jax.process_count() == 1:
    final_extra, outputs = task.outputs(model, state, workdir)
  writer.write({"step": loop.steps, **final, **final_extra, "final": True})
  writer.close()
  method = task.method
  target = method.target_fanout if method is not None else None
  summary = {
      "eval_loss": final["eval_loss"], "steps": loop.steps,
      "resumed_from": resumed_from, "train_seconds": elapsed,
      "skipped_steps": bad.total,
      task.rate_key: items_seen / elapsed if items_seen else None,
      "metrics": metrics_path,
      "checkpoints": os.path.join(workdir, "checkpoints"),
      "plot": task.plot(metrics_lib.read_jsonl(metrics_path),
                        os.path.join(workdir, "run.png"), target)
              if main else None,
      "router": method.name if method is not None else "dense",
      "target_fanout": target, **final, **final_extra, **outputs}
  if main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(metrics_lib.to_python(summary), f, indent=1)
  summary["state"] = state
  return summary

