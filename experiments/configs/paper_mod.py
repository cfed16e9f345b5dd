"""Mixture-of-Depths paper shape (~1.3B dense-equivalent): 16 layers, D=2048,
16 heads, SwiGLU width 8192, vocab 50304; every other block routed with
capacity 12.5% of the sequence (top-C expert-choice over the sequence, the
paper's best setting), seq 2048, bfloat16 activations.

No experts: POD_MESH is data parallel with heads/MLP/vocab over 2 on 256
chips; TEST_MESH has the same axes over 8 devices (forced host devices).
"""
import functools
import os

from moejax.experiment import load_module
from moejax.train.loop import TrainConfig

paper_base = load_module(os.path.join(os.path.dirname(
    os.path.abspath(__file__)), "paper_base.py"))

NAME = "paper_mod"
POD_MESH = "data:128,expert:1,model:2"
POD_DEVICES = 256
TEST_MESH = "data:4,expert:1,model:2"

# Sequences per data shard: the paper-scale 512 on POD_MESH.
SHARD_BATCH = 4

# The mesh on `chips` chips: heads/MLP/vocab over 2 from 256, the rest data.
tpu_mesh = functools.partial(paper_base.tpu_mesh, experts=1, model_from=256)


def config(batch_size: int = 512, num_layers: int = 16,
           expert_parallel: str = "gspmd", remat: bool = False) -> TrainConfig:
  del expert_parallel  # no experts
  model = paper_base.lm(vocab_size=50304, num_layers=num_layers, d_model=2048,
                        num_heads=16, d_ff=8192, mod_capacity=0.125,
                        mod_every=2, remat=remat)
  return paper_base.train_config(model, batch_size=batch_size, steps=50000,
                                 learning_rate=3e-4, warmup_steps=2000,
                                 mesh=POD_MESH)
