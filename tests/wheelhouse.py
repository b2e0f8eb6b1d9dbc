"""The wheel of this checkout and the wheels it needs, in one folder, for the tests that
install gpuwatch-stack as a node does (the wheel test, the Ansible deployment).

The wheel is built from a copy of what the build reads, so a build never writes into the
checkout (build/, *.egg-info) and never sees a file half-saved by someone editing it. The
wheelhouse is the only step that reads a package index (pip's cache, on a machine where
`make test` installed the venv); whatever installs from it then runs with `--no-index`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from paths import REPO

BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src")
"""What building the wheel reads from the checkout."""
DISTRIBUTION_FILE_PREFIX = "gpuwatch_stack-"
"""How the wheel's file name starts (the distribution name, normalized)."""


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    wheel: Path
    """gpuwatch-stack's own wheel, in `directory` beside its dependencies'."""

    def pip_args(self) -> list[str]:
        """pip install arguments that take every wheel from here and nothing from an index."""
        return ["--no-index", "--find-links", str(self.directory)]


def snapshot(destination: Path, extra: Sequence[str] = ()) -> Path:
    """A copy of the build inputs (and of the checkout's top-level folders named in `extra`,
    e.g. "prometheus" for a deployment), without caches and build leftovers."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    destination.mkdir(parents=True, exist_ok=True)
    for name in (*BUILD_INPUTS, *extra):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, destination / name)
    return destination


def build(directory: Path, source: Path | None = None, also: Sequence[str] = (),
          timeout: float = 300) -> Wheelhouse:
    """`pip wheel` of `source` (a fresh snapshot of the checkout when None) into `directory`:
    its wheel, the wheels of its dependencies, and of the requirements in `also` (say
    "setuptools>=77" for something that builds the wheel again without an index)."""
    if source is None:
        source = snapshot(directory.parent / f"{directory.name}-source")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--wheel-dir", str(directory), str(source), *also],
        capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"pip wheel {source} failed:\n{done.stdout}{done.stderr}")
    wheels = sorted(directory.glob(f"{DISTRIBUTION_FILE_PREFIX}*.whl"))
    if len(wheels) != 1:
        raise AssertionError(f"expected one gpuwatch-stack wheel in {directory}: {wheels}")
    return Wheelhouse(directory, wheels[0])
