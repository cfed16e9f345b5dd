"""Routing methods selectable by name (`--router`)."""
from moejax.methods.base import (RouterMethod, available, build, get,
                                 register)
from moejax.methods.top_k import ExpertChoice, TopK
from moejax.methods.probmoe import DynamicK, ExactK
from moejax.methods.expert_threshold import ExpertThreshold
from moejax.methods.top_p import DTopP, TopP

__all__ = ["RouterMethod", "available", "build", "get", "register", "TopK",
           "ExpertChoice", "ExpertThreshold", "TopP", "DTopP", "ExactK",
           "DynamicK"]
