"""Forward FLOPs counted from a model's shapes (dense, MoE, MoD, MoDE).

Axis legend:
  B  batch
  L  sequence length
  T  tokens a block runs on per sequence (L, or C in a routed MoD block)
  C  MoD capacity, C = ceil(ratio * L)
  S  tokens in one MoE routing group
  E  experts (real); N no-op experts
  D  model width
  F  MLP / expert width
  V  vocabulary

Conventions: one multiply-add = 2 FLOPs; only matrix products are counted
(attention projections: query and output D x D each, key and value D x D G / H
each with G key/value heads of grouped-query attention; attention scores
QK^T and probs x V, MLPs and experts,
routers, the MoD predictor, the LM head, and the one-hot dispatch/combine
products of the "einsum" strategy); norms, softmax, RoPE, activations, gathers
and scatters are not. Attention scores are counted as implemented: every query
against all T keys of its sequence (the causal mask hides half of them;
`causal_attention=True` counts only the unmasked (T + 1) / 2). An MoE layer
counts the expert rows its dispatcher computes: E * C slots per group for the
slot strategies ("gather", "index", "einsum"; C from the method's capacity
at the train or eval capacity factor), the expected real assignments
S * k * E / (E + N) for the dropless ones ("dropless", "sorted", "ragged").
A routed MoD block counts its block at T = C tokens, i.e. per token of the
sequence about c x (projections + MLP) + c^2 x (attention scores) with
c = C / L, plus its router (D) and predictor (D -> D/2 -> 1).

Training FLOPs are the usual 3 x forward (`train_flops`).

Peaks: `PEAK_FLOPS` is the one table of accelerators' dense bfloat16 peak
FLOP/s per chip, by the device kind JAX reports (`device.device_kind`);
`peak_flops(kind)` reads it (None for a CPU or an unknown kind) and
`moejax.aot.CHIPS` takes its TPU peaks from it. MFU is model FLOPs (these
counts, 3 x forward per training step) over time x peak, whatever the
activation dtype.
"""
from __future__ import annotations

from typing import Any

from moejax.dispatch.base import DROPLESS
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig

# `DROPLESS`: the strategies that compute each kept assignment once (no
# capacity slots).


def mlp_flops(d_model: int, width: int, activation: str = "swiglu") -> int:
  """FLOPs of one token through a dense MLP D -> F -> D (SwiGLU has 3 matrices)."""
  mats = 3 if activation == "swiglu" else 2
  return 2 * mats * d_model * width


def moe_flops(moe: MoEConfig, d_model: int, group_tokens: int, *,
              train: bool = True) -> dict[str, float]:
  """Per-token FLOPs of an MoE layer whose groups hold `group_tokens` tokens.

  Returns {"router", "experts", "dispatch", "shared"} (FLOPs per token).
  """
  s = moe.group_size or group_tokens
  e, n = moe.num_experts, moe.num_noop_experts
  method = moe.router
  out = {"router": 2.0 * d_model * (e + n)}
  expert = mlp_flops(d_model, moe.expert_width, moe.activation)
  if moe.strategy in DROPLESS:
    rows_per_token = method.target_fanout * e / (e + n)
    out["dispatch"] = 0.0
  else:
    factor = moe.capacity_factor if train else moe.eval_capacity_factor
    cap = method.capacity(s, e + n, factor)
    rows_per_token = e * cap / s
    # one-hot dispatch [S,E,C] x [S,D] and combine: 2 * (2 * E*C*D) per group.
    out["dispatch"] = (4.0 * e * cap * d_model / s
                       if moe.strategy == "einsum" else 0.0)
  out["experts"] = rows_per_token * expert
  out["shared"] = float(moe.num_shared * mlp_flops(
      d_model, moe.shared_width or moe.expert_width, moe.activation))
  return out


