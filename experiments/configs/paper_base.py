"""What the paper configs share: sequences of 2048 tokens, bfloat16
activations, a warm-up + decay schedule over the run's steps, and TPU meshes
over the axes data, expert and model.

Not a config itself: `paper_*.py` load it (`moejax.experiment.load_module`)
and fill in their shapes.
"""
from moejax.models.lm import LMConfig
from moejax.train.loop import TrainConfig
from moejax.train.state import OptimConfig

SEQ_LEN = 2048

# The 8-device stand-in of the expert configs' pods (forced host devices in
# the tests): every axis over 2, so that the compiled step shards data,
# experts and heads/vocab as on the pod.
STAND_IN_MESH = "data:2,expert:2,model:2"


def tpu_mesh(chips: int, experts: int, model_from: int | None = None) -> str:
  """The mesh on a slice of `chips` chips: experts over min(`experts`,
  chips), heads/MLP/vocab over 2 from `model_from` chips on (None: never),
  the rest data."""
  expert = min(experts, chips)
  model = 2 if model_from is not None and chips >= model_from else 1
  return f"data:{chips // (expert * model)},expert:{expert},model:{model}"


def lm(**fields) -> LMConfig:
  """An LM config of `fields` for sequences of SEQ_LEN tokens in bfloat16."""
  return LMConfig(max_len=SEQ_LEN, dtype="bfloat16", **fields)


def train_config(model: LMConfig, *, batch_size: int, steps: int,
                 learning_rate: float, warmup_steps: int,
                 mesh: str) -> TrainConfig:
  """`steps` steps of training `model` on batches of `batch_size` sequences of
  SEQ_LEN tokens, on `mesh`."""
  return TrainConfig(model=model, batch_size=batch_size, seq_len=SEQ_LEN,
                     steps=steps, mesh=mesh,
                     optim=OptimConfig(learning_rate=learning_rate,
                                       warmup_steps=warmup_steps,
                                       total_steps=steps))
