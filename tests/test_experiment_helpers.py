"""The shared helpers of the experiment drivers: `tail_mean`, `flag_parser`,
`timing.time_calls`."""
import jax.numpy as jnp
import pytest
from absl import flags

from moejax import experiment


def test_tail_mean_of_scalars_and_per_layer_lists():
  records = [{"step": i, "loss": 1.0, "m": float(i), "l": [i, 2 * i]}
             for i in range(10)] + [{"eval_loss": 1.0, "m": 100.0}]
  assert experiment.tail_mean(records, "m") == (7 + 8 + 9) / 3  # ceil(2.5)
  assert experiment.tail_mean(records, "m", round_up=False) == 8.5  # int(2.5)
  assert experiment.tail_mean(records, "l") == [8.0, 16.0]
  assert experiment.tail_mean(records, "absent") is None
  assert experiment.tail_mean(records[:1], "m", 0.01) == 0.0  # at least one


def test_flag_parser_checks_and_parses_flags():
  values = flags.FlagValues()
  flags.DEFINE_integer("group_size", None, "", flag_values=values)
  flags.DEFINE_string("out", "x", "", flag_values=values)
  parse = experiment.flag_parser(values, exclude=("out",),
                                 substitute={"BATCH": "64"})
  assert parse("group_size", "8") == 8 and parse("group_size", "BATCH") == 64
  for key in ("out", "nope"):
    with pytest.raises(ValueError, match=f"unknown flag '{key}'"):
      parse(key, "1")
  specs = experiment.parse_runs("a=top_k,group_size=BATCH", value_parser=parse)
  assert specs[0].options == {"group_size": 64}


def test_time_calls_times_each_repeat():
  calls = []

  def fn(x):
    calls.append(1)
    return x + 1

  times = experiment.timing.time_calls(fn, jnp.ones(3), repeats=4, warmup=2,
                                       calls=3)
  assert len(times) == 4 and all(t > 0 for t in times)
  assert len(calls) == 2 + 4 * 3


def test_interleaved_rounds_visit_every_variant_in_order():
  order = []
  fns = {name: (lambda name=name: order.append(name) or jnp.ones(2))
         for name in ("a", "b")}
  out = experiment.timing.interleaved(fns, repeats=3, warmup=1, calls=2)
  # warm-up of each variant, then rounds of a, a, b, b (calls=2)
  assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3
  assert set(out) == {"a", "b"}
  for t in out.values():
    assert len(t.wall) == len(t.cpu) == 3
    assert all(w > 0 and c >= 0 for w, c in zip(t.wall, t.cpu))


def test_timed_returns_the_ready_result():
  out, seconds = experiment.timing.timed(lambda x: x * 2, jnp.arange(3))
  assert out.tolist() == [0, 2, 4] and seconds > 0


def test_define_flags_adds_the_shared_timing_flags():
  values = flags.FlagValues()
  experiment.timing.define_flags(repeats=4, warmup=2, flag_values=values)
  values(["prog"])
  assert values.repeats == 4 and values.warmup == 2


def test_history_keeps_named_and_prefixed_metrics():
  rows = [{"step": 1, "loss": 2.0, "eval_loss": 3.0, "p": 0.5},
          {"step": 2, "p": 0.4}]
  assert experiment.history(rows, ("step", "loss")) == [
      {"step": 1, "loss": 2.0}, {"step": 2}]
  assert experiment.history(rows, ("loss", "step"), fill=True) == [
      {"loss": 2.0, "step": 1}, {"loss": None, "step": 2}]
  assert experiment.history(rows, ("step",), prefixes=("eval_", "loss")) == [
      {"step": 1, "loss": 2.0, "eval_loss": 3.0}, {"step": 2}]


def test_paired_table_rows_and_columns():
  base, other = {0: 1.0, 1: 2.0, 2: None}, {0: 0.5, 1: 2.5, 2: 1.0}
  text = experiment.paired_table([("b", base, other), ("none", base, {5: 1.0})],
                                 sem=True)
  lines = text.splitlines()
  assert lines[0] == ("| run | seeds | per seed | mean ± std | sem | "
                      "seeds where run is lower |")
  assert lines[2] == ("| b | 0,1 | -0.5000 / +0.5000 | +0.0000 ± 0.7071 | "
                      "0.5000 | 1 of 2 |")
  assert len(lines) == 3  # no common seed: no row
  short = experiment.paired_table([("b", base, other)], first="runs")
  assert short.splitlines()[0] == "| runs | seeds | per seed | mean ± std |"


def test_parse_runs_with_flag_values_parses_by_the_flags():
  values = flags.FlagValues()
  flags.DEFINE_bool("normalize", True, "", flag_values=values)
  flags.DEFINE_integer("group_size", None, "", flag_values=values)
  flags.DEFINE_string("out", "x", "", flag_values=values)
  specs = experiment.parse_runs(
      "u=top_k,normalize=0,group_size=BATCH;top_p", flag_values=values,
      exclude=("out",), substitute={"BATCH": "32"}, label_from="router")
  assert [(s.label, s.options) for s in specs] == [
      ("u", {"normalize": False, "group_size": 32}), ("top_p", {})]
  with pytest.raises(ValueError, match="unknown flag 'out'"):
    experiment.parse_runs("top_k,out=y", flag_values=values, exclude=("out",))
