"""Setting any field of a run config by its dotted path, and config files.

A path names a field of the `TrainConfig` (`sample_prompt`), of its loop
(`loop.steps`, or `steps`: the run config's aliases of its loop's fields), of
its model (`model.num_layers`), MoE layer (`model.moe.expert_width`), router
(`model.moe.router.k`) or optimizer (`loop.optim.b2`, or `optim.b2`). `override(cfg, {path:
value})` returns the config with those fields replaced: a value that is a
string is parsed by the field's type (`"24"` for an integer field, `"none"`
for an optional one, `"true"`/`"false"` for a bool); `model.moe.router=NAME`
switches the routing method (keeping its `k`), `model.moe=none` makes the
model dense; a field of `model.mod` on a model without MoD starts from the
`MoDConfig` defaults (`model.mod.capacity=0.125`), `model.mod=none` removes
it. Each dataclass is replaced once with all of its new fields, so
its own checks see them together. As with the `--steps` and `--seq_len`
flags, `steps` also sets the schedule's length `optim.total_steps` (capping
its warm-up) and `seq_len` the model's `max_len`, unless those are given
too. Errors are one line naming the path, the value and what is allowed.

Config files (`load_file`):
  - Python (`.py`): defines `config()` returning a `TrainConfig`, or a dict
    of overrides;
  - YAML (`.yaml`, `.yml`): a dict of overrides.
A dict of overrides is nested (`{"model": {"num_layers": 24}}`) or dotted
(`{"model.num_layers": 24}`), applied to the registry config named by its
key `base` (default `tiny`); `router: {name: dtop_p, k: 4}` switches the
router and sets its fields.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Callable, Iterable, Mapping

from moejax import routing

DEFAULT_BASE = "tiny"
_LEAF = ""  # key of a value set on a dataclass-valued field itself
_NONE_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "1": True, "yes": True,
               "false": False, "0": False, "no": False}


def parse_assignments(words: Iterable[str]) -> dict[str, str]:
  """{path: value} of words `PATH=VALUE` (later words win)."""
  out = {}
  for word in words:
    path, eq, value = word.partition("=")
    if not eq or not path:
      raise ValueError(f"override {word!r} is not PATH=VALUE; allowed: e.g. "
                       "model.num_layers=24")
    out[path.strip()] = value
  return out


def _hints(obj_or_cls: Any) -> dict[str, Any]:
  cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _split_optional(hint: Any) -> tuple[Any, bool]:
  """(the type, whether None is allowed) of a field's type hint."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is (
      typing.Union):
    args = typing.get_args(hint)
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 else hint), type(None) in args
  return hint, False


def _is_config(hint: Any) -> bool:
  return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def field_paths(cls: type, prefix: str = "") -> list[str]:
  """Every settable path of dataclass `cls` (the router's fields are those of
  `routing.RouterMethod` subclasses: `model.moe.router.k` etc. not listed)."""
  out = []
  for name, hint in _hints(cls).items():
    base, _ = _split_optional(hint)
    if _is_config(base) and not issubclass(base, routing.RouterMethod):
      out += field_paths(base, f"{prefix}{name}.")
    else:
      out.append(prefix + name)
  return out


def _convert(path: str, hint: Any, value: Any) -> Any:
  """`value` (a string from the command line, or a YAML/Python value) as the
  type of the field `path`."""
  base, optional = _split_optional(hint)
  if value is None or (optional and isinstance(value, str) and
                       value.strip().lower() in _NONE_WORDS):
    if optional:
      return None
    raise ValueError(f"{path}={value!r} is not allowed; allowed: "
                     f"{_kind(base)}")
  if typing.get_origin(base) is typing.Literal:
    allowed = typing.get_args(base)
    if value in allowed:
      return value
    raise ValueError(f"{path}={value!r} is not supported; allowed: "
                     f"{', '.join(map(str, allowed))}")
  if base not in (bool, int, float, str):
    raise ValueError(f"{path}={value!r} cannot be set from a value; allowed: "
                     f"its fields, {path}.NAME=VALUE")
  text = value.strip() if isinstance(value, str) else None
  try:
    if base is bool:
      if isinstance(value, bool):
        return value
      if text is not None and text.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[text.lower()]
    elif base is int:
      if isinstance(value, int) and not isinstance(value, bool):
        return value
      if text is not None:
        return int(text)
    elif base is float:
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
      if text is not None:
        return float(text)
    elif isinstance(value, str):
      return value
  except ValueError:
    pass
  raise ValueError(f"{path}={value!r} is not {_kind(base, article=True)}; "
                   f"allowed: {_kind(base)}{' or none' if optional else ''}")


