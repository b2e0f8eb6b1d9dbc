"""Shared by every test folder.

- The repository's tools (`tools/`, run from a checkout and not shipped in the wheel) are
  importable here and in the processes the tests start.
- Programs `make test` installs with apt are fixtures (`promtool`); a test that asks for one
  is marked `apt`, so `make unit` (`pytest -m "not apt"`) runs with the virtual environment
  alone.
"""

from __future__ import annotations

import os
import shutil

import pytest
from paths import REPO

os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)

APT_PROGRAMS = {"promtool": "scripts/ensure-prometheus (Debian's prometheus package)",
                "chromium": "scripts/ensure-chromium (Debian's chromium package)"}
"""Fixture name -> what installs the program; `make test` runs every one of them."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "apt: needs a program that `make test` installs with apt "
        f"({', '.join(APT_PROGRAMS)}); `make unit` leaves these tests out")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(APT_PROGRAMS):
            item.add_marker(pytest.mark.apt)


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
