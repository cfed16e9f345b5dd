"""DTop-p paper LLM shape: 64 experts, 8 active (target fanout), ~1.3B active /
~6.9B total parameters (OLMoE-1B-7B-like: 16 layers, D=2048, 16 heads, expert
width 1024, SwiGLU), seq 2048, bfloat16 activations.

POD_MESH is the intended layout on 256 chips (experts over 8, heads/vocab over
2, the rest data); TEST_MESH has the same axes over 8 devices (forced host
devices in the tests stand in for the pod when the step is compiled).
"""
import functools
import os

from moejax import routing
from moejax.experiment import load_module
from moejax.nn.moe import MoEConfig
from moejax.train.loop import TrainConfig

paper_base = load_module(os.path.join(os.path.dirname(
    os.path.abspath(__file__)), "paper_base.py"))

NAME = "paper_dtop_p"
POD_MESH = "data:16,expert:8,model:2"
POD_DEVICES = 256
TEST_MESH = paper_base.STAND_IN_MESH

# Sequences per data x expert shard: the paper's 1024 on POD_MESH.
SHARD_BATCH = 8

# The mesh on `chips` chips: experts over 8, heads/vocab over 2 from 256.
tpu_mesh = functools.partial(paper_base.tpu_mesh, experts=8, model_from=256)


def config(batch_size: int = 1024, num_layers: int = 16,
           expert_parallel: str = "gspmd", remat: bool = False) -> TrainConfig:
  moe = MoEConfig(num_experts=64, expert_width=1024,
                  router=routing.build("dtop_p", {"k": 8}),
                  capacity_factor=1.25, strategy="index",
                  expert_parallel=expert_parallel)
  model = paper_base.lm(vocab_size=50304, num_layers=num_layers, d_model=2048,
                        num_heads=16, d_ff=8192, moe=moe, remat=remat)
  return paper_base.train_config(model, batch_size=batch_size, steps=50000,
                                 learning_rate=4e-4, warmup_steps=2000,
                                 mesh=POD_MESH)
