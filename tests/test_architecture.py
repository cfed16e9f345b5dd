"""ARCHITECTURE.md stays true: the paths it names exist, its strategy list and
defaults are the code's, imports run down its layer order, and no module
besides the registry keeps a list of router names."""
import ast
import inspect
import os
import re

from moejax import dispatch, routing
from moejax.nn import expert_parallel
from moejax.nn.moe import MoEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "moejax")
with open(os.path.join(ROOT, "ARCHITECTURE.md"), encoding="utf-8") as f:
  DOC = f.read()


def _ticked(text):
  return re.findall(r"`([^`\n]+)`", text)


def test_named_paths_exist():
  placeholder = lambda part: part.split(".")[0].isupper()  # NAME, WORKROOT
  named = {t for t in _ticked(DOC)
           if re.fullmatch(r"[\w.-]+(/[\w.-]+)+/?", t)
           and not any(placeholder(p) for p in t.split("/"))}
  assert len(named) > 20
  missing = [p for p in sorted(named)
             if not any(os.path.exists(os.path.join(base, p))
                        for base in (ROOT, PACKAGE))]
  assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_strategy_list_and_defaults_are_the_codes():
  text = DOC.split("Strategies (`dispatch.STRATEGIES`):", 1)[1].split(".", 1)[0]
  assert tuple(_ticked(text)) == dispatch.STRATEGIES
  field = {f.name: f.default for f in MoEConfig.__dataclass_fields__.values()}
  default_of = lambda fn: inspect.signature(fn).parameters["strategy"].default
  assert field["strategy"] == dispatch.DEFAULT_STRATEGY == "auto"
  assert default_of(expert_parallel.routed_experts) == dispatch.DEFAULT_STRATEGY
  assert default_of(dispatch.plan) == dispatch.PLAN_STRATEGY == "index"
  assert ("`MoEConfig.strategy`) and `routed_experts` default to `auto` "
          "(`dispatch.DEFAULT_STRATEGY`)") in " ".join(DOC.split())
  assert ("`plan()` defaults to `index` (`dispatch.PLAN_STRATEGY`)"
          in " ".join(DOC.split()))
  # Every plan type is a `Plan`.
  for cls in (dispatch.SlotPlan, dispatch.GatherPlan, dispatch.BlockPlan,
              dispatch.DroplessPlan):
    assert issubclass(cls, dispatch.Plan)


def _layers():
  block = DOC.split("<!-- layers -->", 1)[1].split("<!-- /layers -->", 1)[0]
  layers = {}
  for line in block.strip().splitlines():
    number, _, names = line.partition(".")
    for name in _ticked(names):
      layers[name] = int(number)
  return layers


def _modules():
  """{dotted module name: path} of every module under moejax/."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def _is_main_block(node):
  """`if __name__ == "__main__":`: a script run on top of the whole stack."""
  return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _imports(path, modules):
  """The moejax modules `path` imports (anywhere in the file, lazy imports
  included, but for its `if __name__ == "__main__":` script block)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  tree.body = [n for n in tree.body if not _is_main_block(n)]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("moejax"):
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "moejax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        yield node.lineno, full if full in modules else node.module


def _top(module):
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
  layers = _layers()
  tops = {_top(m) for m in _modules()} - {""}
  assert tops == set(layers), (
      f"modules without a layer: {sorted(tops - set(layers))}; "
      f"layers without a module: {sorted(set(layers) - tops)}")


def test_no_import_runs_up_the_layers():
  layers, modules = _layers(), _modules()
  upward = []
  for module, path in sorted(modules.items()):
    for line, target in _imports(path, modules):
      if _top(target) and _top(module) and (
          layers[_top(target)] > layers[_top(module)]):
        upward.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
  assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_only_the_registry_lists_router_names():
  names = set(routing.available())
  found = []
  for module, path in _modules().items():
    if module.startswith("moejax.routing"):
      continue
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        strings = {e.value for e in node.elts if isinstance(e, ast.Constant)}
        if len(strings & names) >= 3:
          found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
  assert not found, f"lists of router names outside the registry: {found}"
