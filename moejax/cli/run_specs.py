"""Run specs of comparison scripts: `[LABEL=]ROUTER[,FLAG=VALUE...]` lists.

Used by `experiments/compare_routers.py` and `experiments/bench_*.py`: a run is a
router name plus the `experiments/train_lm.py` flags that differ for it, e.g.
`top_p,p=0.3` or `dtop_p_layer=dtop_p,dtop_p_scope=layer`; specs are separated
by ';'. Values are Python literals where they parse as one, else strings.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One line of the comparison: a label, a router and its flag overrides."""
  label: str
  router: str
  options: dict[str, Any]


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_runs(text: str) -> list[RunSpec]:
  """Parses `--runs`; raises ValueError naming a bad spec."""
  specs = []
  for raw in (s.strip() for s in text.split(";")):
    if not raw:
      continue
    head, *rest = [p.strip() for p in raw.split(",")]
    label, _, router = head.rpartition("=")
    label = label or raw.replace(",", "_").replace("=", "")
    options = {}
    for item in rest:
      key, eq, value = item.partition("=")
      if not eq or not key:
        raise ValueError(f"run spec {raw!r}: option {item!r} must be FLAG=VALUE")
      options[key.strip()] = _value(value.strip())
    specs.append(RunSpec(label, router.strip(), options))
  labels = [s.label for s in specs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"run labels must be unique; got {labels}")
  if not specs:
    raise ValueError("runs is empty; give at least one run spec")
  return specs
