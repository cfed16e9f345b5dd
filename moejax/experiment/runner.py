"""The run loop of the experiment drivers: flags, workdirs, records, reuse.

A driver trains every (run, seed) of a grid through `moejax.train` (as
`experiments/train_lm.py` does), each in `WORKROOT/LABEL_sSEED` (a finished
run is reused by the training loop, an interrupted one resumes), and keeps one
JSON record per (run, seed) under its results directory so that a rerun skips
the runs already recorded. Runs go seed-major (every run of the first seed
first), so an interrupted comparison still has every run once.

Axis legend: none (configuration and JSON records).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import flags

from moejax.experiment.specs import parse_seeds


def define_flags(*, out: str, workroot: str, seeds: str = "0,1",
                 compile_cache: Optional[str] = None,
                 compile_cache_name: str = "compile_cache",
                 seeds_help: str = "Comma-separated seeds; each run per seed."
                 ) -> tuple[str, ...]:
  """Defines the flags every driver shares; returns their names.

  Args:
    out: default results directory (`--out`).
    workroot: default root of the run workdirs (`--workroot`).
    seeds: default `--seeds`.
    compile_cache: default persistent JAX compilation cache directory.
    compile_cache_name: the flag's name (older drivers spell it
      `compilation_cache`).
    seeds_help: help text of `--seeds`.

  Returns:
    The names of the flags defined here (not flags of the training runs).
  """
  flags.DEFINE_string("seeds", seeds, seeds_help)
  flags.DEFINE_string("out", out, "Results directory.")
  flags.DEFINE_string("workroot", workroot, "Root of the run workdirs.")
  flags.DEFINE_string(compile_cache_name, compile_cache,
                      "Persistent JAX compilation cache directory (the seeds "
                      "of one run share compiled programs; '' = none).")
  return ("seeds", "out", "workroot", compile_cache_name)


def base_values(own: Sequence[str]) -> dict[str, Any]:
  """The parsed flag values minus the driver's own flags: the base of every
  training run."""
  return {k: v for k, v in flags.FLAGS.flag_values_dict().items()
          if k not in own}


def start(argv: Sequence[str], own: Sequence[str]) -> dict[str, Any]:
  """The common opening of a driver's `main`.

  Rejects positional arguments, logs warnings only, turns on the compilation
  cache named by the driver's compile-cache flag, and returns the base flag
  values of every training run (`base_values(own)`) with the progress bar off
  unless `--progress` was given.
  """
  from absl import app, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  for name in ("compile_cache", "compilation_cache"):
    if name in own:
      use_compile_cache(flags.FLAGS[name].value)
  base = base_values(own)
  if "progress" in flags.FLAGS and not flags.FLAGS["progress"].present:
    base["progress"] = False
  return base


def seeds_flag() -> list[int]:
  """The parsed `--seeds`."""
  return parse_seeds(flags.FLAGS.seeds)


def use_compile_cache(path: Optional[str]) -> None:
  """Turns on JAX's persistent compilation cache in `path` (None/'' = off)."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", path)
  for key, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                     ("jax_persistent_cache_min_entry_size_bytes", 0)):
    try:
      jax.config.update(key, value)
    except (AttributeError, KeyError, ValueError):  # option of another jax
      pass


