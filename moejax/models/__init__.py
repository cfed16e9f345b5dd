"""Models that take any router config."""
from moejax.models.lm import LMConfig, TransformerLM

__all__ = ["LMConfig", "TransformerLM"]
