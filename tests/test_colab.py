"""`moejax.colab`: the notebooks' install step installs only what a runtime lacks,
keeps the runtime's jax, covers every package the notebooks import, and runs
before any of moejax's requirements are installed (standard library only)."""
import ast
import configparser
import glob
import importlib.metadata
import os
import re
import subprocess
import sys

from moejax import colab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installs_only_the_missing_with_jax_pinned():
  calls = []
  have = {"flax", "chex", "absl", "tqdm", "sklearn", "yaml", "matplotlib"}
  installed = colab.install_requirements(is_importable=have.__contains__,
                                         run=calls.append)
  assert installed == ["optax", "orbax-checkpoint"]
  jax = f"jax=={importlib.metadata.version('jax')}"
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", jax,
                    "optax", "orbax-checkpoint"]]


def test_nothing_to_install_runs_nothing():
  calls = []
  assert colab.install_requirements(is_importable=lambda m: True,
                                    run=calls.append) == []
  assert calls == []
  assert colab.missing_requirements() == []  # this machine has them all


def test_importable_without_importing():
  assert colab.importable("json")
  assert not colab.importable("no_such_package_xyz")
  assert not colab.importable("no_such_package_xyz.sub")  # parent missing
  assert "no_such_package_xyz" not in sys.modules


def test_runs_with_the_standard_library_only():
  code = ("import sys; import moejax.colab; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'numpy', 'flax')))")
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"


def _notebook_imports():
  names = set()
  for path in glob.glob(os.path.join(ROOT, "colab", "*.py")):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names.add(node.module)
  return names


def test_requirements_cover_the_notebooks_imports():
  tops = {n.split(".")[0] for n in _notebook_imports()}
  third_party = tops - set(sys.stdlib_module_names) - {"jax", "numpy", "moejax"}
  covered = {m.split(".")[0] for m in colab.NOTEBOOK_REQUIREMENTS}
  assert third_party and third_party <= covered, third_party - covered
  assert "orbax.checkpoint" in colab.NOTEBOOK_REQUIREMENTS  # training cells save


def test_requirements_are_the_packages_declared_in_setup_cfg():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  declared = {re.split(r"[<>=!~; ]", line.strip())[0]
              for line in cfg["options"]["install_requires"].splitlines()
              if line.strip()}
  assert set(colab.NOTEBOOK_REQUIREMENTS.values()) <= declared
