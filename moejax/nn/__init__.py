"""Flax Linen modules: thin wrappers over the pure routing/dispatch functions."""
from moejax.nn.attention import Attention
from moejax.nn.blocks import Block
from moejax.nn.experts import DenseFFN, Experts, expert_ffn
from moejax.nn.moe import MoE, MoEConfig

__all__ = ["Attention", "Block", "DenseFFN", "Experts", "expert_ffn", "MoE",
           "MoEConfig"]
