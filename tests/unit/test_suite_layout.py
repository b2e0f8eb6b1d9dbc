"""The test suite's own structure: what `make unit` runs needs the virtual environment alone."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from paths import TESTS


def _suite_conftest() -> Any:
    """tests/conftest.py itself: `import conftest` may find another folder's conftest.py
    (tests/browser has one) once pytest has put that folder on sys.path."""
    spec = importlib.util.spec_from_file_location("gpuwatch_tests_conftest",
                                                  TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


conftest = _suite_conftest()


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


@dataclass
class PlacedItem:
    path: Path


def test_the_slow_folders_are_collected_first_and_each_folder_keeps_its_order() -> None:
    """`make test` hands files to its pytest-xdist workers in collection order: the slow
    folders first, so that none of them starts last."""
    names = ["unit/test_a.py", "e2e/test_b.py", "unit/test_c.py", "deploy/test_d.py",
             "browser/test_e.py", "e2e/test_f.py", "golden/test_g.py"]
    items = [PlacedItem(TESTS / name) for name in names]
    conftest.slow_folders_first(items)  # type: ignore[arg-type]
    assert [str(item.path.relative_to(TESTS)) for item in items] == [
        "deploy/test_d.py", "e2e/test_b.py", "e2e/test_f.py", "browser/test_e.py",
        "unit/test_a.py", "unit/test_c.py", "golden/test_g.py"]
    assert conftest.SLOW_FIRST[0] == "deploy"


def test_a_rewrite_of_the_golden_files_is_refused_on_parallel_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def config(workers: int | None, worker: bool = False) -> Any:
        made = SimpleNamespace(option=SimpleNamespace(numprocesses=workers))
        if worker:
            made.workerinput = {}
        return made

    monkeypatch.setenv(conftest.UPDATE_GOLDEN, "1")
    with pytest.raises(pytest.UsageError, match="-n 0"):
        conftest.refuse_parallel_rewrite(config(2))
    for serial in (config(None), config(0), config(2, worker=True)):
        conftest.refuse_parallel_rewrite(serial)
    monkeypatch.delenv(conftest.UPDATE_GOLDEN)
    conftest.refuse_parallel_rewrite(config(2))
