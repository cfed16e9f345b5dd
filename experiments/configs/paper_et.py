"""Expert-threshold paper shape (nanochat d12): 12 layers, D=768, 6 heads,
vocab 65536, 16 routed experts + 1 shared expert per layer, target fanout 1,
~575M total / ~195M active parameters, seq 2048, bfloat16 activations.

Routed experts are SwiGLU of width 896, the shared expert of width 1536 (the
paper's totals: 575M / 195M; these widths give 568M / 196M).
POD_MESH is the intended layout on 128 chips; TEST_MESH has the same axes over
8 devices (forced host devices in the tests).
"""
from moejax import routing
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig
from moejax.train.loop import TrainConfig
from moejax.train.state import OptimConfig

NAME = "paper_et"
POD_MESH = "data:32,expert:4,model:1"
POD_DEVICES = 128
TEST_MESH = "data:2,expert:2,model:2"

# Sequences per data x expert shard: the paper's 256 on POD_MESH.
SHARD_BATCH = 2


def tpu_mesh(chips: int) -> str:
  """The mesh on a slice of `chips` chips: experts over 4, the rest data."""
  expert = min(4, chips)
  return f"data:{chips // expert},expert:{expert},model:1"


def config(batch_size: int = 256, num_layers: int = 12,
           expert_parallel: str = "gspmd", remat: bool = False) -> TrainConfig:
  router = routing.build("expert_threshold", {"k": 1})
  moe = MoEConfig(num_experts=16, expert_width=896, router=router,
                  num_shared=1, shared_width=1536, capacity_factor=1.25,
                  strategy="index", expert_parallel=expert_parallel)
  model = LMConfig(vocab_size=65536, num_layers=num_layers, d_model=768,
                   num_heads=6, d_ff=3072, max_len=2048, moe=moe,
                   dtype="bfloat16", remat=remat)
  return TrainConfig(model=model, batch_size=batch_size, seq_len=2048,
                     steps=20000, mesh=POD_MESH,
                     optim=OptimConfig(learning_rate=3e-3, warmup_steps=500,
                                       total_steps=20000))
