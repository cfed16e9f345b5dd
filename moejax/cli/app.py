"""The command line of the training scripts: grouped help, one-line errors.

`run(main, doc, groups)` runs an absl app whose `--help` (or `-h`) prints the
script's docstring and the project's own flags by group (model, routing, data,
training, scale-out), each with its default, and exits 0; `--helpfull` still
lists every flag, absl's and the libraries' too. A flag value that does not
parse, an unknown flag and a stray positional argument exit 2 with one line.

With `overrides=True` the parser first turns config-field overrides into
`--override=PATH=VALUE` flags (`split_overrides`): a `--PATH=VALUE` whose
name has a dot (`--model.num_layers=24`; absl defines no such flag) and a
positional `PATH=VALUE` word; a positional `NAME=VALUE` that names a flag
is that flag (`steps=100` is `--steps=100`).
"""
from __future__ import annotations

import sys
import textwrap
from typing import Any, Callable, Iterable, Mapping

from absl import app, flags, logging

from moejax.data import DataError
from moejax.train import loop
from moejax.train.checkpoint import CheckpointError

HELP_ARGS = ("-h", "-help", "--help", "--helpshort", "-?")


def project_flags(flag_values: flags.FlagValues) -> set[str]:
  """Names of the flags defined by moejax's own modules and by the script
  being run (absl files a script's flags under `sys.argv[0]`)."""
  return {flag.name for module, defined in
          flag_values.flags_by_module_dict().items()
          if module.split(".")[0] == "moejax" or module == sys.argv[0]
          for flag in defined}


def format_help(doc: str, groups: Mapping[str, Iterable[str]],
                flag_values: flags.FlagValues = flags.FLAGS,
                hidden: Iterable[str] = (), footer: str = "") -> str:
  """The docstring and the project's flags by group (others under "other"),
  then `footer`."""
  own = project_flags(flag_values) - set(hidden)
  listed = {name for names in groups.values() for name in names}
  sections = {**groups, "other": sorted(own - listed)}
  lines = [doc.strip(), "",
           "Flags (--helpfull lists every flag, absl's included):"]
  for title, names in sections.items():
    names = [n for n in names if n in own]
    if not names:
      continue
    lines += ["", f"{title}:"]
    for name in names:
      flag = flag_values[name]
      text = flag.help
      if flag.default is not None and "(default:" not in text:
        text += f" (default: {flag.default_as_str or flag.default})"
      head = f"--[no]{name}" if flag.boolean else f"--{name}"
      lines += textwrap.wrap(f"{head}  {text}", 79, initial_indent="  ",
                             subsequent_indent="      ")
  if footer:
    lines += ["", footer.rstrip()]
  return "\n".join(lines)


def fail(message: str) -> None:
  """Exits 2 with one line on stderr."""
  sys.stderr.write(f"error: {message}\n")
  sys.exit(2)


def split_overrides(argv: list[str],
                    flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`argv` with its config-field overrides as `--override=PATH=VALUE` (see
  the module docstring); the words after `--` and a flag's separate value
  (`--workdir DIR`) are left alone."""
  end = argv.index("--") if "--" in argv else len(argv)
  out, takes_value = list(argv[:1]), False
  for arg in argv[1:end]:
    if takes_value:
      out.append(arg)
      takes_value = False
    elif arg.startswith("--") and len(arg) > 2:
      name, eq, _ = arg[2:].partition("=")
      if "." in name and name not in flag_values:
        if not eq:
          fail(f"{arg} has no value; allowed: --PATH=VALUE (e.g. "
               "--model.num_layers=24)")
        out.append(f"--override={arg[2:]}")
      else:
        out.append(arg)
        takes_value = (not eq and name in flag_values
                       and not flag_values[name].boolean)
    elif not arg.startswith("-") and "=" in arg:
      name = arg.partition("=")[0]
      out.append(f"--{arg}" if name in flag_values else f"--override={arg}")
    else:
      out.append(arg)
  return out + argv[end:]


def parser(doc: str, groups: Mapping[str, Iterable[str]],
           hidden: Iterable[str] = (), overrides: bool = False,
           footer: str | Callable[[], str] = ""
           ) -> Callable[[list[str]], list[str]]:
  """absl's `flags_parser`: grouped help (then `footer`, or what it returns),
  one-line errors; with `overrides`, `split_overrides` first."""

  def parse(argv: list[str]) -> list[str]:
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_ARGS for a in args):
      print(format_help(doc, groups, hidden=hidden,
                        footer=footer() if callable(footer) else footer))
      sys.exit(0)
    if overrides:
      argv = split_overrides(argv)
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e).strip().splitlines()[0])
    if len(rest) > 1:
      fail(f"unexpected arguments: {' '.join(rest[1:])} (flags are "
           "--name=value; see --help)")
    return rest

  return parse


def run(main: Callable[[Any], int], doc: str,
        groups: Mapping[str, Iterable[str]], hidden: Iterable[str] = (),
        overrides: bool = False, footer: str | Callable[[], str] = ""
        ) -> None:
  """Runs `main(flags.FLAGS)` (returning the exit code) as an absl app, with
  absl's logging at WARNING (`overrides`, `footer`: see `parser`)."""
  def absl_main(argv):
    del argv  # a stray positional argument is refused by the parser
    logging.set_verbosity(logging.WARNING)
    sys.exit(main(flags.FLAGS))
  app.run(absl_main, flags_parser=parser(doc, groups, hidden, overrides,
                                         footer))


def train(build_config: Callable[[], Any], workdir: str, **options: Any
          ) -> tuple[int, dict[str, Any] | None]:
  """(0, summary) of training the run config `build_config()` returns (its
  routing line printed first; `options` go to `moejax.train.loop.train`);
  (2, None) after one line on bad input, flags or files; (1, None) after one
  line when the run stopped early."""
  try:
    cfg = build_config()
    if isinstance(options.get("profile_steps"), str):
      loop.parse_profile_steps(options["profile_steps"])
    moe = getattr(cfg.model, "moe", None)
    print(routing_line(moe.router if moe is not None else None), flush=True)
    return 0, loop.train(cfg, workdir, **options)
  except (ValueError, DataError, FileNotFoundError, CheckpointError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2, None
  except loop.TrainingStopped as e:
    sys.stderr.write(f"error: {e}\n")
    return 1, None


def routing_line(method: Any) -> str:
  """`routing: NAME field=value ...`: the effective hyperparameters of a
  routing method (None: dense), as the first record of metrics.jsonl has them."""
  settings = loop.routing_settings(method)
  return " ".join([f"routing: {settings.pop('router')}"] +
                  [f"{k}={v}" for k, v in settings.items()])
