"""The test suite's own structure: what `make unit` runs needs the virtual environment alone."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import conftest
import pytest
from paths import TESTS


@dataclass
class FakeItem:
    fixturenames: list[str]
    markers: list[str] = field(default_factory=list)

    def add_marker(self, marker: Any) -> None:
        self.markers.append(marker.name)


def test_a_test_that_asks_for_an_apt_program_is_marked_apt() -> None:
    needs, does_not = FakeItem(["tmp_path", "promtool"]), FakeItem(["tmp_path"])
    conftest.pytest_collection_modifyitems([needs, does_not])  # type: ignore[list-item]
    assert (needs.markers, does_not.markers) == (["apt"], [])


def test_this_test_is_not_marked_apt(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("apt") is None


@pytest.mark.parametrize("folder", ["unit", "golden"])
def test_the_fast_folders_reach_apt_programs_only_through_their_fixtures(folder: str) -> None:
    """`make unit` leaves out the tests marked apt; a test that looked a program up itself
    would run there and fail on a machine without it."""
    looked_up = {(path.name, name) for path in sorted((TESTS / folder).glob("*.py"))
                 for name in re.findall(r"""which\(\s*["']([\w-]+)["']""", path.read_text())}
    assert {(f, name) for f, name in looked_up if name in conftest.APT_PROGRAMS} == set()


def test_every_test_module_has_a_name_of_its_own() -> None:
    """The folders have no __init__.py, so pytest imports each test module by its base name:
    two tests/*/test_x.py stop the whole collection ("import file mismatch")."""
    names: dict[str, list[str]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        if "node_modules" not in path.parts:
            names.setdefault(path.name, []).append(str(path.relative_to(TESTS)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