def _kind(t: Any, article: bool = False) -> str:
  names = {bool: ("a bool", "true or false"), int: ("an integer", "integer"),
           float: ("a number", "number"), str: ("a string", "string")}
  if t in names:
    return names[t][0 if article else 1]
  return getattr(t, "__name__", str(t))


def _set_leaf(path: str, hint: Any, current: Any, value: Any) -> Any:
  """A field set to `value` as a whole (for a config-valued field: `none`, or
  a router name)."""
  base, optional = _split_optional(hint)
  if _is_config(base):
    if isinstance(base, type) and issubclass(base, routing.RouterMethod):
      if isinstance(value, routing.RouterMethod):
        return value
      if not isinstance(value, str) or value not in routing.available():
        raise ValueError(f"{path}={value!r} is not a router; allowed: "
                         f"{', '.join(routing.available())}")
      if current is not None and current.name == value:
        return current
      options = {"k": getattr(current, "k", None)} if current else {}
      return routing.build(value, options)
    if isinstance(value, base):
      return value
    if optional and (value is None or (isinstance(value, str) and
                                       value.strip().lower() in _NONE_WORDS)):
      return None
    raise ValueError(f"{path}={value!r} cannot be set as a whole; allowed: "
                     f"{'none, or ' if optional else ''}its fields "
                     f"{path}.NAME=VALUE")
  return _convert(path, hint, value)


def _tree(assignments: Mapping[str, Any]) -> dict[str, Any]:
  """Nested {name: subtree or value} of dotted paths (a value set on a node
  that also has sub-paths goes under `_LEAF`)."""
  tree: dict[str, Any] = {}
  for path, value in assignments.items():
    parts = path.split(".")
    if parts[-1] == "name" and len(parts) > 1 and parts[-2] == "router":
      parts = parts[:-1]  # router.name: switch the method
    node = tree
    for part in parts[:-1]:
      child = node.get(part)
      if not isinstance(child, dict):
        child = {} if child is None else {_LEAF: child}
        node[part] = child
      node = child
    last = parts[-1]
    if isinstance(node.get(last), dict):
      node[last][_LEAF] = value
    else:
      node[last] = value
  return tree


