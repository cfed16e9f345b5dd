"""The MaxText side-by-side script's pure parts (experiments/peer_maxtext_aot.py):
reading the largest instructions of a compiled HLO text, the depth
extrapolation and the moejax config of a spec (no compile, no MaxText)."""
import os

import pytest

from moejax.experiment import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
peer = load_module(os.path.join(ROOT, "experiments", "peer_maxtext_aot.py"))

HLO = """\
HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0: f32[8,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %big.inner = f32[8,16]{1,0} multiply(f32[8,16]{1,0} %param_0, f32[8,16]{1,0} %param_0)
}

ENTRY %main (p0: bf16[4,1024], p1: f32[8,16]) -> f32[8,16] {
  %p0 = bf16[4,1024]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %convert.3 = f32[4,1024]{1,0} convert(bf16[4,1024]{1,0} %p0), metadata={op_name="jit(train_step)/convert_element_type"}
  %fusion.2 = f32[8,16]{1,0} fusion(f32[8,16]{1,0} %p1), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/mul"}
  ROOT %all-reduce.1 = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %fusion.2), channel_id=1, replica_groups={{0,1}}, to_apply=%add
}
"""


def test_largest_instructions_ranks_scheduled_ops_by_bytes():
  ops = peer.largest_instructions(HLO, top=5)
  # fusion bodies and parameters are not listed
  assert [o["name"] for o in ops] == ["convert.3", "fusion.2", "all-reduce.1"]
  assert ops[0]["bytes"] == 4 * 1024 * (4 + 2)  # f32 result + bf16 operand
  assert ops[1]["bytes"] == 2 * 8 * 16 * 4
  assert ops[0]["op_name"].endswith("convert_element_type")
  assert peer.largest_instructions(HLO, top=1)[0]["name"] == "convert.3"


def test_extrapolate_is_linear_in_depth_and_nested():
  a = {"x": 10.0, "n": {"y": 3}, "s": "a"}
  b = {"x": 14.0, "n": {"y": 5}, "s": "b"}
  out = peer.extrapolate(a, b, 1, 2, 16)
  assert out == {"x": 10.0 + 4.0 * 15, "n": {"y": 3 + 2 * 15}, "s": "b"}


@pytest.mark.parametrize("remat", ["full", "selective", "selective_moe",
                                   "selective_matmuls", "selective_dots",
                                   "none"])
def test_moejax_config_of_a_spec(remat):
  spec = {"library": "moejax", "topology": "v5p-64", "shape": "paper",
          "remat": remat, "variant": "ep", "data": 4, "expert": 8,
          "depth": 2, "loss_chunk": 256}
  cfg = peer.moejax_config(spec)
  assert cfg.model.num_layers == 2 and cfg.batch_size == 256
  assert cfg.model.moe.router.name == "top_k" and cfg.model.moe.router.k == 8
  assert cfg.model.loss_chunk == 256 and cfg.seq_len == 2048
  assert cfg.model.remat == peer.REMAT[remat][1]
  assert peer.spec_key(spec).endswith("remat=" + remat + "/loss_chunk=256/L2")


def test_a_spec_with_a_strategy_keys_and_configures_it():
  spec = {"library": "moejax", "topology": "v5p-64", "shape": "paper",
          "remat": "selective_moe", "variant": "fsdp", "data": 4,
          "expert": 8, "depth": 1, "loss_chunk": 256, "strategy": "gather"}
  cfg = peer.moejax_config(spec)
  assert cfg.model.moe.strategy == "gather"
  assert cfg.model.remat == "save_moe_operands"
  assert peer.spec_key(spec).endswith("/loss_chunk=256/strategy=gather/L1")
  default = peer.moejax_config({**spec, "strategy": ""})
  assert default.model.moe.strategy == "index"  # the paper config's


def test_one_depth_rows_report_that_depth_without_extrapolating():
  spec = {"library": "moejax", "topology": "v5p-64", "shape": "paper",
          "remat": "full", "variant": "ep", "data": 4, "expert": 8,
          "depth": 1, "loss_chunk": 0}
  one = {"ok": True, "state_bytes": 2**30, "temp_bytes": 2**31,
         "peak_bytes": 3 * 2**30, "flops": 1e12,
         "bytes_accessed": 5 * 2**30}
  row = peer.row_of({peer.spec_key(spec): one}, spec, ["1"])
  assert row["status"] == "only 1 layer compiled"
  assert "peak 3.00 GiB" in row["error"] and "5 GiB accessed" in row["error"]


def test_maxtext_remat_aliases_name_the_same_maxtext_policy():
  for setting, alias in peer.MAXTEXT_REMAT.items():
    assert peer.REMAT[setting][0] == peer.REMAT[alias][0]
    assert peer.REMAT[setting][1] != peer.REMAT[alias][1]  # moejax differs


def test_a_scanned_compile_sets_the_rows_memory_not_its_flops():
  spec = {"library": "moejax", "topology": "v5p-64", "shape": "paper",
          "remat": "full", "variant": "fsdp", "data": 4, "expert": 8,
          "depth": 1, "loss_chunk": 256}
  scan = {**spec, "depth": 16, "scan": True}
  assert peer.spec_key(scan).endswith("/L16/scan")
  assert peer.moejax_config(scan).model.scan_layers
  assert not peer.moejax_config(spec).model.scan_layers

  def compiled(layers, **over):
    return {"ok": True, "state_bytes": 2**30, "temp_bytes": layers * 2**30,
            "peak_bytes": (1 + layers) * 2**30, "flops": layers * 1e12,
            "bytes_accessed": layers * 2**30, "ici_traffic_bytes": 0,
            "model_flops": layers * 1e12, "mesh": "fsdp:4,expert:8",
            "compile_s": 1.0, "versions": {}, **over}
  compiles = {peer.spec_key(spec): compiled(1),
              peer.spec_key({**spec, "depth": 2}): compiled(2)}
  plain = peer.row_of(compiles, spec, ["1", "2"])
  assert plain["memory"] == "extrapolated"
  assert plain["peak_bytes"] == 17 * 2**30
  # the scanned program's memory (here 3 GiB less than the straight line)
  compiles[peer.spec_key(scan)] = compiled(13, flops=1e12)
  row = peer.row_of(compiles, spec, ["1", "2"])
  assert row["memory"] == "scanned"
  assert row["peak_bytes"] == 14 * 2**30 and row["temp_bytes"] == 13 * 2**30
  assert row["extrapolated_peak_bytes"] == 17 * 2**30
  assert row["flops"] == plain["flops"] == 16e12  # not the loop body's
  assert "(s; extrapolated 17.00)" in peer.markdown_table([row])


def test_maxtext_layouts_name_its_ici_axes():
  spec = {"data": 4, "expert": 8, "variant": "ep"}
  assert peer.maxtext_mesh(spec) == [
      "ici_fsdp_parallelism=1", "ici_data_parallelism=4",
      "ici_expert_parallelism=8"]
  assert peer.maxtext_mesh({**spec, "variant": "fsdp"}) == [
      "ici_fsdp_parallelism=4", "ici_data_parallelism=1",
      "ici_expert_parallelism=8"]
