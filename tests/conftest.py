"""Test setup: 8 forced host devices (set before jax is imported), quiet logs."""
import os
import shutil

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import absl.logging  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

absl.logging.set_verbosity(absl.logging.WARNING)


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent compilation cache, so the resumed run reuses compiled steps."""
  try:
    from jax._src import compilation_cache as cc
  except ImportError:  # private module moved: the test only runs slower
    yield
    return
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(tmp_path / "jax_cache"), 0, 0)):
    jax.config.update(k, v)
  cc.reset_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()


@pytest.fixture
def train_and_resume(tmp_path, compilation_cache):
  """Trains an LM config for 4 steps (checkpoints at steps 2 and 4), then resumes
  a copy of that run whose step-4 checkpoint is removed.

  Returns a function of the model config -> (the full run's final state, the
  resumed run's summary); the resumed run is checked to restart at step 2.
  """
  del compilation_cache  # only needs to be active

  def run(model):
    from moejax.train.loop import TrainConfig, train
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
