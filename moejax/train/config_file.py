"""A run's resolved config as JSON: `WORKDIR/config.json`.

The loop writes the config it trains at the start of every run, so that
`moejax.sample` (and anything else) can rebuild the model of a workdir, and so
that a resumed run can say what changed (`changes`).

Format: a frozen config dataclass is a JSON object of its fields plus
`"__type__": "module.Class"` (nested configs, e.g. the model, its MoE layer and
its routing method, likewise); tuples are written as lists and read back as
tuples. Only classes of moejax's own modules are rebuilt. A file written by
an older version still loads where its class says how: keyword aliases of
moved fields (`ALIASES`, e.g. a run config's flat loop fields, see
`moejax.train.config`) or `upgrade_fields(fields) -> fields` (e.g.
`LMConfig`'s flat `mod_*` fields).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

FILENAME = "config.json"


def to_dict(config: Any) -> Any:
  """A config (nested dataclasses) as JSON-able values (see the module doc)."""
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    cls = type(config)
    return {"__type__": f"{cls.__module__}.{cls.__qualname__}",
            **{f.name: to_dict(getattr(config, f.name))
               for f in dataclasses.fields(config) if f.init}}
  if isinstance(config, (list, tuple)):
    return [to_dict(v) for v in config]
  if isinstance(config, dict):
    return {str(k): to_dict(v) for k, v in config.items()}
  if config is None or isinstance(config, (bool, int, float, str)):
    return config
  raise ValueError(f"config value {config!r} of type {type(config).__name__} "
                   "is not JSON-able; allowed: dataclasses, tuples, numbers, "
                   "strings, None")


def from_dict(value: Any) -> Any:
  """Inverse of `to_dict`: rebuilds the dataclasses (lists -> tuples)."""
  if isinstance(value, list):
    return tuple(from_dict(v) for v in value)
  if not isinstance(value, dict):
    return value
  if "__type__" not in value:
    return {k: from_dict(v) for k, v in value.items()}
  name = value["__type__"]
  module, _, qualname = name.rpartition(".")
  if not module.split(".")[0] == "moejax":
    raise ValueError(f"__type__={name!r} is not a moejax config; allowed: "
                     "classes of moejax modules")
  try:
    cls = getattr(importlib.import_module(module), qualname)
  except (ImportError, AttributeError):
    raise ValueError(f"__type__={name!r} does not exist in this version of "
                     "moejax") from None
  fields = {k: from_dict(v) for k, v in value.items() if k != "__type__"}
  upgrade = getattr(cls, "upgrade_fields", None)
  if upgrade is not None:  # fields an older version wrote
    fields = upgrade(fields)
  known = {f.name for f in dataclasses.fields(cls)} | set(
      getattr(cls, "ALIASES", ()))
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{name} has no field {unknown[0]!r}")
  return cls(**fields)


def path(workdir: str) -> str:
  return os.path.join(workdir, FILENAME)


def save(config: Any, workdir: str) -> str:
  """Writes `workdir/config.json`; returns its path."""
  out = path(workdir)
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(config), f, indent=1)
  os.replace(tmp, out)
  return out


def load(workdir: str) -> Any:
  """The config of `workdir/config.json` (FileNotFoundError when missing;
  ValueError naming the file when it does not parse)."""
  source = path(workdir)
  if not os.path.exists(source):
    raise FileNotFoundError(f"{source} is missing (a run's workdir has its "
                            "config there)")
  try:
    with open(source) as f:
      return from_dict(json.load(f))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{source} does not hold a run config: "
                     f"{str(e).splitlines()[0]}") from None


def changes(old: Any, new: Any, prefix: str = "") -> list[str]:
  """`field: old -> new` for each leaf field that differs (dotted paths)."""
  a, b = to_dict(old), to_dict(new)
  out: list[str] = []

  def walk(x, y, where):
    if isinstance(x, dict) and isinstance(y, dict) and (
        x.get("__type__") == y.get("__type__")):
      for key in list(x) + [k for k in y if k not in x]:
        if key != "__type__":
          walk(x.get(key), y.get(key), f"{where}.{key}" if where else key)
    elif x != y:
      out.append(f"{where}: {_short(x)} -> {_short(y)}")

  walk(a, b, prefix)
  return out


def _short(value: Any) -> str:
  if isinstance(value, dict) and "__type__" in value:
    return value["__type__"].rsplit(".", 1)[-1]
  return json.dumps(value)
