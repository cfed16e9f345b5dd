"""Routers: pure functions of one group's float32 logits `[S, E]`."""
from moejax.routing.base import Routing, RouterOutput
from moejax.routing.expert_choice import expert_choice
from moejax.routing.losses import (entropy, load_balance_loss, routing_metrics,
                                   z_loss)
from moejax.routing.top_k import top_k
from moejax.routing.exact_k import (dynamic_k, exact_k, exact_k_log_partition,
                                    exact_k_marginals)
from moejax.routing.expert_threshold import (expert_cutoffs, expert_threshold,
                                             expert_threshold_train)
from moejax.routing.loss_free import biased_top_k
from moejax.routing.top_p import top_p
from moejax.routing.dtop_p import dtop_p

__all__ = [
    "Routing", "RouterOutput", "top_k", "expert_choice", "load_balance_loss",
    "z_loss", "entropy", "routing_metrics",
    "expert_threshold", "expert_threshold_train", "expert_cutoffs",
    "biased_top_k", "top_p", "dtop_p",
    "exact_k", "exact_k_log_partition", "exact_k_marginals", "dynamic_k",
]
