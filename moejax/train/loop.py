"""The training loop: data, sharded init, jit steps, eval, checkpoints, logs.

Axis legend:
  B  batch
  L  sequence length
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax.data import get_lm_data
from moejax.models.lm import LMConfig, TransformerLM
from moejax.sample import sample
from moejax.train import checkpoint as ckpt_lib
from moejax.train import metrics as metrics_lib
from moejax.train.state import OptimConfig, TrainState
from moejax.train.step import evaluate, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One LM training run. Every count must be >= 1 (except those noted)."""
  model: LMConfig = dataclasses.field(default_factory=LMConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  dataset: str = "stdlib"
  data_dir: str | None = None
  batch_size: int = 16
  seq_len: int = 128
  steps: int = 500
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  mesh: str | None = None
  num_devices: int | None = None  # use the first n devices (None = all)
  sample_tokens: int = 160
  sample_prompt: str = "def "
  temperature: float = 0.0
  progress: bool = True

  def __post_init__(self):
    for name in ("batch_size", "seq_len", "steps", "log_every", "eval_every",
                 "eval_batches", "checkpoint_every", "keep_checkpoints"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is out of range; allowed: "
                         "integer >= 1")
    if self.seq_len > self.model.max_len:
      raise ValueError(f"seq_len={self.seq_len} exceeds model max_len="
                       f"{self.model.max_len}")
    if self.sample_tokens < 0:
      raise ValueError(f"sample_tokens={self.sample_tokens} is out of range; "
                       "allowed: >= 0")


def _state_init_fn(cfg: TrainConfig, model: nn.Module):
  """rng -> the initial (boxed) TrainState."""
  optimizer = cfg.optim.optimizer()
  tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "router": params_rng},
                           tokens, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      router_state=variables.get("router_state", {}),
                      rng=state_rng, data_index=jnp.zeros((), jnp.int32))
  return init


def state_shardings(cfg: TrainConfig, model: nn.Module, mesh) -> Any:
  """NamedShardings of every TrainState leaf on `mesh` (logical rules of
  `moejax.sharding`; optimizer moments follow their params), from shapes only."""
  abstract = jax.eval_shape(_state_init_fn(cfg, model),
                            jax.random.PRNGKey(cfg.seed))
  return sharding.param_shardings(abstract, mesh)


def build_state(cfg: TrainConfig, model: nn.Module, mesh) -> TrainState:
  """Initialises the state directly with its shardings (no single-device copy):
  one jit whose outputs are created sharded on `mesh`."""
  init = _state_init_fn(cfg, model)
  state = jax.jit(init, out_shardings=state_shardings(cfg, model, mesh))(
      jax.random.PRNGKey(cfg.seed))
  return nn.meta.unbox(state)


def train(cfg: TrainConfig, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) and returns a summary dict.

  Writes `workdir/metrics.jsonl`, `workdir/checkpoints/`, `workdir/run.png`.
  """
  os.makedirs(workdir, exist_ok=True)
  devices = jax.devices()
  if cfg.num_devices is not None:
    if not 1 <= cfg.num_devices <= len(devices):
      raise ValueError(f"num_devices={cfg.num_devices} is out of range; "
                       f"allowed: [1, {len(devices)}]")
    devices = devices[:cfg.num_devices]
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.batch_size, mesh)
  sharding.check_model(cfg.model, mesh)
  main = sharding.is_main_process()  # multi-host: process 0 logs and plots
  data = get_lm_data(cfg.dataset, seq_len=cfg.seq_len,
                     batch_size=cfg.batch_size, seed=cfg.seed,
                     data_dir=cfg.data_dir)
  model = TransformerLM(cfg.model)
  method = cfg.model.moe.router if cfg.model.moe is not None else None
  optimizer = cfg.optim.optimizer()
  batch_sharding = sharding.batch_sharding(mesh)

  with jax.set_mesh(mesh):
    state = build_state(cfg, model, mesh)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), cfg.checkpoint_every,
        cfg.keep_checkpoints)
    metrics_path = os.path.join(
        workdir, "metrics.jsonl" if main else
        f"metrics.process{jax.process_index()}.jsonl")
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
      state = checkpointer.restore(state, resumed_from)
      metrics_lib.truncate_after(metrics_path, resumed_from)
    elif os.path.exists(metrics_path):
      os.remove(metrics_path)
    writer = metrics_lib.MetricsWriter(metrics_path)
    train_step = make_train_step(
        model, optimizer, method, cfg.optim.schedule(),
        state_sharding=state_shardings(cfg, model, mesh))
    eval_step = make_eval_step(model)

    def put(batch):  # each process feeds its rows of the global batch
      return sharding.put_batch(batch, batch_sharding)

    def run_eval():
      return evaluate(eval_step, state,
                      (put(b) for b in data.eval_batches(cfg.eval_batches)))

    start = int(jax.device_get(state.step))
    data_index = int(jax.device_get(state.data_index))
    progress = None
    if cfg.progress and main:
      from tqdm.auto import tqdm
      progress = tqdm(total=cfg.steps, initial=start, desc="train",
                      dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start, cfg.steps):
      state, metrics = train_step(state, put(data.batch(data_index)))
      data_index += 1
      tokens_seen += cfg.batch_size * cfg.seq_len
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        record = {"step": done, **jax.device_get(metrics)}
        record["tokens_per_s"] = tokens_seen / (time.perf_counter() - t0)
        writer.write(record)
        if progress is not None:
          progress.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
      if done % cfg.eval_every == 0 and done != cfg.steps:
        writer.write({"step": done, **run_eval()})
      checkpointer.save(state)
      if progress is not None:
        progress.update(1)
    if progress is not None:
      progress.close()
    elapsed = time.perf_counter() - t0
    final = run_eval()
    writer.write({"step": cfg.steps, **final, "final": True})
    checkpointer.save(state, force=True)
    checkpointer.close()

  summary = {"eval_loss": final["eval_loss"], "steps": cfg.steps,
             "resumed_from": resumed_from, "train_seconds": elapsed,
             "tokens_per_s": tokens_seen / elapsed if tokens_seen else None,
             "metrics": metrics_path,
             "checkpoints": os.path.join(workdir, "checkpoints"),
             "state": state}
  target = method.target_fanout if method is not None else None
  summary["plot"] = metrics_lib.plot_run(
      metrics_lib.read_jsonl(metrics_path), os.path.join(workdir, "run.png"),
      target) if main else None
  if cfg.sample_tokens and jax.process_count() == 1:
    prompt = np.frombuffer(cfg.sample_prompt.encode(), np.uint8).astype(np.int32)
    out = sample(model, state.params, state.router_state, prompt[None],
                 cfg.sample_tokens, temperature=cfg.temperature,
                 rng=jax.random.PRNGKey(cfg.seed))
    summary["sample"] = cfg.sample_prompt + bytes(
        out[0].astype(np.uint8).tolist()).decode("utf-8", errors="replace")
  return summary
