"""The config registry (`moejax.configs`): every name resolves into the frozen
config dataclasses; the presets keep their numbers."""
import dataclasses

import pytest

from moejax import configs
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.state import OptimConfig


@pytest.mark.parametrize("name", configs.names())
def test_every_name_resolves_into_the_frozen_dataclasses(name):
  cfg = configs.get(name)
  assert isinstance(cfg, TrainConfig)
  assert isinstance(cfg.model, LMConfig) and isinstance(cfg.optim, OptimConfig)
  assert cfg.model.moe is None or isinstance(cfg.model.moe, MoEConfig)
  assert cfg.seq_len <= cfg.model.max_len
  assert cfg.optim.total_steps == cfg.steps
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model.num_layers = 1  # type: ignore[misc]
  entry = configs.entry(name)
  assert entry.summary
  if entry.pod_mesh is not None:
    assert entry.config(num_layers=1).model.num_layers == 1


def test_presets_keep_their_numbers():
  for name in ("tiny", "small"):
    pre, cfg = configs.preset(name), configs.get(name)
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.d_ff, m.moe_every) == (
        pre["num_layers"], pre["d_model"], pre["num_heads"], pre["d_ff"],
        pre["moe_every"])
    assert (m.moe.num_experts, m.moe.expert_width, m.moe.router.k) == (
        pre["num_experts"], pre["expert_width"], pre["k"])
    assert m.moe.router.name == "top_k" and m.max_len == pre["seq_len"]
    assert (cfg.seq_len, cfg.batch_size, cfg.steps) == (
        pre["seq_len"], pre["batch_size"], pre["steps"])
    assert (cfg.optim.learning_rate, cfg.optim.warmup_steps) == (
        pre["learning_rate"], pre["warmup_steps"])
    # every other field at its dataclass default
    assert cfg.dataset == "stdlib" and cfg.mesh is None and m.vocab_size == 256


def test_unknown_name_lists_the_registry():
  with pytest.raises(ValueError, match="config='huge' is unknown; allowed: "
                     "tiny, small, paper_dtop_p"):
    configs.get("huge")


def test_first_dense_layers_makes_the_first_blocks_dense():
  cfg = configs.get("deepseek_moe_16b").model
  assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
  assert cfg.num_moe_layers == cfg.num_layers - 1
  with pytest.raises(ValueError, match="first_dense_layers=5 is out of range"):
    dataclasses.replace(configs.get("tiny").model, first_dense_layers=5)
