"""experiments/report_flops.py: the training FLOPs the reports' verdict tables
quote, against a count by hand."""
import os

from moejax.experiment import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
report_flops = load_module(os.path.join(ROOT, "experiments",
                                        "report_flops.py"))


def test_dense_run_flops_match_a_hand_count():
  # mod.md's dense run: `tiny` (4 blocks, D 128, F 512, SwiGLU, vocab 256),
  # batch 8 x 128, 200 steps. Per token per block: attention projections
  # 2*4*D^2, scores 2*2*L*D, MLP 2*3*D*F; plus the head 2*D*V.
  d, f, length, v = 128, 512, 128, 256
  per_token = 4 * (8 * d * d + 4 * length * d + 6 * d * f) + 2 * d * v
  want = 3 * per_token * 8 * length * 200
  got = report_flops.run_flops(dict(config="tiny", batch_size=8,
                                    router="dense"), 200)
  assert abs(got / want - 1) < 1e-9
  assert abs(got - 1.5e12) / 1.5e12 < 0.05   # the number the reports quote


def test_paper_flops_are_six_n_d():
  assert report_flops.paper_flops("expert_threshold") == 6 * 195e6 * 10e9
  assert report_flops.paper_flops("dtop_p") == 6 * 1.3e9 * 100e9
  assert report_flops.paper_flops("dtop_p_dit") is None  # tokens not stated
  assert report_flops.paper_flops("mod") == 6e18
  for report, key, _, steps in report_flops.SETS.values():
    assert key in report_flops.PAPERS and steps > 0 and report
