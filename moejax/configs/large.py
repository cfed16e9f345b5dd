"""Larger public MoE shapes, as close as the model here gets to them.

Both use top-k routing and bfloat16 activations on sequences of 4096 tokens;
their schedules are nominal (a pod run sets its own). Deviations from the
published models are listed in each docstring.
"""
from __future__ import annotations

import functools

from moejax import routing
from moejax.configs.paper import tpu_mesh
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.state import OptimConfig

SEQ_LEN = 4096

# On `chips` chips: experts over 8, heads/MLP/vocab over 2 from 256 chips on.
mixtral_tpu_mesh = functools.partial(tpu_mesh, experts=8, model_from=256)
deepseek_tpu_mesh = functools.partial(tpu_mesh, experts=8, model_from=256)


def _train(model: LMConfig, batch_size: int, steps: int,
           learning_rate: float, warmup_steps: int) -> TrainConfig:
  return TrainConfig(model=model, batch_size=batch_size, seq_len=SEQ_LEN,
                     steps=steps, mesh=mixtral_tpu_mesh(256),
                     optim=OptimConfig(learning_rate=learning_rate,
                                       warmup_steps=warmup_steps,
                                       total_steps=steps))


def mixtral_8x7b(batch_size: int = 256, num_layers: int = 32,
                 expert_parallel: str = "gspmd",
                 remat: bool | str = "block") -> TrainConfig:
  """Mixtral-8x7B-like: 32 layers, D=4096, 32 heads, 8 SwiGLU experts of
  width 14336 in every layer, top-2 (softmax over the chosen two), vocab
  32000, seq 4096, bfloat16 activations, block remat.

  Deviations: attention is plain multi-head attention (32 key/value heads;
  Mixtral has 8, grouped-query attention is not implemented here), which
  adds 0.8B parameters: 47.5B total / 13.7B active instead of 46.7B / 12.9B;
  RoPE base 10000 (Mixtral: 1e6); no sliding window.
  """
  moe = MoEConfig(num_experts=8, expert_width=14336,
                  router=routing.build("top_k", {"k": 2}),
                  capacity_factor=1.25, expert_parallel=expert_parallel)
  model = LMConfig(vocab_size=32000, max_len=SEQ_LEN, dtype="bfloat16",
                   num_layers=num_layers, d_model=4096, num_heads=32,
                   d_ff=14336, moe=moe, remat=remat)
  return _train(model, batch_size, steps=100000, learning_rate=3e-4,
                warmup_steps=2000)


def deepseek_moe_16b(batch_size: int = 1024, num_layers: int = 28,
                     expert_parallel: str = "gspmd",
                     remat: bool | str = "block") -> TrainConfig:
  """DeepSeekMoE-16B-like: 28 layers, D=2048, 16 heads, the first block
  dense (SwiGLU width 10944), the others with 64 fine-grained SwiGLU experts
  of width 1408, top-6 (softmax weights, not renormalised) plus 2 shared
  experts of width 1408, vocab 102400, seq 4096, bfloat16, block remat.

  Deviations: RoPE base 10000; no auxiliary device-balance loss (the
  expert-level load-balance loss of `top_k` only).
  """
  moe = MoEConfig(num_experts=64, expert_width=1408,
                  router=routing.build("top_k", {"k": 6, "normalize": False}),
                  num_shared=2, shared_width=1408, capacity_factor=1.25,
                  expert_parallel=expert_parallel)
  model = LMConfig(vocab_size=102400, max_len=SEQ_LEN, dtype="bfloat16",
                   num_layers=num_layers, d_model=2048, num_heads=16,
                   d_ff=10944, moe=moe, first_dense_layers=1, remat=remat)
  return _train(model, batch_size, steps=100000, learning_rate=4.2e-4,
                warmup_steps=2000)
