"""Controllers: the non-gradient feedback loops of routing methods.

Axis legend:
  E  experts (N in the control laws: routed experts of a layer)
  L  routed layers (a controller's state may carry a leading L axis)

A controller is a frozen dataclass of hyperparameters with `init() -> State` and a
pure, jit-able `update(state, measured) -> State`; `State` is a small pytree. Its
state is never a param and never touched by the optimizer: it lives in
`TrainState.router_state`, the train step updates it from metrics reduced over
the whole global batch, checkpoints save it, and evaluation and sampling read it
frozen. Each controller lives beside its routing method:
  `PIController`  DTop-p's positional PI law on the threshold p of top-p routing
                  (`moejax.routing.dtopp`).
  `ThresholdEMA`  Expert Threshold's bias-corrected EMA of per-expert cutoffs
                  (`moejax.routing.threshold`).
  `SignBias`      loss-free balancing's per-expert selection bias, sign law
                  (`moejax.routing.lossfree`).
"""
from moejax.routing.dtopp import PIController, PIState
from moejax.routing.lossfree import SignBias
from moejax.routing.threshold import ThresholdEMA

__all__ = ["PIController", "PIState", "SignBias", "ThresholdEMA"]
