"""Routing: pure router functions of one group's float32 logits `[S, E]` and the
methods (frozen configs with their controllers) that the MoE layer selects by name.

One module per method: `topk` (top-k), `choice` (expert choice), `topp` (top-p),
`dtopp` (DTop-p), `threshold` (Expert Threshold), `probmoe` (exact-k and
dynamic-k), `lossfree` (loss-free top-k); `base` holds the contract,
the method base class, capacity and the registry, `losses` the aux losses and
metrics. The package exports the router functions under their own names.
"""
from moejax.routing.base import (Routing, RouterMethod, RouterOutput, available,
                                 build, capacity, get, register, resolve)
from moejax.routing.losses import (entropy, load_balance_loss, routing_metrics,
                                   z_loss)
from moejax.routing.lossfree import LossFreeTopK, SignBias, biased_top_k
from moejax.routing.topk import TopK, top_k
from moejax.routing.choice import ExpertChoice, expert_choice
from moejax.routing.topp import TopP, top_p
from moejax.routing.dtopp import DTopP, PIController, PIState, dtop_p
from moejax.routing.threshold import (ExpertThreshold, ThresholdEMA,
                                      expert_cutoffs, expert_threshold,
                                      expert_threshold_train)
from moejax.routing.probmoe import (DynamicK, ExactK, dynamic_k, exact_k,
                                    exact_k_log_partition, exact_k_marginals)

__all__ = [
    "Routing", "RouterOutput", "RouterMethod", "available", "build", "capacity",
    "get", "register", "resolve",
    "top_k", "expert_choice", "load_balance_loss", "z_loss", "entropy",
    "routing_metrics", "expert_threshold", "expert_threshold_train",
    "expert_cutoffs", "biased_top_k", "top_p", "dtop_p",
    "exact_k", "exact_k_log_partition", "exact_k_marginals", "dynamic_k",
    "TopK", "LossFreeTopK", "ExpertChoice", "TopP", "DTopP", "ExpertThreshold", "ExactK",
    "DynamicK", "PIController", "PIState", "ThresholdEMA", "SignBias",
]
