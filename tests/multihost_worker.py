"""One process of a multi-process training run (started by test_multihost.py).

  python tests/multihost_worker.py --coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=0 --workdir=W --data=text:FILE --out=J

Initialises `jax.distributed` the way `experiments/train_lm.py` does
(`moejax.sharding.maybe_initialize_distributed`), trains a tiny routed LM for
`--steps_first` steps (checkpointing), then calls `train` again to `--steps`,
which restores the orbax checkpoint written by both processes and goes on.
Writes a JSON summary to `--out` (process 0 also has WORKDIR/metrics.jsonl).
"""
import argparse
import json



def tiny_config(data: str, steps: int, mesh: str | None,
                expert_parallel: str = "gspmd", total_steps: int = 4):
  """A 1-block routed LM; `total_steps` fixes the LR schedule across resumes."""
  from moejax import routing
  from moejax.models.lm import LMConfig
  from moejax.nn.moe import MoEConfig
  from moejax.tasks.lm import TrainConfig
  from moejax.train.state import OptimConfig
  moe = MoEConfig(num_experts=8, expert_width=16,
                  router=routing.build("top_k", {"k": 2}),
                  capacity_factor=2.0, expert_parallel=expert_parallel)
  model = LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_len=16,
                   moe=moe)
  return TrainConfig(model=model, dataset=data, batch_size=8, seq_len=16,
                     steps=steps, log_every=1, eval_every=1000,
                     eval_batches=1, checkpoint_every=2, sample_tokens=0,
                     progress=False, mesh=mesh,
                     optim=OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                       total_steps=total_steps))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--mesh", default="data:4,expert:2")
  parser.add_argument("--expert_parallel", default="gspmd")
  parser.add_argument("--steps_first", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--cache_dir")
  args = parser.parse_args()

  from moejax import sharding
  initialized = sharding.maybe_initialize_distributed(
      args.coordinator_address, args.num_processes, args.process_id)
  import jax
  if args.cache_dir:  # the resumed train() recompiles the same programs
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  import numpy as np
  from moejax.train.loop import train

  first = train(tiny_config(args.data, args.steps_first, args.mesh,
                            args.expert_parallel, args.steps), args.workdir)
  second = train(tiny_config(args.data, args.steps, args.mesh,
                             args.expert_parallel, args.steps), args.workdir)
  state = second["state"]
  checksum = jax.jit(lambda p: sum(jax.numpy.sum(x.astype(np.float32) ** 2)
                                   for x in jax.tree.leaves(p)),
                     out_shardings=sharding.replicated(
                         jax.tree.leaves(state.params)[0].sharding.mesh))(
                             state.params)
  w_in = state.params["layers_0"]["mlp"]["experts"]["w_in"]
  result = {
      "initialized": initialized,
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_devices": jax.local_device_count(),
      "global_devices": jax.device_count(),
      "first_eval_loss": first["eval_loss"],
      "eval_loss": second["eval_loss"],
      "resumed_from": second["resumed_from"],
      "step": int(jax.device_get(state.step)),
      "param_sq_sum": float(jax.device_get(checksum)),
      "w_in_local_shards": len(w_in.addressable_shards),
      "w_in_spec": str(w_in.sharding.spec),
      "fully_addressable": bool(w_in.is_fully_addressable),
  }
  with open(args.out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
