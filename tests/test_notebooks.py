"""Notebooks in colab/: each `.ipynb` agrees with its jupytext percent-format
`.py` source (the one that is edited: `jupytext --sync colab/NAME.py`), starts
by installing moejax where it is missing, and executes top to bottom on a CPU."""
import glob
import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from subprocess_env import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "colab", "*.py")))


def test_notebooks_exist():
  assert any(n.endswith("00_quickstart.ipynb") for n in NOTEBOOKS)
  stem = lambda paths: [os.path.splitext(p)[0] for p in paths]
  assert stem(NOTEBOOKS) == stem(SOURCES), "every notebook has one .py source"


def _cells(nb, kind):
  return [c.source.strip() for c in nb.cells if c.cell_type == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_matches_its_source(path):
  source = os.path.splitext(path)[0] + ".py"
  assert os.path.exists(source), f"{source} is missing"
  from_py = jupytext.read(source)
  nb = nbformat.read(path, as_version=4)
  hint = (f"{os.path.basename(path)} differs from its source; run "
          f"`jupytext --sync {os.path.relpath(source, ROOT)}`")
  assert _cells(nb, "code") == _cells(from_py, "code"), hint
  assert _cells(nb, "markdown") == _cells(from_py, "markdown"), hint
  first = _cells(nb, "code")[0]
  assert ('if importlib.util.find_spec("moejax") is None' in first
          and "--no-deps" in first
          and "git+https://github.com/moejax/moejax" in first
          and "colab.install_requirements()" in first), (
      "the first code cell installs moejax where it is not importable, "
      "without touching the runtime's jax")
  name = os.path.basename(path)
  assert (f"https://colab.research.google.com/github/moejax/moejax/blob/main/"
          f"colab/{name}" in _cells(nb, "markdown")[0]), "an Open in Colab link"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch, tmp_path):
  nb = nbformat.read(path, as_version=4)
  # The kernel inherits this environment: a CPU runtime's one device, Agg,
  # and a temporary folder of its own (its runs leave nothing behind).
  env = one_device_env(MPLBACKEND="Agg", TMPDIR=str(tmp_path))
  for name in set(os.environ) - set(env):
    monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