def load_module(path: str):
  """Imports the Python file at `path` (e.g. a config file, or a script of
  `experiments/`, which is not a package) as a module named after the file,
  registered in `sys.modules` as an import would (dataclasses need their
  module there)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"path={path!r} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """One training run of a driver, trained to its end.

  Attributes:
    config: its `TrainConfig`.
    workdir: where it trained.
    summary: the training loop's summary (`state`, `eval_loss`,
      `tokens_per_s`, `train_seconds`, `resumed_from`, `metrics`: the path of
      its `metrics.jsonl`).
    wall_seconds: wall time of the call (a reused finished run: loading).
    log: the rows of its `metrics.jsonl`.
  """
  config: Any
  workdir: str
  summary: dict[str, Any]
  wall_seconds: float
  log: list[dict[str, Any]]

  def history(self, keys: Sequence[str] = (), *,
              prefixes: tuple[str, ...] = (), fill: bool = False
              ) -> list[dict[str, Any]]:
    """`history(self.log, ...)`."""
    return history(self.log, keys, prefixes=prefixes, fill=fill)


def train_record(config: Any, workdir: str) -> TrainedRun:
  """Trains `config` in `workdir` through `moejax.train` (a finished run is
  reused, an interrupted one resumes), timed, with its metrics log read."""
  from moejax.train.loop import train  # pylint: disable=g-import-not-at-top
  from moejax.train.metrics import read_jsonl  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  summary = train(config, workdir)
  wall = time.perf_counter() - start
  return TrainedRun(config, workdir, summary, wall,
                    read_jsonl(summary["metrics"]))


def history(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = (), *,
            prefixes: tuple[str, ...] = (), fill: bool = False
            ) -> list[dict[str, Any]]:
  """The logged rows cut to what a record keeps.

  Args:
    rows: metrics-log rows.
    keys: names kept, in this order (those a row has; with `fill` every one,
      None where missing).
    prefixes: also keep every name that starts with one of these; the row's
      own order is kept then (`keys` and prefixed names as they come).
    fill: see `keys`.
  """
  if prefixes:
    return [{k: v for k, v in r.items() if k in keys or k.startswith(prefixes)}
            for r in rows]
  if fill:
    return [{k: r.get(k) for k in keys} for r in rows]
  return [{k: r[k] for k in keys if k in r} for r in rows]


def run_name(label: str, seed: int) -> str:
  """`LABEL_sSEED`: the workdir and record name of one (run, seed)."""
  return f"{label}_s{seed}"


def workdir(workroot: str, label: str, seed: int) -> str:
  """`WORKROOT/LABEL_sSEED`."""
  return os.path.join(workroot, run_name(label, seed))


def record_path(directory: str, label: str, seed: int) -> str:
  """`DIRECTORY/LABEL_sSEED.json`: the JSON record of one (run, seed)."""
  return os.path.join(directory, run_name(label, seed) + ".json")


def save_json(path: str, record: Any, indent: Optional[int] = None) -> None:
  """Writes `record` as JSON, creating the directory."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=indent)


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def load_records(directory: str) -> list[dict[str, Any]]:
  """Every `*.json` record under `directory`, by file name."""
  if not os.path.isdir(directory):
    return []
  return [load_json(os.path.join(directory, name))
          for name in sorted(os.listdir(directory)) if name.endswith(".json")]


def finished(path: str) -> Optional[dict[str, Any]]:
  """The record at `path` if it exists and is not a failed run's."""
  if not os.path.exists(path):
    return None
  record = load_json(path)
  return None if "error" in record else record


def run_grid(labels: Sequence[str], seeds: Sequence[int],
             record_path: Callable[[str, int], str],
             run: Callable[[str, int], dict[str, Any]], *,
             train: bool = True, keep_going: bool = False,
             indent: Optional[int] = None,
             error_record: Optional[Callable[[str, int, str], dict]] = None,
             log: Callable[[str], None] = lambda s: print(s, flush=True)
             ) -> list[dict[str, Any]]:
  """Runs every (label, seed), seed-major, skipping the recorded ones.

  Args:
    labels: run labels in order.
    seeds: seeds in order.
    record_path: `(label, seed) -> path` of the run's JSON record.
    run: `(label, seed) -> record`; trains and evaluates one run.
    train: False = train nothing: collect the records already there (missing
      runs skipped).
    keep_going: record a failed run (`{"error": ...}`) and go on; a failed
      record is retried on the next call.
    indent: JSON indent of the records.
    error_record: `(label, seed, message) -> record` of a failed run; default
      `{"label", "seed", "error"}`.
    log: progress printer.

  Returns:
    The records (failed ones included) in the order run.
  """
  results = []
  for seed in seeds:
    for label in labels:
      path = record_path(label, seed)
      done = finished(path)
      if done is not None:
        log(f"{label} seed {seed}: reusing {path}")
        results.append(done)
        continue
      if not train:
        log(f"{label} seed {seed}: missing, skipped")
        continue
      log(f"{label} seed {seed}: training ...")
      t0 = time.perf_counter()
      try:
        record = run(label, seed)
      except Exception as e:  # pylint: disable=broad-except
        if not keep_going:
          raise
        message = f"{type(e).__name__}: {e}"
        record = (error_record(label, seed, message) if error_record else
                  {"label": label, "seed": seed, "error": message})
        log(f"  failed: {message}")
      else:
        log(f"  done in {time.perf_counter() - t0:.0f} s")
      save_json(path, record, indent)
      results.append(record)
  return results
