"""The named run configs: one registry for the training script, the reports,
tests and notebooks.

  from moejax import configs
  cfg = configs.get("paper_dtop_p")            # a TrainConfig
  cfg = configs.get("paper_et", num_layers=1)  # the builder's knobs
  cfg = configs.load("my_run.yaml")            # a name or a config file
  cfg = configs.override(cfg, {"model.num_layers": 24})

Names (`names()`): the CPU presets `tiny` and `small` (`presets`), the
papers' shapes `paper_dtop_p`, `paper_probmoe`, `paper_et`, `paper_mod`
(`paper`), and the larger `mixtral_8x7b` and `deepseek_moe_16b` (`large`).
Each resolves into the frozen `TrainConfig` / `LMConfig` / `MoEConfig` /
`OptimConfig`. The pod-scale ones carry their TPU layout (`NamedConfig`:
the intended pod mesh, an 8-device stand-in mesh with the same axes, the
sequences per data x expert shard, the mesh on a slice of n chips).

Config files (`load`) and dotted overrides (`override`): see
`moejax.configs.overrides`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from moejax.configs import large, paper
from moejax.configs.overrides import (field_paths, load_file, override,
                                      parse_assignments)
from moejax.configs.presets import PRESETS, preset, preset_config
from moejax.tasks.lm import TrainConfig


@dataclasses.dataclass(frozen=True)
class NamedConfig:
  """A registered config.

  Attributes:
    name: its registry name.
    build: `(**knobs) -> TrainConfig`; the pod-scale builders take
      `batch_size`, `num_layers`, `expert_parallel` and `remat`.
    pod_mesh / pod_devices: the intended layout on a TPU pod (None: a CPU
      preset).
    test_mesh: the same axes over 8 devices (forced host devices stand in
      for the pod when the step is compiled).
    shard_batch: sequences per data x expert shard at the pod's batch.
    tpu_mesh: `(chips) -> mesh spec` on a slice of `chips` chips.
  """
  name: str
  build: Callable[..., TrainConfig]
  pod_mesh: str | None = None
  pod_devices: int | None = None
  test_mesh: str | None = None
  shard_batch: int | None = None
  tpu_mesh: Callable[[int], str] | None = None

  def config(self, **knobs) -> TrainConfig:
    return self.build(**knobs)

  @property
  def summary(self) -> str:
    """The first line of the builder's docstring."""
    return (self.build.__doc__ or "").strip().splitlines()[0]


def _preset(name: str) -> Callable[..., TrainConfig]:
  build = functools.partial(preset_config, name)
  build.__doc__ = preset_config.__doc__.replace("preset `name`", f"`{name}`")
  return build


# ProbMoE is compared at the DTop-p paper's shape, so it shares its layout.
_DTOP_P_LAYOUT = dict(pod_mesh=paper.DTOP_P_POD_MESH, pod_devices=256,
                      test_mesh=paper.STAND_IN_MESH, shard_batch=8,
                      tpu_mesh=paper.dtop_p_tpu_mesh)
REGISTRY: dict[str, NamedConfig] = {c.name: c for c in (
    NamedConfig("tiny", _preset("tiny")),
    NamedConfig("small", _preset("small")),
    NamedConfig("paper_dtop_p", paper.paper_dtop_p, **_DTOP_P_LAYOUT),
    NamedConfig("paper_probmoe", paper.paper_probmoe, **_DTOP_P_LAYOUT),
    NamedConfig("paper_et", paper.paper_et,
                pod_mesh=paper.ET_POD_MESH, pod_devices=128,
                test_mesh=paper.STAND_IN_MESH, shard_batch=2,
                tpu_mesh=paper.et_tpu_mesh),
    NamedConfig("paper_mod", paper.paper_mod,
                pod_mesh=paper.MOD_POD_MESH, pod_devices=256,
                test_mesh="data:4,expert:1,model:2", shard_batch=4,
                tpu_mesh=paper.mod_tpu_mesh),
    NamedConfig("mixtral_8x7b", large.mixtral_8x7b,
                pod_mesh=large.mixtral_tpu_mesh(256), pod_devices=256,
                test_mesh=paper.STAND_IN_MESH, shard_batch=1,
                tpu_mesh=large.mixtral_tpu_mesh),
    NamedConfig("deepseek_moe_16b", large.deepseek_moe_16b,
                pod_mesh=large.deepseek_tpu_mesh(256), pod_devices=256,
                test_mesh=paper.STAND_IN_MESH, shard_batch=8,
                tpu_mesh=large.deepseek_tpu_mesh),
)}
# The papers' shapes (the ahead-of-time reports' default set).
PAPER_CONFIGS = ("paper_dtop_p", "paper_et", "paper_mod", "paper_probmoe")


def names() -> tuple[str, ...]:
  """The registered names, in registry order."""
  return tuple(REGISTRY)


def entry(name: str) -> NamedConfig:
  """The registry entry `name`."""
  if name not in REGISTRY:
    raise ValueError(f"config={name!r} is unknown; allowed: "
                     f"{', '.join(REGISTRY)}, or a .py / .yaml file")
  return REGISTRY[name]


def get(name: str, **knobs: Any) -> TrainConfig:
  """The TrainConfig of registry entry `name` (builder `knobs` passed on)."""
  return entry(name).config(**knobs)


def load(spec: str) -> TrainConfig:
  """A registry name, or the path of a config file (`.py`, `.yaml`, `.yml`;
  see `moejax.configs.overrides.load_file`)."""
  if spec in REGISTRY or not spec.endswith((".py", ".yaml", ".yml")):
    return get(spec)
  return load_file(spec, get)


__all__ = ["NamedConfig", "PAPER_CONFIGS", "PRESETS", "REGISTRY", "entry",
           "field_paths", "get", "load", "load_file", "names", "override",
           "parse_assignments", "preset", "preset_config"]
