"""Routing methods selectable by name (`--router`)."""
from moejax.methods.base import (RouterMethod, available, build, get,
                                 register)
from moejax.methods.top_k import ExpertChoice, TopK

__all__ = ["RouterMethod", "available", "build", "get", "register", "TopK",
           "ExpertChoice"]
