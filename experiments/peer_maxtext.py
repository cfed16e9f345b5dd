"""The MaxText side of the side by side: MaxText's command line for a spec
and its train step compiled ahead of time (MaxText 0.2.5 from PyPI, in its
own environment; never a dependency of moejax).

Axis legend: none (whole-step numbers per chip).
"""
from __future__ import annotations

import os
import sys
import time

from peer_hlo import shard_bytes, summarize
from peer_moejax import model_flops
from peer_shapes import REMAT, SHAPES


def maxtext_argv(spec: dict) -> list[str]:
  """MaxText's command line for a spec (base.yml + overrides)."""
  import maxtext
  shape = SHAPES[spec["shape"]]
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs",
                      "base.yml")
  chips = spec["data"] * spec["expert"]
  head = shape.d_model // shape.heads
  policy = REMAT[spec["remat"]][0]
  return [sys.argv[0], base,
          "run_name=peer", "base_output_directory=/tmp/peer_maxtext",
          f"compile_topology={spec['topology']}",
          "compile_topology_num_slices=1",
          "decoder_block=mixtral", "model_name=default",
          f"base_emb_dim={shape.d_model}",
          f"base_num_query_heads={shape.heads}",
          f"base_num_kv_heads={shape.heads}", f"head_dim={head}",
          f"base_mlp_dim={shape.expert_width}",
          f"base_moe_mlp_dim={shape.expert_width}",
          f"base_num_decoder_layers={spec['depth']}",
          f"num_experts={shape.experts}",
          f"num_experts_per_tok={shape.top_k}",
          f"vocab_size={shape.vocab}", f"max_target_length={shape.seq_len}",
          f"per_device_batch_size={shape.batch / chips:g}",
          "dtype=bfloat16", "weight_dtype=float32",
          "attention=dot_product",
          f"scan_layers={'true' if spec.get('scan') else 'false'}",
          "sparse_matmul=false", "megablox=false",
          f"capacity_factor={shape.capacity_factor}",
          f"remat_policy={policy}", "enable_dropout=false",
          "enable_checkpointing=false", "dataset_type=synthetic",
          "logits_via_embedding=false", "opt_type=adamw",
          *maxtext_mesh(spec),
          "ici_tensor_parallelism=1"]


def maxtext_mesh(spec: dict) -> list[str]:
  """MaxText's ICI mesh of a spec: `ep` = data x expert (the non-expert
  weights and their optimizer state replicated over data), `fsdp` = fsdp x
  expert (all weights and state sharded over fsdp too, gathered per layer)."""
  fsdp = spec["data"] if spec["variant"] == "fsdp" else 1
  return [f"ici_fsdp_parallelism={fsdp}",
          f"ici_data_parallelism={spec['data'] // fsdp}",
          f"ici_expert_parallelism={spec['expert']}"]


def _keep_everything_when_scanned() -> None:
  """MaxText's scanned decoder wraps the layer in `jax.checkpoint` whatever
  the policy, and `remat_policy=none` maps to the policy None, which
  `jax.checkpoint` reads as save nothing (full remat): for a no-remat scan
  the policy becomes "save everything"."""
  import jax
  from maxtext.layers import nnx_decoders
  get = nnx_decoders.NNXDecoder.get_remat_policy

  def get_remat_policy(self):
    if self.config.remat_policy == "none":
      return jax.checkpoint_policies.everything_saveable
    return get(self)
  nnx_decoders.NNXDecoder.get_remat_policy = get_remat_policy


def compile_maxtext(spec: dict, top_ops: int = 25) -> dict:
  import jax
  from flax.core.spmd import logical_axis_rules as axis_rules
  from maxtext.configs import pyconfig
  from maxtext.trainers.pre_train import train, train_compile
  from maxtext.utils import maxtext_utils, sharding
  from moejax import aot

  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  os.environ["LIBTPU_INIT_ARGS"] = (
      os.environ.get("LIBTPU_INIT_ARGS", "") +
      " --xla_tpu_spmd_rng_bit_generator_unsafe=true")
  config = pyconfig.initialize(maxtext_argv(spec))
  policy = REMAT[spec["remat"]][0]
  if config.remat_policy != policy:
    # "none" parses to None, which the unrolled decoder treats as full remat.
    object.__getattribute__(config, "_flat_config")["remat_policy"] = policy
  if spec.get("scan") and policy == "none":
    _keep_everything_when_scanned()
  train_compile.validate_config(config)
  mesh = train_compile.get_topology_mesh(config)
  (args, kwargs, state_shardings, _, model) = train_compile.get_shaped_inputs(
      mesh, config)
  params_shardings, state_shardings = (
      sharding.maybe_update_params_sharding_with_opt(config, state_shardings))
  in_state = sharding.build_zero1_input_state_mesh_shardings(
      config, state_shardings, params_shardings)
  data_sharding = sharding.get_input_data_sharding(config, mesh)
  fn, in_shard, out_shard, static, donate = (
      maxtext_utils.get_functional_train_with_signature(
          train.train_step, data_sharding, in_state, model, config,
          params_shardings))
  t0 = time.perf_counter()
  compiled = train_compile.jit_and_compile(
      fn, args, kwargs, mesh, in_shard, out_shard, static, donate, config,
      axis_rules(config.logical_axis_rules))
  seconds = time.perf_counter() - t0
  chip_name = aot.TOPOLOGIES[spec["topology"]][0]
  chip = aot.CHIPS[chip_name]
  state_leaves = jax.tree.leaves(args[0])
  shard_leaves = jax.tree.leaves(in_state)
  if len(state_leaves) == len(shard_leaves):
    state_leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                    for x, s in zip(state_leaves, shard_leaves)]
  flops = model_flops(spec) / mesh.devices.size
  axis = "fsdp" if spec["variant"] == "fsdp" else "data"
  return {"mesh": f"{axis}:{spec['data']},expert:{spec['expert']}",
          "compile_s": seconds,
          **summarize(compiled, chip, mesh.devices.size,
                      shard_bytes(state_leaves), flops, top_ops)}

