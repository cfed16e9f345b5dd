"""The moejax side of the MaxText side by side: a spec's config, compiled
ahead of time for the spec's slice and mesh.

Axis legend: none (whole-step numbers per chip).
"""
from __future__ import annotations

import dataclasses
import time

from peer_hlo import summarize
from peer_shapes import REMAT, SHAPES, VARIANTS


def moejax_config(spec: dict):
  """The moejax TrainConfig of a spec: the shape's registry config with
  top-k routing, the spec's depth, batch and remat, and its capacity
  strategy where the spec names one (else the config's)."""
  from moejax import configs, routing
  shape = SHAPES[spec["shape"]]
  cfg = configs.get(shape.moejax_config, batch_size=shape.batch,
                    num_layers=spec["depth"],
                    remat=REMAT[spec["remat"]][1])
  if spec.get("loss_chunk"):
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss_chunk=spec["loss_chunk"]))
  moe = dataclasses.replace(cfg.model.moe, router=routing.build(
      "top_k", {"k": shape.top_k}), capacity_factor=shape.capacity_factor)
  if spec.get("strategy"):
    moe = dataclasses.replace(moe, strategy=spec["strategy"])
  model = dataclasses.replace(cfg.model, moe=moe,
                              scan_layers=bool(spec.get("scan")))
  return dataclasses.replace(cfg, model=model, seq_len=shape.seq_len)


def compile_moejax(spec: dict, top_ops: int = 25) -> dict:
  """One spec's moejax train step compiled: `summarize`'s numbers, its
  mesh and compile seconds."""
  from moejax import aot
  cfg = moejax_config(spec)
  chip, devices = aot.topology_devices(spec["topology"])
  mesh_spec = VARIANTS[spec["variant"]].format(**spec)
  mesh = aot.topology_mesh(mesh_spec, devices)
  t0 = time.perf_counter()
  compiled = aot.lower_train_step(cfg, mesh).compile()
  seconds = time.perf_counter() - t0
  state = aot.state_bytes(cfg, mesh)
  return {"mesh": mesh_spec, "compile_s": seconds,
          **summarize(compiled, chip, len(devices),
                      state["params_bytes"] + state["optimizer_bytes"],
                      model_flops(spec) / len(devices), top_ops)}


def model_flops(spec: dict) -> float:
  """moejax's model FLOPs of the same shape at the spec's depth (the
  MoE FLOPs of the active experts, 3 x forward), for an MFU on one scale."""
  from moejax import flops as flops_lib
  cfg = moejax_config(spec)
  return flops_lib.train_flops(cfg.model, cfg.batch_size, cfg.seq_len)
