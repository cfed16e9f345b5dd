"""experiments/baseline_table.py on the committed run records: every column is
computed as documented (checked against numpy on the raw records), both
runners' record layouts agree on what a dead expert is, and the committed
baselines.json matches a fresh tabulation."""
import glob
import json
import os

import numpy as np
import pytest

from moejax.experiment import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = load_module(os.path.join(ROOT, "experiments", "baseline_table.py"))


def _records(folder):
  out = []
  for path in sorted(glob.glob(os.path.join(TABLE.REPORTS, folder, "*.json"))):
    with open(path) as fh:
      out.append(json.load(fh))
  return out


@pytest.mark.parametrize("name", sorted(TABLE.SETS))
def test_columns_follow_the_raw_records(name):
  records = _records(TABLE.SETS[name][0])
  assert records, name
  for record in records:
    row = TABLE.metrics(record)
    if record.get("router") == "dense":  # no routing columns, still a loss
      assert row["loss"] == record["final_eval"]["eval_loss"] > 0
      assert all(row[k] is None for k in ("drop", "max_vio", "load_cv",
                                          "dead", "fanout")), row
      continue
    assert 0.0 <= row["dead"] <= 1.0, (name, record.get("label"), row)
    assert 0.0 <= row["drop"] <= 1.0
    assert row["loss"] > 0 and row["fanout"] > 0
    if "final_eval" in record:  # a count per layer, as a fraction of E
      assert row["dead"] == pytest.approx(
          record["final_eval"]["eval_dead_experts"]
          / record["config"]["num_experts"])
    else:
      load = np.asarray(record["evals"]["eval"]["expert_load"])
      dead = load < 0.01 * load.mean(axis=-1, keepdims=True)
      assert row["dead"] == pytest.approx(dead.mean())


def test_committed_json_matches_a_fresh_tabulation():
  with open(os.path.join(TABLE.REPORTS, "baselines.json")) as fh:
    committed = json.load(fh)
  assert set(committed) == set(TABLE.SETS)
  for name, (folder, _) in TABLE.SETS.items():
    records = _records(folder)
    _, fresh = TABLE.table(records)
    assert _close(fresh, committed[name])
    for label, row in fresh.items():  # mean and sample std of the losses
      losses = [TABLE.metrics(r)["loss"] for r in records
                if r["label"] == label]
      assert row["loss"]["mean"] == pytest.approx(np.mean(losses))
      if len(losses) > 1:
        assert row["loss"]["std"] == pytest.approx(np.std(losses, ddof=1))


def _close(a, b) -> bool:
  if isinstance(a, dict):
    assert set(a) == set(b)
    return all(_close(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    return all(_close(x, y) for x, y in zip(a, b))
  if isinstance(a, float):
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return True
  assert a == b
  return True