def _apply(obj: Any, tree: Mapping[str, Any], prefix: str) -> Any:
  hints = _hints(obj)
  changes = {}
  for name, sub in tree.items():
    path = prefix + name
    if name not in hints:
      shown = sub.get(_LEAF, sub) if isinstance(sub, dict) else sub
      raise ValueError(
          f"{path}={shown!r} is not a config field; allowed: "
          f"{', '.join(prefix + n for n in hints)}")
    current = getattr(obj, name)
    if isinstance(sub, dict):
      sub = dict(sub)
      if _LEAF in sub:
        current = _set_leaf(path, hints[name], current, sub.pop(_LEAF))
      if sub:
        base, _ = _split_optional(hints[name])
        if current is None and getattr(base, "OVERRIDE_FROM_DEFAULTS", False):
          current = base()  # e.g. model.mod.capacity=0.125 on a model without
        if current is None:
          first = next(iter(sub))
          raise ValueError(
              f"{path}.{first}={sub[first]!r} sets a field of {path}, which "
              f"is None in this config; allowed: a config that has one")
        if not dataclasses.is_dataclass(current):
          first = next(iter(sub))
          raise ValueError(f"{path}.{first}={sub[first]!r} is not a config "
                           f"field; {path} has no fields")
        current = _apply(current, sub, path + ".")
      changes[name] = current
    else:
      changes[name] = _set_leaf(path, hints[name], current, sub)
  return dataclasses.replace(obj, **changes) if changes else obj


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Dotted {path: value} of a nested dict of overrides."""
  out = {}
  for key, value in overrides.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def canonical(cls: type, path: str) -> str:
  """`path` with each alias replaced by the path it names: a class's
  `ALIASES` (`{"steps": "loop.steps", ...}` on a run config, see
  `moejax.train.config.embed_loop`), so `steps` is `loop.steps` and
  `optim.b2` is `loop.optim.b2`."""
  out: list[str] = []
  parts = path.split(".")
  while parts:
    name = parts.pop(0)
    hints = _hints(cls) if _is_config(cls) else {}
    if name not in hints and name in getattr(cls, "ALIASES", {}):
      parts = cls.ALIASES[name].split(".") + parts
      continue
    out.append(name)
    base, _ = _split_optional(hints.get(name))
    cls = base if _is_config(base) else None
  return ".".join(out)


def _linked(cfg: Any, flat: dict[str, Any]) -> dict[str, Any]:
  """`flat` plus the fields that follow `steps` and `seq_len` (as the
  `--steps` / `--seq_len` flags set them) where they are not set too: the
  schedule's `loop.optim.total_steps` (warm-up capped at it) and the model's
  `max_len`."""
  out = dict(flat)
  names = {f.name for f in dataclasses.fields(cfg)}
  if "loop.steps" in flat and not any(
      p.startswith("loop.optim.") and p != "loop.optim.learning_rate"
      for p in flat):
    steps = _convert("steps", int, flat["loop.steps"])
    out["loop.optim.total_steps"] = steps
    if steps >= 1:
      out["loop.optim.warmup_steps"] = min(cfg.loop.optim.warmup_steps, steps)
  if ("seq_len" in flat and "model" in names and "model.max_len" not in flat
      and hasattr(cfg.model, "max_len")):
    out["model.max_len"] = _convert("seq_len", int, flat["seq_len"])
  return out


def override(cfg: Any, assignments: Mapping[str, Any]) -> Any:
  """`cfg` with the fields at the (dotted, or nested dict) paths of
  `assignments` replaced (on a run config, `steps` and `seq_len` also set
  `loop.optim.total_steps` and `model.max_len` unless those are given; a
  run config's aliases, `steps` or `optim.b2`, name `loop.steps` and
  `loop.optim.b2`, see `canonical`)."""
  if not assignments:
    return cfg
  flat = {canonical(type(cfg), p): v for p, v in flatten(assignments).items()}
  return _apply(cfg, _tree(_linked(cfg, flat)), "")


def load_file(path: str, get: Callable[[str], Any]) -> Any:
  """The run config of a `.py` or `.yaml` file (see the module docstring);
  `get(name)` resolves a `base` name."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config={path!r}: no such file")
  if path.endswith(".py"):
    from moejax.experiment import load_module  # pylint: disable=g-import-not-at-top
    try:
      module = load_module(path)
    except Exception as e:  # noqa: BLE001 - any error of the user's file
      raise ValueError(f"config={path!r} does not load: {type(e).__name__}: "
                       f"{_first_line(e)}") from e
    build = getattr(module, "config", None)
    if not callable(build):
      raise ValueError(f"config={path!r} defines no config(); allowed: a "
                       "config() returning a TrainConfig or a dict of "
                       "overrides")
    value = build()
  else:
    import yaml  # pylint: disable=g-import-not-at-top
    try:
      with open(path) as f:
        value = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ValueError(f"config={path!r} is not valid YAML: "
                       f"{' '.join(str(e).split())}") from e
    value = {} if value is None else value
  if isinstance(value, Mapping):
    overrides = dict(value)
    base = overrides.pop("base", DEFAULT_BASE)
    return override(get(base), overrides)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return value
  raise ValueError(f"config={path!r} gives a {type(value).__name__}; "
                   "allowed: a TrainConfig or a dict of overrides")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""
