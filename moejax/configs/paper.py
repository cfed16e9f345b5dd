"""The papers' shapes: DTop-p, ProbMoE, Expert Threshold and Mixture-of-Depths.

What they share: sequences of 2048 tokens, bfloat16 activations, a warm-up +
decay schedule over the run's steps, and TPU meshes over the axes data, expert
and model. Each builder takes the knobs the ahead-of-time reports vary
(`batch_size`, `num_layers`, `expert_parallel`, `remat`) and returns a
`TrainConfig`; `moejax.configs` registers them with their pod layouts.
"""
from __future__ import annotations

import dataclasses
import functools

from moejax import routing
from moejax.models.lm import LMConfig
from moejax.nn.mod import MoDConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.state import OptimConfig

SEQ_LEN = 2048

# The 8-device stand-in of the expert configs' pods (forced host devices in
# the tests): every axis over 2, so that the compiled step shards data,
# experts and heads/vocab as on the pod.
STAND_IN_MESH = "data:2,expert:2,model:2"


def tpu_mesh(chips: int, experts: int, model_from: int | None = None) -> str:
  """The mesh on a slice of `chips` chips: experts over min(`experts`,
  chips), heads/MLP/vocab over 2 from `model_from` chips on (None: never),
  the rest data."""
  expert = min(experts, chips)
  model = 2 if model_from is not None and chips >= model_from else 1
  return f"data:{chips // (expert * model)},expert:{expert},model:{model}"


def lm(**fields) -> LMConfig:
  """An LM config of `fields` for sequences of SEQ_LEN tokens in bfloat16."""
  return LMConfig(max_len=SEQ_LEN, dtype="bfloat16", **fields)


def train_config(model: LMConfig, *, batch_size: int, steps: int,
                 learning_rate: float, warmup_steps: int,
                 mesh: str) -> TrainConfig:
  """`steps` steps of training `model` on batches of `batch_size` sequences of
  SEQ_LEN tokens, on `mesh`."""
  return TrainConfig(model=model, batch_size=batch_size, seq_len=SEQ_LEN,
                     steps=steps, mesh=mesh,
                     optim=OptimConfig(learning_rate=learning_rate,
                                       warmup_steps=warmup_steps,
                                       total_steps=steps))


# --- DTop-p --------------------------------------------------------------------

DTOP_P_POD_MESH = "data:16,expert:8,model:2"
# The mesh on `chips` chips: experts over 8, heads/vocab over 2 from 256.
dtop_p_tpu_mesh = functools.partial(tpu_mesh, experts=8, model_from=256)


def paper_dtop_p(batch_size: int = 1024, num_layers: int = 16,
                 expert_parallel: str = "gspmd",
                 remat: bool | str = False) -> TrainConfig:
  """DTop-p paper LLM shape: 64 experts, 8 active (target fanout), ~1.3B
  active / ~6.9B total parameters (OLMoE-1B-7B-like: 16 layers, D=2048, 16
  heads, expert width 1024, SwiGLU, vocab 50304), seq 2048, bfloat16."""
  moe = MoEConfig(num_experts=64, expert_width=1024,
                  router=routing.build("dtop_p", {"k": 8}),
                  capacity_factor=1.25, strategy="index",
                  expert_parallel=expert_parallel)
  model = lm(vocab_size=50304, num_layers=num_layers, d_model=2048,
             num_heads=16, d_ff=8192, moe=moe, remat=remat)
  return train_config(model, batch_size=batch_size, steps=50000,
                      learning_rate=4e-4, warmup_steps=2000,
                      mesh=DTOP_P_POD_MESH)


def paper_probmoe(batch_size: int = 1024, num_layers: int = 16,
                  expert_parallel: str = "gspmd",
                  remat: bool | str = False) -> TrainConfig:
  """ProbMoE at the OLMoE-1B-7B shape: `paper_dtop_p`'s model with exactly 8
  experts sampled per token (exact k-subset sampling, `exact_k`),
  fine-tuning schedule."""
  base = paper_dtop_p(batch_size, num_layers, expert_parallel, remat)
  moe = dataclasses.replace(base.model.moe,
                            router=routing.build("exact_k", {"k": 8}))
  return dataclasses.replace(
      base, model=dataclasses.replace(base.model, moe=moe), steps=5000,
      optim=OptimConfig(learning_rate=1e-5, warmup_steps=100,
                        total_steps=5000))


# --- Expert Threshold ----------------------------------------------------------

ET_POD_MESH = "data:32,expert:4,model:1"
# The mesh on `chips` chips: experts over 4, the rest data.
et_tpu_mesh = functools.partial(tpu_mesh, experts=4)


def paper_et(batch_size: int = 256, num_layers: int = 12,
             expert_parallel: str = "gspmd",
             remat: bool | str = False) -> TrainConfig:
  """Expert-threshold paper shape (nanochat d12): 12 layers, D=768, 6 heads,
  vocab 65536, 16 routed experts (SwiGLU width 896) + 1 shared expert (width
  1536) per layer, target fanout 1; 568M total / 196M active parameters (the
  paper's: 575M / 195M), seq 2048, bfloat16."""
  moe = MoEConfig(num_experts=16, expert_width=896,
                  router=routing.build("expert_threshold", {"k": 1}),
                  num_shared=1, shared_width=1536, capacity_factor=1.25,
                  strategy="index", expert_parallel=expert_parallel)
  model = lm(vocab_size=65536, num_layers=num_layers, d_model=768,
             num_heads=6, d_ff=3072, moe=moe, remat=remat)
  return train_config(model, batch_size=batch_size, steps=20000,
                      learning_rate=3e-3, warmup_steps=500, mesh=ET_POD_MESH)


# --- Mixture-of-Depths -----------------------------------------------------------

MOD_POD_MESH = "data:128,expert:1,model:2"
# The mesh on `chips` chips: heads/MLP/vocab over 2 from 256, the rest data.
mod_tpu_mesh = functools.partial(tpu_mesh, experts=1, model_from=256)


def paper_mod(batch_size: int = 512, num_layers: int = 16,
              expert_parallel: str = "gspmd",
              remat: bool | str = False) -> TrainConfig:
  """Mixture-of-Depths paper shape (~1.3B dense-equivalent): 16 layers,
  D=2048, 16 heads, SwiGLU width 8192, vocab 50304; every other block routed
  with capacity 12.5% of the sequence (top-C over the sequence, the paper's
  best setting), seq 2048, bfloat16. No experts (`expert_parallel` unused)."""
  del expert_parallel
  model = lm(vocab_size=50304, num_layers=num_layers, d_model=2048,
             num_heads=16, d_ff=8192, mod=MoDConfig(capacity=0.125),
             mod_every=2, remat=remat)
  return train_config(model, batch_size=batch_size, steps=50000,
                      learning_rate=3e-4, warmup_steps=2000,
                      mesh=MOD_POD_MESH)
