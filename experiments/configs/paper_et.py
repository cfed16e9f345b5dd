"""Expert-threshold paper shape (nanochat d12): 12 layers, D=768, 6 heads,
vocab 65536, 16 routed experts + 1 shared expert per layer, target fanout 1,
~575M total / ~195M active parameters, seq 2048, bfloat16 activations.

Routed experts are SwiGLU of width 896, the shared expert of width 1536 (the
paper's totals: 575M / 195M; these widths give 568M / 196M).
POD_MESH is the intended layout on 128 chips; TEST_MESH has the same axes over
8 devices (forced host devices in the tests).
"""
import functools
import os

from moejax import routing
from moejax.experiment import load_module
from moejax.nn.moe import MoEConfig
from moejax.train.loop import TrainConfig

paper_base = load_module(os.path.join(os.path.dirname(
    os.path.abspath(__file__)), "paper_base.py"))

NAME = "paper_et"
POD_MESH = "data:32,expert:4,model:1"
POD_DEVICES = 128
TEST_MESH = paper_base.STAND_IN_MESH

# Sequences per data x expert shard: the paper's 256 on POD_MESH.
SHARD_BATCH = 2

# The mesh on `chips` chips: experts over 4, the rest data.
tpu_mesh = functools.partial(paper_base.tpu_mesh, experts=4)


def config(batch_size: int = 256, num_layers: int = 12,
           expert_parallel: str = "gspmd", remat: bool = False) -> TrainConfig:
  moe = MoEConfig(num_experts=16, expert_width=896,
                  router=routing.build("expert_threshold", {"k": 1}),
                  num_shared=1, shared_width=1536, capacity_factor=1.25,
                  strategy="index", expert_parallel=expert_parallel)
  model = paper_base.lm(vocab_size=65536, num_layers=num_layers, d_model=768,
                        num_heads=6, d_ff=3072, moe=moe, remat=remat)
  return paper_base.train_config(model, batch_size=batch_size, steps=20000,
                                 learning_rate=3e-3, warmup_steps=500,
                                 mesh=POD_MESH)
