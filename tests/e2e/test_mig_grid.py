"""End to end: the grid of a MIG node. The simulator's mig scenario (an A100 in seven 1g.10gb
slices, a mixed H100, an H100 without MIG) behind gpuwatch-exporter, a real Prometheus with
the project's rules (tests/prom_harness.py, 127.0.0.1 only) and `gpuwatch status`,
`status --json` and `pick`: every slice is a cell with its state and users, a MIG-enabled GPU
is no cell, and `pick 1 --model 1g.10gb` hands out a free slice by its MIG UUID.

What every cell should be comes from the harness's oracle (Fleet.expected_cells: the
simulator's own view of the node, its NVML answers, the MIG devices, their memory and MIG
UUIDs, the processes on each GPU instance, and the thresholds the rules read), never copied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from cli_run import run
from prom_harness import ExpectedCell, Fleet, Node

from gpuwatch.cells import Cell
from gpuwatch.contract import states

HOST = "mig-node"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("mig"), [Node(HOST, "mig")]) as f:
        yield f


def expected(fleet: Fleet) -> dict[str, ExpectedCell]:
    """Every cell of the node now as the harness's oracle has it (Fleet.expected_cells), by
    its text ("0/7", "2")."""
    return {str(cell): e for (host, cell), e in fleet.expected_cells().items() if host == HOST}


def status_json(fleet: Fleet) -> list[dict[str, object]]:
    code, out = run("--prometheus", fleet.url, "status", "--json")
    assert code == 0, out
    printed: list[dict[str, object]] = json.loads(out)
    return printed


def cell_of(g: dict[str, object]) -> str:
    instance = g["gpu_instance_id"]
    assert isinstance(g["gpu"], int) and (instance is None or isinstance(instance, int))
    return str(Cell(g["gpu"], instance))


def seen(printed: list[dict[str, object]]) -> dict[str, tuple[object, ...]]:
    return {cell_of(g): (g["state"], tuple(g["users"]), g["profile"],  # type: ignore[arg-type]
                         g["mig_uuid"], g["memory_total_bytes"]) for g in printed}


def wanted(cells: dict[str, ExpectedCell]) -> dict[str, tuple[object, ...]]:
    return {text: (c.state, c.users, c.profile, c.mig_uuid, c.memory_total_bytes)
            for text, c in cells.items()}


@pytest.fixture(scope="module")
def settled(fleet: Fleet) -> dict[str, ExpectedCell]:
    """The cells once `gpuwatch status --json` shows every one as the simulator has it."""
    def probe() -> dict[str, tuple[object, ...]] | str:
        code, out = run("--prometheus", fleet.url, "status", "--json")
        return seen(json.loads(out)) if code == 0 else f"exit {code}"  # none known yet: 1

    fleet.wait_for("every cell of the MIG node in its state, with its users", probe,
                   lambda s: s == wanted(expected(fleet)))
    return expected(fleet)


def test_status_json_has_every_slice_with_its_state_and_no_mig_gpu(
        fleet: Fleet, settled: dict[str, ExpectedCell]) -> None:
    printed = status_json(fleet)
    assert seen(printed) == wanted(expected(fleet))
    assert [cell_of(g) for g in printed] == [
        str(c) for c in sorted((c.cell for c in settled.values()), key=Cell.sort_key)]
    # what the scenario is about: busy slices with their users, free slices, GPU 2 without MIG
    states_of = {text: c.state for text, c in settled.items()}
    assert "0" not in states_of and "1" not in states_of
    assert states_of["2"] == states.BUSY.name and settled["2"].users
    assert {c.state for c in settled.values() if c.cell.is_slice} == {
        states.BUSY.name, states.FREE.name}
    assert all(c.users for c in settled.values() if c.state == states.BUSY.name)
    for g in printed:
        if g["gpu_instance_id"] is not None:
            assert g["utilization_ratio"] is None
            assert g["display_name"] == f"A100-SXM4-80GB {g['profile']}" if g["gpu"] == 0 \
                else g["display_name"] == f"H100 80GB HBM3 {g['profile']}"
            assert isinstance(g["uuid"], str) and g["uuid"].startswith("GPU-")


def column(lines: list[str], name: str, row: int) -> str:
    """A row's text under a column of the grid (two spaces between columns; GPU, MEMORY and
    UTIL right-aligned under their name)."""
    at = re.search(rf"\b{name}\b", lines[0])
    assert at is not None, lines[0]
    if name in ("GPU", "MEMORY", "UTIL"):
        return lines[1 + row][:at.end()].rsplit("  ", 1)[-1].strip()
    return lines[1 + row][at.start():].split("  ", 1)[0].strip()


def test_status_grid_shows_slices_under_their_gpu(fleet: Fleet,
                                                  settled: dict[str, ExpectedCell]) -> None:
    code, out = run("--prometheus", fleet.url, "status", "--color", "never")
    assert code == 0
    lines = out.splitlines()
    rows = len(settled)
    assert len(lines) == rows + 2  # the header, the cells, the summary
    order = sorted(settled.values(), key=lambda c: c.cell.sort_key())
    assert [column(lines, "GPU", i) for i in range(rows)] == [str(c.cell) for c in order]
    assert [column(lines, "STATE", i) for i in range(rows)] == [c.state for c in order]
    assert [column(lines, "USERS", i) for i in range(rows)] == [
        ",".join(c.users) or "-" for c in order]
    for i, c in enumerate(order):
        if c.cell.is_slice:
            assert column(lines, "MODEL", i).endswith(f" {c.profile}")
            assert column(lines, "UTIL", i) == "-"
            assert column(lines, "MEMORY", i).endswith(f"/{c.memory_total_bytes / 2**30:.1f} GiB")
    slices = sum(c.cell.is_slice for c in order)
    assert lines[-1].startswith(f"{rows - slices} GPU{'' if rows - slices == 1 else 's'} and "
                                f"{slices} MIG slices on 1 host: ")
    free = run("--prometheus", fleet.url, "status", "--free", "--color", "never")[1]
    assert [column(free.splitlines(), "GPU", i) for i in range(len(free.splitlines()) - 2)] == [
        str(c.cell) for c in order if c.state == states.FREE.name]


def test_pick_hands_out_a_free_slice_by_its_mig_uuid(fleet: Fleet,
                                                     settled: dict[str, ExpectedCell]) -> None:
    free = sorted((c for c in settled.values()
                   if c.profile == "1g.10gb" and c.state == states.FREE.name),
                  key=lambda c: (-c.memory_total_bytes, c.cell.sort_key()))
    assert free, settled
    code, out = run("--prometheus", fleet.url, "pick", "1", "--host", HOST, "--model",
                    "1g.10gb", "--user", "zoe")
    assert (code, out) == (0, f"{free[0].mig_uuid}\n")
    code, out = run("--prometheus", fleet.url, "pick", "2", "--host", HOST, "--model",
                    "1g.10gb", "--user", "zoe")
    assert (code, out) == (1, "")
