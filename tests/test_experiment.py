"""moejax.experiment: run specs, seeds, statistics, tables, the run loop."""
import json
import math
import os

import pytest

from moejax import experiment
from moejax.experiment import RunSpec


def test_parse_runs_labels_values_and_errors():
  specs = experiment.parse_runs(
      "dense; top_p,p=0.3 ;dl=dtop_p,dtop_p_scope=layer,normalize=false;")
  assert specs == [
      RunSpec("dense", "dense", {}), RunSpec("top_p_p0.3", "top_p", {"p": 0.3}),
      RunSpec("dl", "dtop_p", {"dtop_p_scope": "layer", "normalize": False})]
  assert experiment.parse_runs("top_k,k=2", label_from="router")[0].label == (
      "top_k")
  with pytest.raises(ValueError, match="must be FLAG=VALUE"):
    experiment.parse_runs("top_k,k")
  with pytest.raises(ValueError, match="unique"):
    experiment.parse_runs("top_k;top_k")
  with pytest.raises(ValueError, match="empty"):
    experiment.parse_runs(" ; ")
  with pytest.raises(ValueError, match="label_from"):
    experiment.parse_runs("top_k", label_from="x")


def test_parse_runs_value_parser_names_the_spec():
  def value(key, text):
    if key != "group_size":
      raise ValueError(f"unknown flag {key!r}")
    return 64 if text == "BATCH" else int(text)
  spec, = experiment.parse_runs("ec=expert_choice,group_size=BATCH",
                                value_parser=value)
  assert spec.options == {"group_size": 64}
  with pytest.raises(ValueError, match="'ec=expert_choice,bogus=1'.*bogus"):
    experiment.parse_runs("ec=expert_choice,bogus=1", value_parser=value)


def test_parse_seeds():
  assert experiment.parse_seeds("0, 1,,3") == [0, 1, 3]
  with pytest.raises(ValueError, match="'x' is not an integer"):
    experiment.parse_seeds("0,x")


def test_mean_std_and_formats():
  assert experiment.mean_std([None]) == (None, None)
  assert experiment.mean_std([2.0]) == (2.0, 0.0)
  mean, std = experiment.mean_std([1.0, None, 3.0])
  assert mean == 2.0 and std == pytest.approx(math.sqrt(2))
  assert experiment.format_ms((0.5, 0.25), ".2f") == "0.50 ± 0.25"
  assert experiment.format_ms((0.5, 0.25), ".1f", pct=True) == "50.0% ± 25.0"
  assert experiment.format_ms(None, missing="—") == "—"
  assert experiment.format_values([1.23456]) == "1.2346"
  assert experiment.format_values([1.0, 3.0], ".4g", ".2g") == "2 ± 1.4"
  assert experiment.format_values([], missing="n/a") == "n/a"


def test_paired_delta_uses_common_seeds_only():
  base = {0: 1.0, 1: 2.0, 2: 5.0}
  other = {0: 1.5, 1: 2.5, 3: 9.0}
  d = experiment.paired_delta(base, other)
  assert d["seeds"] == [0, 1] and d["deltas"] == [0.5, 0.5]
  assert d["mean"] == 0.5 and d["std"] == 0.0 and d["sem"] == 0.0
  assert experiment.paired_delta({0: 1.0}, {1: 1.0})["mean"] is None
  records = [{"seed": 0, "loss": 1.0}, {"seed": 1}]
  assert experiment.by_seed(records, "loss") == {0: 1.0, 1: None}


def test_markdown_table():
  table = experiment.markdown_table(["a", "b"], [["1", "2"], ["3"]])
  assert table == "| a | b |\n| --- | --- |\n| 1 | 2 |\n| 3 |  |"
  with pytest.raises(ValueError, match="3 cells"):
    experiment.markdown_table(["a"], [["1", "2", "3"]])


def test_run_grid_is_seed_major_and_skips_recorded_runs(tmp_path):
  path = lambda label, seed: str(tmp_path / f"{label}_s{seed}.json")
  calls = []

  def run(label, seed):
    calls.append((label, seed))
    if label == "bad":
      raise RuntimeError("boom")
    return {"label": label, "seed": seed, "loss": seed}

  with pytest.raises(RuntimeError):
    experiment.run_grid(["a", "bad"], [0], path, run, log=lambda s: None)
  calls.clear()
  out = experiment.run_grid(["a", "bad"], [0, 1], path, run, keep_going=True,
                            log=lambda s: None)
  # a_s0 was recorded by the first call; the failed run is retried.
  assert calls == [("bad", 0), ("a", 1), ("bad", 1)]
  assert [r.get("error") for r in out] == [None, "RuntimeError: boom", None,
                                           "RuntimeError: boom"]
  with open(path("bad", 1)) as f:
    assert json.load(f)["error"] == "RuntimeError: boom"
  calls.clear()
  again = experiment.run_grid(["a", "bad", "new"], [0, 1], path, run,
                              train=False, log=lambda s: None)
  assert calls == [] and [r["label"] for r in again] == ["a", "a"]
  assert experiment.workdir("w", "a", 1) == os.path.join("w", "a_s1")
  assert experiment.record_path("o", "a", 1) == os.path.join("o", "a_s1.json")
  assert len(experiment.load_records(str(tmp_path))) == 4


def test_load_module(tmp_path):
  (tmp_path / "cfg.py").write_text("X = 3\n")
  assert experiment.load_module(str(tmp_path / "cfg.py")).X == 3
  # A dataclass with postponed annotations needs its module in sys.modules.
  (tmp_path / "with_dataclass.py").write_text(
      "from __future__ import annotations\nimport dataclasses\n"
      "@dataclasses.dataclass(frozen=True)\nclass Size:\n  tokens: int\n")
  module = experiment.load_module(str(tmp_path / "with_dataclass.py"))
  assert module.Size(3).tokens == 3
  (tmp_path / "broken.py").write_text("raise RuntimeError('no')\n")
  with pytest.raises(RuntimeError, match="no"):
    experiment.load_module(str(tmp_path / "broken.py"))
  import sys  # pylint: disable=g-import-not-at-top
  assert "broken" not in sys.modules


def test_plots_write_pngs(tmp_path):
  from moejax.experiment import plots
  history = [{"step": 0, "loss": 2.0, "p": 0.5}, {"step": 1, "eval_loss": 1.9},
             {"step": 2, "loss": 1.5, "p": None}, {"step": 3, "loss": 1.0}]
  assert plots.series(history, "loss") == ([0, 2, 3], [2.0, 1.5, 1.0])
  assert plots.series(history, "p") == ([0], [0.5])
  path = str(tmp_path / "sub" / "a.png")
  with plots.figure(path) as (_, ax):
    ax.plot(*plots.series(history, "loss"))
  fig, _ = plots.pyplot().subplots()
  assert os.path.getsize(path) > 0
  assert os.path.getsize(plots.save(fig, str(tmp_path / "b.png"))) > 0
