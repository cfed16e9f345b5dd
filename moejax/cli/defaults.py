"""Flag defaults that fall through to the frozen config dataclasses.

Every flag that sets a config field defaults to None: a flag left unset takes
the dataclass's default (the one place defaults are declared), its help
text shows that default, read from the dataclass, and its kind (integer,
float, string or bool) is the field's type (`table`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping

# Flag kind of each field type (`int | None` is an integer flag).
KINDS = {int: "integer", float: "float", str: "string", bool: "bool"}


def _path(cls: type, name: str) -> list[str]:
  """The field path of `name` on `cls`: itself, or what the class's alias
  names (`steps` -> `loop.steps` on a run config)."""
  return getattr(cls, "ALIASES", {}).get(name, name).split(".")


def _hint(hint: Any) -> Any:
  """A field's type without its `| None`."""
  if isinstance(hint, types.UnionType):  # e.g. int | None
    hint = next(t for t in typing.get_args(hint) if t is not type(None))
  return hint


def field_default(cls: type, name: str) -> Any:
  """The default of dataclass field `name` of `cls` (or of the field an
  alias of `cls` names: `steps` of a run config is its loop's default)."""
  first, *rest = _path(cls, name)
  value = _own_default(cls, first)
  for part in rest:
    value = getattr(value, part)
  return value


def _own_default(cls: type, name: str) -> Any:
  for field in dataclasses.fields(cls):
    if field.name == name:
      if field.default is not dataclasses.MISSING:
        return field.default
      if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
      raise ValueError(f"{cls.__name__}.{name} has no default")
  raise ValueError(f"{cls.__name__} has no field {name!r}")


def with_default(text: str, cls: type, name: str) -> str:
  """Help text ending with the default of field `name` of `cls`."""
  return f"{text} (default: {field_default(cls, name)})"


def field_kind(cls: type, name: str) -> str:
  """The flag kind (integer, float, string or bool) of field `name` of `cls`
  (or of the field an alias names), from its type."""
  *parents, last = _path(cls, name)
  owner = cls
  for part in parents:
    owner = _hint(typing.get_type_hints(owner)[part])
  hints = typing.get_type_hints(owner)
  if last not in hints:
    raise ValueError(f"{cls.__name__} has no field {name!r}")
  hint = _hint(hints[last])
  if typing.get_origin(hint) is typing.Literal:  # e.g. Literal["a", "b"]
    hint = type(typing.get_args(hint)[0])
  if hint not in KINDS:
    raise ValueError(f"{cls.__name__}.{name}: type {hint!r} has no flag kind; "
                     f"allowed: {', '.join(t.__name__ for t in KINDS)}")
  return KINDS[hint]


def table(cls: type, helps: Mapping[str, str]
          ) -> dict[str, tuple[str, type, str]]:
  """The flags `name: help` of fields of `cls` as `define` takes them:
  `name: (kind, cls, help)`, the kind read from the field's type."""
  return {name: (field_kind(cls, name), cls, text)
          for name, text in helps.items()}


def define(table: Mapping[str, tuple[str, type, str]]) -> None:
  """Defines a flag per entry `name: (kind, config class, help)`: kind is
  integer, float, string or bool; the default is None (the class's)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  make = {"integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
          "string": flags.DEFINE_string, "bool": flags.DEFINE_bool}
  for name, (kind, cls, text) in table.items():
    make[kind](name, None, with_default(text, cls, name))


def given(values: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
  """{name: value} of the flags among `names` that were set (not None)."""
  return {n: values[n] for n in names if values.get(n) is not None}
