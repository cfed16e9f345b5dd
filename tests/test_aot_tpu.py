"""Ahead-of-time compilation for TPU slices (`moejax.aot`): the HLO collective
parser and roofline on hand-written inputs, block remat parity on CPU, and,
when libtpu is installed, a small MoE LM's train step compiled for a v5e 2x2
slice with its memory, FLOPs and collectives read back."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import aot, dispatch, routing
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

HLO = """
  %a2a = bf16[2,4,8]{2,1,0:T(8,128)(2,1)} all-to-all(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={1}
  %a2a.clone = bf16[2,4,8]{2,1,0} all-to-all(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={1}
  %ar = (f32[16]{0}, f32[]{:T(128)}) all-reduce(%y, %z), channel_id=2, replica_groups=[2,2]<=[4], to_apply=%add
  %ag = bf16[32,8]{1,0} all-gather(%w), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[4]{0} reduce-scatter(%g), channel_id=4, replica_groups={{0,1}}, dimensions={0}
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%v), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  %add.1 = f32[8]{0} add(%all-reduce.1, %q)
"""
# A shard_map's all-to-alls (forward and transposed) under one channel id:
# distinct collectives, told apart by their source metadata.
SHARD_MAP_HLO = """
  %all_to_all.1 = bf16[2,4,8]{2,1,0} all-to-all(%x), channel_id=1, replica_groups={{0,1}}, dimensions={1}, metadata={op_name="jit(loss)/jvp()/shard_map/all_to_all" stack_frame_id=7}
  %all_to_all.2 = bf16[2,4,8]{2,1,0} all-to-all(%y), channel_id=1, replica_groups={{0,1}}, dimensions={1}, metadata={op_name="jit(loss)/transpose(jvp())/shard_map/all_to_all" stack_frame_id=8}
  %all_to_all.3 = bf16[4,2,8]{2,1,0} all-to-all(%z), channel_id=1, replica_groups={{0,1}}, dimensions={0}, metadata={op_name="jit(loss)/jvp()/shard_map/all_to_all" stack_frame_id=8}
"""


def test_hlo_collectives_counts_bytes_and_traffic():
  c = aot.hlo_collectives(HLO)
  assert c["all-to-all"] == {"count": 1, "bytes": 128.0,
                             "traffic": 128.0 * 3 / 4}
  assert c["all-reduce"] == {"count": 1, "bytes": 68.0,
                             "traffic": 2 * 68.0 / 2}
  assert c["all-gather"] == {"count": 1, "bytes": 512.0,
                             "traffic": 512.0 * 3 / 4}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 16.0, "traffic": 16.0}
  assert c["collective-permute"] == {"count": 1, "bytes": 32.0,
                                     "traffic": 32.0}
  shard_map = aot.hlo_collectives(SHARD_MAP_HLO)["all-to-all"]
  assert shard_map == {"count": 3, "bytes": 384.0, "traffic": 192.0}
  # Mesh replica groups with a device order (GSPMD's resharding).
  permuted = aot.hlo_collectives(
      "  %a2a = bf16[2,4,8]{2,1,0} all-to-all(%x), channel_id=1, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=1], "
      "device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={1}\n")
  assert permuted["all-to-all"] == {"count": 1, "bytes": 128.0,
                                    "traffic": 128.0 / 2}


def test_estimate_step_is_the_largest_of_compute_hbm_ici():
  chip = aot.Chip("test", peak_flops=100.0, hbm_bytes=10, hbm_bandwidth=10.0,
                  ici_bandwidth=1.0)
  e = aot.estimate_step(flops_per_device=200.0, hbm_bytes_per_device=10.0,
                        ici_traffic_per_device=3.0,
                        model_flops_per_device=150.0, chip=chip)
  assert e["step_s"] == 3.0 and e["bound"] == "ici"
  assert e["step_no_overlap_s"] == 6.0
  assert e["mfu"] == pytest.approx(150.0 / 300.0)


def test_unknown_topology_names_the_allowed_ones():
  with pytest.raises(ValueError, match="v5p-64"):
    aot.topology_devices("v9-1")


def _tiny_moe_lm(remat: bool = False) -> LMConfig:
  moe = MoEConfig(num_experts=4, expert_width=32,
                  router=routing.build("top_k", {"k": 2}), strategy="index")
  return LMConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4,
                  d_ff=128, max_len=64, moe=moe, remat=remat)


def test_block_remat_keeps_params_loss_and_grads():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)),
                       jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "router": jax.random.PRNGKey(1)}
  plain, remat = TransformerLM(_tiny_moe_lm()), TransformerLM(
      _tiny_moe_lm(remat=True))
  variables = plain.init(rngs, tokens, train=False)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(remat.init(rngs, tokens, train=False)))

  def loss(model, params):
    logits = model.apply({**variables, "params": params}, tokens, train=True,
                         rngs={"router": jax.random.PRNGKey(2)},
                         mutable=True)[0]
    return jnp.mean(logits ** 2)

  want = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(
      variables["params"])
  got = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(
      variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), got, want)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip "
                    "install -e '.[tpu]'): no TPU topology to compile for")
def test_small_moe_step_compiles_for_a_v5e_2x2_slice():
  _, devices = aot.topology_devices("v5e:2x2")
  with jax.set_mesh(aot.topology_mesh("data:4", devices)):
    assert dispatch.current_backend() == "tpu"  # TPU choices on a CPU host
  cfg = TrainConfig(model=_tiny_moe_lm(), batch_size=4, seq_len=64)
  compiled, mesh, chip = aot.compile_for_topology(cfg, "v5e:2x2",
                                                  "data:1,expert:2,model:2")
  assert mesh.devices.size == 4 and chip.name == "TPU v5e"
  assert "TPU" in mesh.devices.flat[0].device_kind
  report = aot.tpu_report(cfg, compiled, mesh, chip)
  assert report["fits"] and 0 < report["hbm_peak_bytes"] < chip.hbm_bytes
  assert report["params_bytes"] > 0 and report["optimizer_bytes"] > 0
  assert report["flops_per_device"] > 0 and report["model_flops_per_device"] > 0
  coll = report["collectives"]
  assert coll["all-to-all"]["count"] > 0 and coll["all-to-all"]["bytes"] > 0
  assert coll["all-reduce"]["count"] > 0  # gradients over the model axis
  est = report["estimate"]
  assert est["step_s"] > 0 and 0 < est["mfu"] <= 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip "
                    "install -e '.[tpu]'): no TPU topology to compile for")
def test_moe_mesh_paths_cost_a_chip_what_the_single_chip_path_does(tmp_path):
  # experiments/bench_moe_tpu.py at a tiny size on a v5e 2x2 slice: the MoE
  # layer's fwd+bwd with 4x the tokens on data:4 and expert:4 against the
  # single-chip program (mesh of one chip) at the same tokens per chip.
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "bench_moe_tpu.py"),
       "--topology=v5e:2x2", "--sizes=256x128x128x8x2", "--seq_groups=128",
       "--meshes=data:N;expert:N", f"--out={out}"],
      cwd=ROOT, env=one_device_env(JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = {(r["mesh"], r["mode"], r["router"]): r
          for r in json.loads(out.read_text())["rows"]}
  single = rows[("chip", "-", "top_k")]
  assert not any(c["count"] for c in single["collectives"].values())
  data = rows[("data:4", "-", "top_k")]
  for key in ("flops", "bytes", "chip_s"):  # the per-device plan, no overhead
    assert 0.9 < data["vs_single"][key] < 1.1, (key, data["vs_single"])
  assert data["collectives"]["all-to-all"]["count"] == 0
  # Expert weight bytes one chip holds (bfloat16 casts of E/4 experts).
  shard = 3 * 2 * 128 * 128 * 2
  for mode in ("gspmd", "shard_map"):
    row = rows[("expert:4", mode, "top_k")]
    coll = row["collectives"]
    # Two all-to-alls forward (to the experts and back), two backward, each
    # moving one chip's [G, E, C, D] buffer: bf16[2 groups, 8, 40, 128].
    assert coll["all-to-all"]["count"] == 4, (mode, coll)
    assert coll["all-to-all"]["bytes"] == 4 * 2 * 8 * 40 * 128 * 2, coll
    # No gather of the expert weights (each chip keeps its experts).
    assert coll["all-gather"]["bytes"] < shard, (mode, coll)
    assert 0.9 < row["vs_single"]["flops"] < 1.1, (mode, row["vs_single"])


def _compile_only(capsys, **flags):
  from moejax.cli import lm_flags
  values = {"config": "tiny", "router": "top_k", "batch_size": 4,
            "seq_len": 32, **flags}
  code = lm_flags.compile_only(values)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_compile_only_on_the_local_devices(capsys):
  code, out, err = _compile_only(capsys, num_devices=1)
  assert code == 0, err
  assert "1 local cpu device(s), mesh data:1" in out and ": fits" in out
  assert "temporaries" in out and "FLOPs per step per device" in out
  assert "estimated step time: unknown" in out  # no peak for a CPU


def test_compile_only_refuses_a_bad_topology_and_no_libtpu(capsys,
                                                            monkeypatch):
  code, out, err = _compile_only(capsys, topology="v9-1")
  assert code == 2 and not out
  assert err.count("\n") == 1 and "allowed: v5e-4" in err
  monkeypatch.setitem(sys.modules, "libtpu", None)  # not importable
  code, out, err = _compile_only(capsys, topology="v5e-4")
  assert code == 2 and err.count("\n") == 1
  assert 'pip install -e ".[tpu]"' in err


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip "
                    "install -e '.[tpu]'): no TPU topology to compile for")
def test_compile_only_for_a_tpu_slice_fits_or_not(capsys):
  code, out, err = _compile_only(capsys, topology="v5e-4",
                                 mesh="data:2,expert:2")
  assert code == 0, err
  lines = out.splitlines()
  assert lines[0] == ("compiled for v5e-4 (4 x TPU v5e), mesh "
                      "data:2,expert:2,model:1: fits")
  assert "of 16.00 GiB" in lines[1] and "optimizer" in lines[1]
  assert "estimated step time" in lines[3] and "MFU" in lines[3]
  # 4 layers of 8 experts 128 x 2^20 wide: 12.9 GB of float32 params per
  # chip with the experts over 2 chips, 3 x that with AdamW: no fit in 16 GiB.
  code, out, err = _compile_only(capsys, topology="v5e-4",
                                 mesh="data:2,expert:2", expert_width=2**20)
  assert code == 1, err
  assert "does NOT fit" in out.splitlines()[0]
