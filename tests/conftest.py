"""Test setup: 8 forced host devices (set before jax is imported), quiet logs,
and one persistent compilation cache for the whole session.

The cache: most of the suite's time is XLA compiling small programs (a tiny
model's steps, and the op-by-op programs of eager code), and the same programs
recur across tests, xdist workers and the subprocesses that the CLI, notebook
and multi-host tests start. The session's first process makes a temporary
cache directory and exports it (with no minimum compile time or size), so every
later process inherits it; the process that made it removes it at exit. Set
`JAX_COMPILATION_CACHE_DIR` yourself to keep or share a cache between runs.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="moejax-tests-jax-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import absl.logging  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

absl.logging.set_verbosity(absl.logging.WARNING)
if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # also if jax came in earlier
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
      os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1)))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(
      os.environ.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", 0)))


@pytest.fixture
def train_and_resume(tmp_path):
  """Trains an LM config for 4 steps (checkpoints at steps 2 and 4), then resumes
  a copy of that run whose step-4 checkpoint is removed.

  Returns a function of the model config -> (the full run's final state, the
  resumed run's summary); the resumed run is checked to restart at step 2
  (its compiled steps come from the session's compilation cache).
  """

  def run(model):
    from moejax.tasks.lm import TrainConfig
    from moejax.train.loop import train
    from moejax.train.state import OptimConfig
    cfg = TrainConfig(
        model=model,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=1, total_steps=4),
        batch_size=4, seq_len=16, steps=4, log_every=2, eval_every=100,
        eval_batches=1, checkpoint_every=2, sample_tokens=0, progress=False,
        num_devices=1)
    full = str(tmp_path / "full")
    ref = train(cfg, full)["state"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    summary = train(cfg, resumed)
    assert summary["resumed_from"] == 2
    return ref, summary
  return run
