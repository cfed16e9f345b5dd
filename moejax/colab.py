"""Installing what the notebooks need on a hosted runtime (Colab), jax untouched.

A Colab runtime (CPU, GPU or TPU) brings its own jax, built against its CUDA
plugin or its libtpu; letting pip upgrade it breaks the accelerator. So the
first cell of each notebook in `colab/` installs moejax itself with
`pip install --no-deps` (from `MOEJAX_SOURCE` when that is set: a checkout's
path or a `git+https://` URL) and then calls `install_requirements()`, which
installs only the packages the notebooks import that the runtime lacks, with
jax pinned to the version already installed. Where moejax is importable
already (`pip install -e .`, the tests) the cell does nothing.

This module uses the standard library only: it runs before moejax's own
requirements are installed.

Axis legend: none (package names).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from typing import Callable, Mapping, Sequence

# Import name -> distribution of everything the notebooks import besides jax and
# numpy (which every runtime has). The lazily imported data and tokenizer
# packages (tfds, grain, sentencepiece, tokenizers) are not needed there.
NOTEBOOK_REQUIREMENTS: Mapping[str, str] = {
    "flax": "flax", "optax": "optax", "chex": "chex",
    "orbax.checkpoint": "orbax-checkpoint", "absl": "absl-py", "tqdm": "tqdm",
    "sklearn": "scikit-learn", "yaml": "pyyaml", "matplotlib": "matplotlib",
}


def importable(module: str) -> bool:
  """Whether `module` (dotted names allowed) can be imported, without importing
  it; False where a parent package is missing."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def missing_requirements(
    requirements: Mapping[str, str] = NOTEBOOK_REQUIREMENTS, *,
    is_importable: Callable[[str], bool] = importable) -> list[str]:
  """The distributions in `requirements` whose module cannot be imported."""
  return [dist for module, dist in requirements.items()
          if not is_importable(module)]


def install_requirements(
    requirements: Mapping[str, str] = NOTEBOOK_REQUIREMENTS, *,
    is_importable: Callable[[str], bool] = importable,
    run: Callable[[Sequence[str]], object] = subprocess.check_call) -> list[str]:
  """Pip-installs the missing ones with `jax==<installed version>` on the same
  command line, so pip keeps the runtime's jax; returns what it installed."""
  missing = missing_requirements(requirements, is_importable=is_importable)
  if missing:
    jax = f"jax=={importlib.metadata.version('jax')}"
    run([sys.executable, "-m", "pip", "install", "-q", jax, *missing])
  return missing
