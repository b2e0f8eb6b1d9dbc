"""A claimed GPU (gpuwatch run) as gpuwatch.fleet reads it from the rules and as `gpuwatch
status` shows it: the claim's id, owner and end, in the grid and in --json."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json

import pytest
from seriesprom import SeriesPrometheus

from gpuwatch import fleet
from gpuwatch.cli import status
from gpuwatch.contract import metrics, states

END = dt.datetime(2026, 12, 2, 2, 5, tzinfo=dt.timezone.utc).timestamp()


def add_gpu(prom: SeriesPrometheus, gpu: int, state: states.State, users: str = "",
            claim: tuple[str, str] | None = None,
            reservation: tuple[str, str] | None = None) -> None:
    """A GPU of node-a as the rules publish it; claim: (user, id); reservation: (user, until)."""
    ids = {"job": states.JOB, "instance": "node-a:9839", "host": "node-a", "gpu": str(gpu),
           "uuid": f"GPU-{gpu}"}
    labels = {"state": state.name, "model": "NVIDIA H100 80GB HBM3",
              **({"users": users} if users else {}), **({"claim": claim[0]} if claim else {})}
    prom.add(states.STATE_INFO, 1, **ids, **labels)
    prom.add(metrics.UP.name, 0 if state is states.DOWN else 1, **ids)
    prom.add(metrics.MEMORY_USED.name, 0, **ids)
    prom.add(metrics.MEMORY_TOTAL.name, 80 * 2**30, **ids)
    if claim is not None:
        prom.add(states.CLAIMED_UNTIL, END, **ids, user=claim[0], id=claim[1])
    if reservation is not None:
        prom.add(states.RESERVED_UNTIL, END + 86400, **ids, user=reservation[0],
                 until=reservation[1])


@pytest.fixture
def claimed_node() -> SeriesPrometheus:
    prom = SeriesPrometheus()
    add_gpu(prom, 0, states.CLAIMED, claim=("alice", "c-7f3a"))
    add_gpu(prom, 1, states.BUSY, "alice", claim=("alice", "c-7f3a"))  # her job has started
    add_gpu(prom, 2, states.CLAIMED, claim=("bob", "c-99"),
            reservation=("carol", "2026-12-03T03:05:00+01:00"))
    add_gpu(prom, 3, states.FREE)
    return prom


def test_the_reader_gives_each_claimed_gpu_its_claim(claimed_node: SeriesPrometheus) -> None:
    gpus = {g.gpu: g for g in fleet.read_fleet(claimed_node)}
    alice = fleet.ActiveClaim(id="c-7f3a", user="alice", until="2026-12-02T02:05:00+00:00")
    assert gpus[0].state == states.CLAIMED.name and gpus[0].claim == alice
    assert gpus[1].state == states.BUSY.name and gpus[1].claim == alice
    assert gpus[2].claim == fleet.ActiveClaim("c-99", "bob", "2026-12-02T02:05:00+00:00")
    assert gpus[2].reservation is not None and gpus[2].reservation.user == "carol"
    assert gpus[3].claim is None


def test_claimed_gpus_are_never_picked(claimed_node: SeriesPrometheus) -> None:
    gpus = fleet.read_fleet(claimed_node)
    assert [g.gpu for g in fleet.pick(gpus, 1, user="alice")] == [3]
    with pytest.raises(fleet.FleetError, match="1 free GPU"):
        fleet.pick(gpus, 2, user="bob")


def _status(monkeypatch: pytest.MonkeyPatch, prom: SeriesPrometheus, *flags: str) -> str:
    monkeypatch.setattr(status, "ask_fleet", lambda args: fleet.read_fleet(prom))
    parser = argparse.ArgumentParser()
    status.COMMAND.add_arguments(parser)
    out = io.StringIO()
    assert status.COMMAND.run(parser.parse_args(list(flags)), out) == 0
    return out.getvalue()


def test_status_json_has_the_claim_or_null(monkeypatch: pytest.MonkeyPatch,
                                           claimed_node: SeriesPrometheus) -> None:
    printed = json.loads(_status(monkeypatch, claimed_node, "--json"))
    assert [g["claim"] for g in printed] == [
        {"id": "c-7f3a", "user": "alice", "until": "2026-12-02T02:05:00+00:00"},
        {"id": "c-7f3a", "user": "alice", "until": "2026-12-02T02:05:00+00:00"},
        {"id": "c-99", "user": "bob", "until": "2026-12-02T02:05:00+00:00"},
        None]
    assert [g["state"] for g in printed] == ["claimed", "busy", "claimed", "free"]


def test_the_grid_shows_claimed_and_who_claimed_it_until_when(
        monkeypatch: pytest.MonkeyPatch, claimed_node: SeriesPrometheus) -> None:
    lines = _status(monkeypatch, claimed_node, "--color", "never").splitlines()
    header = lines[0]
    assert header.split()[-1] == "RESERVATION"

    def cell(row: int, name: str) -> str:
        start = header.index(name)
        end = min((header.index(n) for n in header.split() if header.index(n) > start),
                  default=None)
        return lines[1 + row][start:end].strip()

    assert [cell(i, "STATE") for i in range(4)] == ["claimed", "busy", "claimed", "free"]
    assert [cell(i, "USERS") for i in range(4)] == ["-", "alice", "-", "-"]
    assert [cell(i, "RESERVATION") for i in range(4)] == [
        "claimed by alice until 2026-12-02 02:05+00:00",
        "claimed by alice until 2026-12-02 02:05+00:00",
        "carol until 2026-12-03 03:05+01:00; claimed by bob until 2026-12-02 02:05+00:00",
        "-"]
    assert lines[5].endswith(": 1 free, 1 busy, 2 claimed")


def test_claimed_is_painted_orange(monkeypatch: pytest.MonkeyPatch,
                                   claimed_node: SeriesPrometheus) -> None:
    grid = _status(monkeypatch, claimed_node, "--color", "always")
    assert states.CLAIMED.colour == "orange"
    assert "\033[38;5;208mclaimed" in grid
