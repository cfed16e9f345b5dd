"""ProbMoE at the OLMoE-1B-7B shape: the DTop-p config's model (16 layers,
D=2048, 16 heads, vocab 50304, 64 SwiGLU experts of width 1024, ~1.3B active
/ ~6.9B total parameters, seq 2048, bfloat16) with exactly 8 experts sampled
per token (exact k-subset sampling, `exact_k`), fine-tuning schedule.

Meshes and batch per shard as in paper_dtop_p.py.
"""
import dataclasses
import os

from moejax import routing
from moejax.experiment import load_module
from moejax.train.loop import TrainConfig
from moejax.train.state import OptimConfig

paper_dtop_p = load_module(os.path.join(os.path.dirname(
    os.path.abspath(__file__)), "paper_dtop_p.py"))

NAME = "paper_probmoe"
POD_MESH = paper_dtop_p.POD_MESH
POD_DEVICES = paper_dtop_p.POD_DEVICES
TEST_MESH = paper_dtop_p.TEST_MESH
SHARD_BATCH = paper_dtop_p.SHARD_BATCH
tpu_mesh = paper_dtop_p.tpu_mesh


def config(batch_size: int = 1024, num_layers: int = 16,
           expert_parallel: str = "gspmd", remat: bool = False) -> TrainConfig:
  base = paper_dtop_p.config(batch_size, num_layers, expert_parallel, remat)
  moe = dataclasses.replace(base.model.moe,
                            router=routing.build("exact_k", {"k": 8}))
  return dataclasses.replace(
      base, model=dataclasses.replace(base.model, moe=moe), steps=5000,
      optim=OptimConfig(learning_rate=1e-5, warmup_steps=100,
                        total_steps=5000))
