"""The language-model task: a routed Transformer LM on text.

Axis legend:
  B  batch
  L  sequence length

`TrainConfig` is one LM run (its defaults are the defaults of
`experiments/train_lm.py`); `LMTask` gives the loop (`moejax.train.loop`) the
model, data, the cross-entropy eval, the final greedy sample and the plot.

The tokenizer: ``bytes`` by default (byte tokens of `LMData`, vocabulary 256),
else a SentencePiece or `tokenizers` file, and for ``tokens:DIR`` the one the
shards were made with (`moejax.data.tokenizers`). The model's vocabulary
follows it: `LMConfig.vocab_size` left at 256 becomes the tokenizer's
vocabulary padded up to a multiple of 128 (`resolve_vocab`); any other value
is kept and must hold the tokenizer's ids. A run records its data in
``WORKDIR/data.json`` (and a copy of the tokenizer file next to it), and a
resumed run must read the same prepared data with the same tokenizer.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import flops as flops_lib
from moejax import sharding
from moejax.checks import check_int_fields, check_positive_ints
from moejax.data import DataError, get_lm_data
from moejax.data import shards as shard_lib
from moejax.data.base import VOCAB_SIZE as BYTES_VOCAB
from moejax.data.tokenizers import (BYTES, Tokenizer, check_model_vocab,
                                    copy_tokenizer, load_tokenizer,
                                    model_vocab_size)
from moejax.models.lm import LMConfig, TransformerLM
from moejax.decode import sample
from moejax.train import metrics as metrics_lib
from moejax.train.config import LoopConfig, embed_loop
from moejax.train.state import TrainState
from moejax.train.step import evaluate, make_eval_step
from moejax.train.task import Task


@embed_loop
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One LM training run. Every count must be >= 1 (except those noted).

  The loop's settings (optimizer and schedule, batch, steps, seed, cadences,
  mesh, ...) are `loop`, a `LoopConfig` with the LM's defaults (its own);
  they are also this config's flat keywords and attributes
  (`TrainConfig(steps=5).steps == 5`, `moejax.train.config.embed_loop`).

  Attributes:
    model: the `LMConfig`.
    loop: the loop's settings (`moejax.train.config.LoopConfig`).
    dataset: `stdlib`, `text:GLOB`, `tfds:NAME` or `tokens:DIR` (prepared
      by `python -m moejax.data.prepare`).
    data_dir: tensorflow-datasets directory.
    tokenizer: ``bytes``, a SentencePiece ``.model`` or a tokenizers ``.json``
      file; None: bytes, or for ``tokens:DIR`` the shards' own.
    packing: packed token data (``tokens:DIR`` or a tokenizer other than
      bytes): attention stays inside each document (segment ids) and
      positions restart at each document; False: plain windows.
    seq_len: L (<= model.max_len).
    sample_tokens: tokens sampled after training (>= 0; 0 = none).
    sample_prompt: the sample's prompt.
    temperature: sampling temperature (0 = greedy; the default 0.8 samples,
      since greedy decoding of a small byte model loops on one phrase).
  """
  model: LMConfig = dataclasses.field(default_factory=LMConfig)
  loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
  dataset: str = "stdlib"
  data_dir: str | None = None
  tokenizer: str | None = None
  packing: bool = True
  seq_len: int = 128
  sample_tokens: int = 160
  sample_prompt: str = "def "
  temperature: float = 0.8

  def __post_init__(self):
    check_positive_ints(self, ("seq_len",))
    if self.seq_len > self.model.max_len:
      raise ValueError(f"seq_len={self.seq_len} exceeds model max_len="
                       f"{self.model.max_len}")
    check_int_fields(self, ("sample_tokens",), 0)
    if not 0 <= self.temperature < float("inf"):  # checked before training
      raise ValueError(f"temperature={self.temperature} is out of range; "
                       "allowed: finite >= 0 (0 = greedy)")

  def task(self) -> LMTask:
    return LMTask(self)

  @property
  def packed(self) -> bool:
    """Whether the data is packed token data (`moejax.data.packed`)."""
    return (self.dataset.strip().startswith("tokens:")
            or self.tokenizer not in (None, BYTES))


