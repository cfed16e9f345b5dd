"""Mixture-of-Depths paper shape (~1.3B dense-equivalent): 16 layers, D=2048,
16 heads, SwiGLU width 8192, vocab 50304; every other block routed with
capacity 12.5% of the sequence (top-C expert-choice over the sequence, the
paper's best setting), seq 2048, bfloat16 activations.

No experts: POD_MESH is data parallel with heads/MLP/vocab over 2 on 256
chips; TEST_MESH has the same axes over 8 devices (forced host devices).
"""
from moejax.models.lm import LMConfig
from moejax.train.loop import TrainConfig
from moejax.train.state import OptimConfig

NAME = "paper_mod"
POD_MESH = "data:128,expert:1,model:2"
POD_DEVICES = 256
TEST_MESH = "data:4,expert:1,model:2"

# Sequences per data shard: the paper-scale 512 on POD_MESH.
SHARD_BATCH = 4


def tpu_mesh(chips: int) -> str:
  """The mesh on a slice of `chips` chips: heads/MLP/vocab over 2 from 256
  chips, the rest data."""
  model = 2 if chips >= 256 else 1
  return f"data:{chips // model},expert:1,model:{model}"


def config(batch_size: int = 512, num_layers: int = 16,
           expert_parallel: str = "gspmd", remat: bool = False) -> TrainConfig:
  del expert_parallel  # no experts
  model = LMConfig(vocab_size=50304, num_layers=num_layers, d_model=2048,
                   num_heads=16, d_ff=8192, max_len=2048, dtype="bfloat16",
                   mod_capacity=0.125, mod_every=2, remat=remat)
  return TrainConfig(model=model, batch_size=batch_size, seq_len=2048,
                     steps=50000, mesh=POD_MESH,
                     optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000,
                                       total_steps=50000))
