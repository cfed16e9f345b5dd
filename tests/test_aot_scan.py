"""FLOPs, bytes and collectives of a layer-scanned train step
(`moejax.aot.step_cost`): XLA counts a while loop's body once, so the
report takes them from unrolled compiles at one and two periods,
extrapolated, and says where each number came from."""
import dataclasses

import jax
import pytest

from moejax import aot, sharding
from moejax.models.lm import LMConfig
from moejax.nn.mod import MoDConfig
from moejax.nn.moe import MoEConfig
from moejax.routing import TopK
from moejax.tasks.lm import TrainConfig


def _run(scan: bool, layers: int = 4) -> TrainConfig:
  model = LMConfig(num_layers=layers, d_model=32, num_heads=2, d_ff=64,
                   max_len=32, moe=MoEConfig(num_experts=4, expert_width=32,
                                             router=TopK(k=2)),
                   first_dense_layers=1, remat="block", scan_layers=scan)
  return TrainConfig(model=model, batch_size=4, seq_len=32, num_devices=1)


def test_extrapolate_and_unrolled_depths():
  a = {"n": 10, "x": 1.0, "d": {"y": 2.0}, "s": "a"}
  b = {"n": 14, "x": 3.0, "d": {"y": 2.5}, "s": "b"}
  assert aot.extrapolate(a, b, 1, 2, 5) == {"n": 26, "x": 9.0,
                                            "d": {"y": 4.0}, "s": "b"}
  assert aot.unrolled_depths(_run(False).model) is None
  # dense block 0 unrolled, then periods of 1 block
  assert aot.unrolled_depths(_run(True).model) == (2, 3, 1)
  mod = dataclasses.replace(_run(True, 7).model,
                            mod=MoDConfig(capacity=0.5))
  # blocks 0-1 unrolled, 2 periods of 2, block 6 after: d = 2 + 2 + 1
  assert aot.unrolled_depths(mod) == (5, 7, 2)


def test_scanned_step_cost_equals_the_unrolled_step():
  """The scanned step's costs from 2- and 3-layer unrolled compiles match the
  4-layer unrolled step's (FLOPs to 1%, bytes to 5%); XLA's own count of the
  scanned step is an undercount, and the sources say which is which."""
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  compile_fn = lambda c: aot.lower_train_step(c, mesh).compile()
  unrolled, scanned = _run(False), _run(True)
  ref = aot.step_cost(unrolled, compile_fn(unrolled), 1)
  assert set(ref["cost_source"].values()) == {aot.XLA_SOURCE, aot.HLO_SOURCE}
  compiled = compile_fn(scanned)
  got = aot.step_cost(scanned, compiled, 1, compile_fn)
  assert got["flops_per_device"] == pytest.approx(ref["flops_per_device"],
                                                  rel=0.01)
  assert got["hbm_bytes_accessed"] == pytest.approx(
      ref["hbm_bytes_accessed"], rel=0.05)
  assert got["cost_source"]["flops_per_device"].startswith(
      "the unrolled step compiled at 2 and 3 layers, extrapolated to 4")
  quick = aot.step_cost(scanned, compiled, 1)  # no extra compiles
  assert quick["hbm_bytes_accessed"] < 0.8 * ref["hbm_bytes_accessed"]
  assert "undercount" in quick["cost_source"]["hbm_bytes_accessed"]
  assert quick["flops_per_device"] == pytest.approx(
      aot.flops_lib.train_flops(scanned.model, 4, 32) * 4 / 3)
  assert quick["cost_source"]["flops_per_device"] == (
      "moejax.flops analytic count x 4/3 (block remat)")


def test_compile_only_of_a_scanned_run_names_its_sources(capsys):
  from moejax.cli import lm_flags
  code = lm_flags.compile_only({
      "config": "tiny", "router": "top_k", "batch_size": 4, "seq_len": 32,
      "num_devices": 1, "override": ["model.scan_layers=true"]})
  out = capsys.readouterr()
  assert code == 0, out.err
  assert ("FLOPs / bytes / collectives from: flops_per_device, "
          "hbm_bytes_accessed, collectives: the unrolled step compiled at 1 "
          "and 2 layers, extrapolated to 4") in out.out