def run_tokenizer(cfg: TrainConfig) -> Tokenizer:
  """The run's tokenizer: `cfg.tokenizer`, and for ``tokens:DIR`` (where
  None means the shards' own) checked against the shards.

  Raises:
    DataError: a missing or unreadable tokenizer file or prepared directory,
      shards made with another tokenizer.
  """
  if cfg.dataset.strip().startswith("tokens:"):
    directory = os.path.expanduser(cfg.dataset.strip()[len("tokens:"):])
    manifest = shard_lib.load_manifest(directory)
    return shard_lib.resolve_tokenizer(directory, manifest, cfg.tokenizer)
  return load_tokenizer(cfg.tokenizer)


def resolve_vocab(cfg: TrainConfig, tokenizer: Tokenizer) -> TrainConfig:
  """`cfg` with the model's vocabulary following the tokenizer: a
  `vocab_size` of 256 (the default) becomes the tokenizer's padded to a
  multiple of 128; another one is kept and checked.

  Raises:
    ValueError: the model's vocab_size is smaller than the tokenizer's.
  """
  if cfg.model.vocab_size == BYTES_VOCAB:
    vocab = model_vocab_size(tokenizer.vocab_size)
    if vocab != cfg.model.vocab_size:
      return dataclasses.replace(
          cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    return cfg
  check_model_vocab(tokenizer, cfg.model.vocab_size)
  return cfg


DATA_RECORD = "data.json"


def check_grad_accum(batch_size: int, grad_accum: int, mesh) -> None:
  """Raises ValueError unless each microbatch splits over the batch shards."""
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if grad_accum > 1 and batch_size % (grad_accum * shards):
    raise ValueError(f"batch_size={batch_size} must be divisible by "
                     f"grad_accum={grad_accum} x the data-parallel mesh size "
                     f"{shards} (mesh {sharding.mesh_spec(mesh)})")


class LMTask(Task):
  """Next-token prediction: mean cross-entropy in nats per token.

  `config` is the run's config with the vocabulary resolved
  (`resolve_vocab`); `tokenizer` the run's tokenizer.
  """
  name = "train"
  rate_key = "tokens_per_s"
  loss_format = ".3f"
  config: TrainConfig

  def __init__(self, config: TrainConfig):
    self.tokenizer = run_tokenizer(config)
    super().__init__(resolve_vocab(config, self.tokenizer))

  def build_model(self) -> nn.Module:
    return TransformerLM(self.config.model)

  def example_inputs(self) -> tuple[jax.Array]:
    """tokens int32[B, L]."""
    return (jnp.zeros((self.config.loop.batch_size, self.config.seq_len),
                      jnp.int32),)

  def check(self, mesh) -> None:
    super().check(mesh)
    check_grad_accum(self.config.loop.batch_size, self.config.loop.grad_accum, mesh)
    sharding.check_model(self.config.model, mesh)

  def data(self):
    cfg = self.config
    return get_lm_data(cfg.dataset, seq_len=cfg.seq_len,
                       batch_size=cfg.loop.batch_size, seed=cfg.loop.seed,
                       data_dir=cfg.data_dir, tokenizer=cfg.tokenizer,
                       packing=cfg.packing)

  def start(self, workdir: str, data, resumed_from: int | None) -> None:
    """Records the run's data in ``WORKDIR/data.json`` (with a copy of the
    tokenizer file), or on resume checks that the prepared data and the
    tokenizer are the ones the run started with."""
    path = os.path.join(workdir, DATA_RECORD)
    record = {"dataset": self.config.dataset,
              "fingerprint": getattr(data, "fingerprint", None),
              "tokenizer": (BYTES if self.tokenizer.path is None else
                            os.path.abspath(self.tokenizer.path)),
              "tokenizer_sha256": self.tokenizer.sha256,
              "tokenizer_file": (
                  BYTES if self.tokenizer.path is None else
                  "tokenizer" + os.path.splitext(self.tokenizer.path)[1]),
              "packing": bool(self.config.packed and self.config.packing),
              "vocab_size": self.config.model.vocab_size}
    if resumed_from is not None and os.path.isfile(path):
      old = shard_lib.read_json(path)
      if old.get("tokenizer_sha256") != record["tokenizer_sha256"]:
        raise DataError(
            f"workdir {workdir!r} was trained with tokenizer sha256 "
            f"{old.get('tokenizer_sha256', '?')[:12]} ({old.get('tokenizer')})"
            f", this run's is {self.tokenizer.short_hash} "
            f"({self.tokenizer.spec}); resume with the same --tokenizer or "
            "use a new --workdir")
      if (record["dataset"].startswith("tokens:")
          and old.get("fingerprint") != record["fingerprint"]):
        raise DataError(
            f"workdir {workdir!r} was trained on {old.get('dataset')} "
            f"(manifest {old.get('fingerprint')}), this run reads "
            f"{record['dataset']} (manifest {record['fingerprint']}); resume "
            "on the same prepared data or use a new --workdir")
    if sharding.is_main_process():
      if self.tokenizer.path is not None:
        copy_tokenizer(self.tokenizer, workdir)
      shard_lib.write_json(path, record)

  def items_per_step(self) -> int:
    return self.config.loop.batch_size * self.config.seq_len

  def flops_per_step(self) -> float:
    """3 x the forward FLOPs of the global batch (`moejax.flops`)."""
    cfg = self.config
    return flops_lib.train_flops(cfg.model, cfg.loop.batch_size, cfg.seq_len)

  def make_eval_step(self, model: nn.Module):
    return make_eval_step(model)

  def evaluate(self, eval_step, state: TrainState, batches) -> dict[str, Any]:
    return evaluate(eval_step, state, batches)

  def outputs(self, model: nn.Module, state: TrainState, workdir: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`sample`: the prompt and `sample_tokens` sampled tokens (decoded by
    the run's tokenizer), and `sample_note`: how it was sampled and from what
    model size. Packed data's documents begin with EOS, so its prompt does
    too."""
    del workdir
    cfg = self.config
    tok = self.tokenizer
    loss_unit = {"loss_unit": "byte" if tok.kind == BYTES else "token"}
    if not cfg.sample_tokens:
      return {}, loss_unit
    prompt = tok.encode(cfg.sample_prompt)
    if cfg.packed:
      prompt = np.concatenate([[tok.eos_id], prompt]).astype(np.int32)
    out = sample(model, state.params, state.router_state, prompt[None],
                 cfg.sample_tokens, temperature=cfg.temperature,
                 rng=jax.random.PRNGKey(cfg.loop.seed))
    ids = np.asarray(out[0])
    ids = ids[ids < tok.vocab_size]  # padded vocabulary ids decode to nothing
    num_params = sum(int(np.prod(x.shape))
                     for x in jax.tree_util.tree_leaves(state.params))
    how = (f"temperature {cfg.temperature:g}" if cfg.temperature > 0
           else "greedy")
    unit, kind = (("bytes", "byte-level") if tok.kind == BYTES else
                  ("tokens", f"{tok.kind} ({tok.vocab_size} tokens)"))
    return {}, {
        **loss_unit,
        "sample": cfg.sample_prompt + tok.decode(ids),
        "sample_note": (f"{cfg.sample_tokens} {unit}, {how}, from a "
                        f"{num_params / 1e6:.2f}M-parameter {kind} model "
                        f"after {int(state.step)} steps")}

  def output_seconds(self, eval_batch_seconds: float,
                     compile_seconds: float) -> float:
    """The sample's prefill and decoding programs compile in about the train
    step's time (a forward pass each, where the step has forward and
    backward); a token costs at most a sequence's share of an evaluation
    batch."""
    cfg = self.config
    if not cfg.sample_tokens:
      return 0.0
    return (compile_seconds +
            cfg.sample_tokens * eval_batch_seconds / cfg.loop.batch_size)

  def plot(self, records, path: str, target_fanout: float | None) -> str:
    return metrics_lib.plot_run(records, path, target_fanout)
