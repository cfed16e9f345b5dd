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
