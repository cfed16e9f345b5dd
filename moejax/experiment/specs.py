"""Run specs and seed lists of the experiment drivers.

A run spec is `[LABEL=]ROUTER[,FLAG=VALUE...]`: a router name plus the
`experiments/train_lm.py` flags (or method fields) that differ for that run,
e.g. `top_p,p=0.3` or `dtop_p_layer=dtop_p,dtop_p_scope=layer`; specs are
separated by ';'. Values are Python literals where they parse as one (`true` /
`false` are booleans too), else strings; a driver may pass its own
`value_parser` (e.g. the absl flag parsers).

Axis legend: none (configuration only).
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One line of a comparison: a label, a router and its flag overrides."""
  label: str
  router: str
  options: dict[str, Any]


def parse_value(text: str) -> Any:
  """A Python literal where `text` parses as one, `true`/`false`, else text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_runs(text: str, *, value_parser: Optional[Callable[[str, str], Any]]
               = None, label_from: str = "spec", flag_values: Any = None,
               exclude: Iterable[str] = (),
               substitute: Optional[Mapping[str, str]] = None) -> list[RunSpec]:
  """Parses a `--runs` list; raises ValueError naming a bad spec.

  Args:
    text: specs separated by ';'.
    value_parser: `(flag, text) -> value` for the option values; default
      `parse_value(text)`. It may raise ValueError for an unknown flag.
    label_from: label of a spec without `LABEL=`: "spec" (the spec text, e.g.
      `top_p_p0.3`) or "router" (the router name).
    flag_values, exclude, substitute: with `flag_values` (absl `FlagValues`,
      e.g. a driver's `FLAGS`) the options must be its flags, parsed by their
      parsers: `value_parser = flag_parser(flag_values, exclude=exclude,
      substitute=substitute)`.

  Returns:
    The specs in order.
  """
  if label_from not in ("spec", "router"):
    raise ValueError(f"label_from={label_from!r} is not supported; allowed: "
                     "spec, router")
  if flag_values is not None:
    value_parser = flag_parser(flag_values, exclude=exclude,
                               substitute=substitute)
  specs = []
  for raw in (s.strip() for s in text.split(";")):
    if not raw:
      continue
    head, *rest = [p.strip() for p in raw.split(",")]
    label, _, router = head.rpartition("=")
    router = router.strip()
    if not label:
      label = router if label_from == "router" else raw.replace(
          ",", "_").replace("=", "")
    options = {}
    for item in rest:
      key, eq, value = item.partition("=")
      key, value = key.strip(), value.strip()
      if not eq or not key:
        raise ValueError(f"run spec {raw!r}: option {item!r} must be FLAG=VALUE")
      try:
        options[key] = (value_parser(key, value) if value_parser
                        else parse_value(value))
      except ValueError as e:
        raise ValueError(f"run spec {raw!r}: {e}") from e
    specs.append(RunSpec(label.strip(), router, options))
  labels = [s.label for s in specs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"run labels must be unique; got {labels}")
  if not specs:
    raise ValueError("runs is empty; give at least one run spec")
  return specs


def flag_parser(flag_values: Any, *, exclude: Iterable[str] = (),
                substitute: Optional[Mapping[str, str]] = None
                ) -> Callable[[str, str], Any]:
  """A `parse_runs` value parser: each option must be a flag of
  `flag_values` (absl `FlagValues`; not one of `exclude`, e.g. the driver's
  own flags) and its value is parsed by that flag's parser, after replacing a
  value equal to a key of `substitute` (e.g. `{"BATCH": "4096"}`)."""
  exclude = frozenset(exclude)
  substitute = dict(substitute or {})

  def value(key: str, text: str) -> Any:
    if key not in flag_values or key in exclude:
      raise ValueError(f"unknown flag {key!r}; allowed: the flags of "
                       "experiments/train_lm.py")
    return flag_values[key].parser.parse(substitute.get(text, text))
  return value


def parse_seeds(text: str) -> list[int]:
  """`"0,1,2"` -> [0, 1, 2]; raises ValueError naming a bad entry."""
  seeds = []
  for item in (s.strip() for s in str(text).split(",")):
    if not item:
      continue
    try:
      seeds.append(int(item))
    except ValueError:
      raise ValueError(f"seeds={text!r}: {item!r} is not an integer") from None
  return seeds
