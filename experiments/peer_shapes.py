"""The shapes, remat settings and layouts the MaxText side by side compiles
(`peer_maxtext_aot.py`), and the key of one compile.

Axis legend:
  E  experts
  D  model width
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
  """A decoder-only MoE LM shape both libraries build.

  Attributes: layers, d_model, heads (head width d_model / heads), experts E,
  expert_width, top_k, vocab, seq_len, batch (global sequences),
  capacity_factor, moejax_config (the registry name whose builder moejax
  uses, with top-k routing swapped in).
  """
  name: str
  layers: int
  d_model: int
  heads: int
  experts: int
  expert_width: int
  top_k: int
  vocab: int
  seq_len: int
  batch: int
  capacity_factor: float
  moejax_config: str


SHAPES = {
    "paper": Shape("paper (6.9B, DTop-p-like)", 16, 2048, 16, 64, 1024, 8,
                   50304, 2048, 256, 1.25, "paper_dtop_p"),
    "mixtral": Shape("mixtral (8x7B-like, MHA)", 32, 4096, 32, 8, 14336, 2,
                     32000, 2048, 64, 1.25, "mixtral_8x7b"),
}

# remat setting -> (MaxText remat_policy, moejax LMConfig.remat).
REMAT = {"full": ("full", "block"),
         "selective": ("minimal", "recompute_attention"),
         # moejax's selective remat of the MoE layer too (MaxText: as selective)
         "selective_moe": ("minimal", "save_moe_operands"),
         # block remat keeping the same matmul outputs as MaxText's `minimal`
         # (projections, expert up-projections and outputs)
         "selective_matmuls": ("minimal", "save_matmuls"),
         # block remat keeping the projections and router logits only
         "selective_dots": ("minimal", "save_dots"),
         "none": ("none", "none")}

# remat settings whose MaxText policy is another setting's: MaxText's row of
# that setting is compiled once, under the other's name
MAXTEXT_REMAT = {"selective_moe": "selective",
                 "selective_matmuls": "selective",
                 "selective_dots": "selective"}

# moejax layouts: (mesh on a slice of n chips with E experts, fields).
VARIANTS = {
    "ep": "data:{data},expert:{expert},model:1",
    "fsdp": "fsdp:{data},expert:{expert},model:1",
}


def expert_axis(shape: Shape, chips: int) -> int:
  """The `expert` mesh axis of a shape on `chips` chips."""
  return min(shape.experts, 8, chips)


def spec_key(spec: dict) -> str:
  """The key of one compile (a spec) in the JSON's `compiles`."""
  key = ("{library}/{topology}/{shape}/{variant}/data{data}xexpert{expert}/"
         "remat={remat}".format(**spec))
  if spec.get("loss_chunk"):
    key += f"/loss_chunk={spec['loss_chunk']}"
  if spec.get("strategy"):
    key += f"/strategy={spec['strategy']}"
  key += f"/L{spec['depth']}"
  return key + "/scan" if spec.get("scan") else key

