"""Flax Linen modules: thin wrappers over the pure routing/dispatch functions."""
from moejax.experts import DenseFFN, Experts
from moejax.experts import ffn as expert_ffn
from moejax.nn.attention import Attention
from moejax.nn.blocks import Block
from moejax.nn.moe import MoE, MoEConfig

__all__ = ["Attention", "Block", "DenseFFN", "Experts", "expert_ffn", "MoE",
           "MoEConfig"]
