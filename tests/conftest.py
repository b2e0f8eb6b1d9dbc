"""Shared by every test folder.

- The repository's tools (`tools/`, run from a checkout and not shipped in the wheel) are
  importable here and in the processes the tests start.
- Programs `make test` installs with apt are fixtures (`promtool`); a test that asks for one
  is marked `apt`, so `make unit` (`pytest -m "not apt"`) runs with the virtual environment
  alone.
- The slow folders are collected first (SLOW_FIRST), so that `make test`, which runs the files
  on two pytest-xdist workers (each file and its module fixtures on one), starts them first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from paths import REPO, TESTS

os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

APT_PROGRAMS = {"promtool": "scripts/ensure-prometheus (Debian's prometheus package)",
                "chromium": "scripts/ensure-chromium (Debian's chromium package)"}
"""Fixture name -> what installs the program; `make test` runs every one of them."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "apt: needs a program that `make test` installs with apt "
        f"({', '.join(APT_PROGRAMS)}); `make unit` leaves these tests out")
    refuse_parallel_rewrite(config)


UPDATE_GOLDEN = "GPUWATCH_UPDATE_GOLDEN"
"""=1 makes tests/golden and tests/unit/test_readme.py rewrite the files they check."""


def refuse_parallel_rewrite(config: pytest.Config) -> None:
    """A rewrite under pytest-xdist could let a test on another worker read a half-written
    README.md or golden file: refuse it in one line."""
    workers = getattr(config.option, "numprocesses", None)
    if os.environ.get(UPDATE_GOLDEN) == "1" and workers and not hasattr(config, "workerinput"):
        raise pytest.UsageError(f"{UPDATE_GOLDEN}=1 rewrites files other tests read: run it "
                                "in one process (-n 0), e.g. "
                                f"`{UPDATE_GOLDEN}=1 pytest -n 0 tests/golden tests/unit`")


SLOW_FIRST = ("deploy", "e2e", "browser")
"""Test folders whose files take longest (the Ansible deployment; real servers and browsers and
the scrape and evaluation intervals they wait on), collected first, in this order. Under
pytest-xdist with --dist loadfile --no-loadscope-reorder (`make test`) each worker takes the
next file in this order, so the slow files start first and the quick ones fill in around
them instead of one slow file starting last."""


def _slowness(item: pytest.Item) -> int:
    path = getattr(item, "path", None)
    try:
        folder = Path(path).relative_to(TESTS).parts[0] if path is not None else ""
    except ValueError:
        folder = ""
    return SLOW_FIRST.index(folder) if folder in SLOW_FIRST else len(SLOW_FIRST)


def slow_folders_first(items: list[pytest.Item]) -> None:
    """Reorder items in place: SLOW_FIRST's folders first; the order within a folder (and so
    within each file) is kept."""
    items.sort(key=_slowness)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(APT_PROGRAMS):
            item.add_marker(pytest.mark.apt)
    slow_folders_first(items)


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make test` installs it with "
                    f"{APT_PROGRAMS[name]}")
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    """The path of Prometheus' promtool."""
    return _program("promtool")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's Chromium (/usr/bin/chromium), which Playwright drives headless."""
    return _program("chromium")