def block_flops(cfg: LMConfig, tokens: int, moe: MoEConfig | None, *,
                train: bool = True, causal_attention: bool = False,
                activation: str = "swiglu") -> dict[str, float]:
  """Per-token FLOPs of one block running on `tokens` (T) tokens of a sequence.

  Returns {"attention_proj", "attention_scores", "mlp", "moe_router"}.
  """
  d = cfg.d_model
  keys = (tokens + 1) / 2 if causal_attention else tokens
  kv_share = cfg.kv_heads / cfg.num_heads  # G / H: the key/value projections
  out = {"attention_proj": 2.0 * (2 + 2 * kv_share) * d * d,
         "attention_scores": 2.0 * 2 * keys * d,
         "moe_router": 0.0}
  if moe is None:
    out["mlp"] = float(mlp_flops(d, cfg.d_ff, activation))
  else:
    m = moe_flops(moe, d, tokens, train=train)
    out["mlp"] = m["experts"] + m["dispatch"] + m["shared"]
    out["moe_router"] = m["router"]
  return out


def flops_per_token(cfg: LMConfig, seq_len: int | None = None, *,
                    train: bool = True, causal_attention: bool = False,
                    predictor: bool = True) -> dict[str, Any]:
  """Forward FLOPs per token of a `TransformerLM` on sequences of `seq_len`.

  Args:
    cfg: the model config (dense, MoE, MoD or MoDE).
    seq_len: L (default cfg.max_len).
    train: use the training capacity factor of MoE layers (else the eval one).
    causal_attention: count only unmasked attention scores.
    predictor: count the MoD causal predictor (it runs in training, and at
      sampling when `mod.causal="predictor"`).
  Returns:
    dict with "total" and the parts "attention_proj", "attention_scores",
    "mlp", "moe_router", "mod_router", "head" (FLOPs per token, summed over
    layers) and "layers" (per-layer totals).
  """
  length = cfg.max_len if seq_len is None else seq_len
  parts = dict.fromkeys(("attention_proj", "attention_scores", "mlp",
                         "moe_router", "mod_router"), 0.0)
  layers = []
  mod = cfg.mod
  for i in range(cfg.num_layers):
    moe = cfg.moe if cfg.is_moe_layer(i) else None
    if cfg.is_mod_layer(i):
      tokens = mod.num_selected(length)
      frac = tokens / length
      block = {k: v * frac for k, v in block_flops(
          cfg, tokens, moe, train=train,
          causal_attention=causal_attention).items()}
      d = cfg.d_model
      block["mod_router"] = 2.0 * d + (
          2.0 * (d * max(1, d // 2) + max(1, d // 2)) if predictor else 0.0)
    else:
      block = block_flops(cfg, length, moe, train=train,
                          causal_attention=causal_attention)
    for k, v in block.items():
      parts[k] += v
    layers.append(sum(block.values()))
  parts["head"] = 2.0 * cfg.d_model * cfg.vocab_size
  total = sum(parts.values())
  return {"total": total, **parts, "layers": layers}


def forward_flops(cfg: LMConfig, batch: int, seq_len: int, **kwargs) -> float:
  """FLOPs of one forward pass over a batch of B sequences of L tokens."""
  return flops_per_token(cfg, seq_len, **kwargs)["total"] * batch * seq_len


def train_flops(cfg: LMConfig, batch: int, seq_len: int, steps: int = 1,
                **kwargs) -> float:
  """Training FLOPs: 3 x forward (forward + backward) per step."""
  return 3.0 * forward_flops(cfg, batch, seq_len, **kwargs) * steps


# Dense bfloat16 peak FLOP/s of one chip (a TPU chip; one GPU), by
# `device.device_kind`; a kind not listed matches its longest listed prefix
# (e.g. "NVIDIA H100 80GB HBM3" -> "NVIDIA H100"). Vendor figures, no sparsity.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops(device_kind: str | None) -> float | None:
  """Dense bfloat16 peak FLOP/s of one device of `device_kind` (`PEAK_FLOPS`;
  the longest listed prefix), None for a CPU or a kind not listed."""
  if not device_kind:
    return None
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  prefixes = [k for k in PEAK_FLOPS if device_kind.startswith(k + " ") or
              device_kind.startswith(k + "-")]
  return PEAK_FLOPS[max(prefixes, key=len)] if prefixes else None


def mfu(flops_per_second: float, peak_flops_per_second: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the device's peak."""
  if not peak_flops_per_second > 0:
    raise ValueError(f"peak_flops_per_second={peak_flops_per_second} is out of "
                     "range; allowed: > 0")
  return flops_per_second / peak_flops_per_second
