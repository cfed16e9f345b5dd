"""Models that take any router config."""
from moejax.models.dit import DiT, DiTConfig
from moejax.models.lm import LMConfig, TransformerLM

__all__ = ["DiT", "DiTConfig", "LMConfig", "TransformerLM"]
