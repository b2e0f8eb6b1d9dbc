"""The MIG rules against a real Prometheus: the simulator's mig scenario (an A100 in seven
1g.10gb slices, an H100 in mixed slices, an H100 without MIG) served by gpuwatch-exporter and
scraped by Debian's Prometheus on 127.0.0.1 with this repository's configuration and rules
(tests/prom_harness.py, short intervals).

promtool's cases (prometheus/tests/mig_test.yml) prove the expressions on made-up series; here
the series are the exporter's own (tests/golden/mig.prom): every slice of the scenario gets a
state, as its processes say, with its profile, MIG UUID and parent's model; the MIG-enabled
GPUs have no cell; the GPU without MIG is as before; a claimed slice and a booking of the
whole node, a stopped MIG node and lost parents are as the harness's oracle
(Fleet.expected_cells) has them; and no rule fails to evaluate (a join that meets the slices'
series many-to-many would)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prom_harness import Fleet, Node

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.contract import metrics, states
from gpuwatch.reservations import Reservation
from tools import localstack

pytestmark = pytest.mark.apt

HOST = "mig-01"
SCENARIO = "mig"


@dataclass(frozen=True)
class Shown:
    """What the grid says of a cell."""

    state: str
    users: tuple[str, ...]
    model: str
    profile: str | None
    reservation: str | None = None
    claim: str | None = None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("mig"), [Node(HOST, SCENARIO)]) as f:
        yield f


def expected_cells(fleet: Fleet, host: str = HOST) -> dict[Cell, Shown]:
    """The cells of a node now as the harness's oracle has them (Fleet.expected_cells): each
    slice that exists then (the reconfigurations of the scenario come after minutes), each
    GPU without MIG."""
    return {cell: Shown(e.state, e.users, e.model, e.profile, e.reservation, e.claim)
            for (on, cell), e in fleet.expected_cells().items() if on == host}


def grid(fleet: Fleet, host: str = HOST) -> dict[Cell, Shown]:
    found = {}
    for s in fleet.api.query(f'{states.STATE_INFO}{{host="{host}"}}'):
        cell = Cell.parse(s.labels["gpu"])
        found[cell] = Shown(s.labels["state"],
                            tuple(u for u in s.labels.get("users", "").split(",") if u),
                            s.labels.get("model", ""), s.labels.get("profile"),
                            s.labels.get("reservation"), s.labels.get("claim"))
    return found


def settled(fleet: Fleet) -> dict[Cell, Shown]:
    """The grid once it shows every cell of the scenario as it should (within the harness's
    deadline)."""
    return fleet.wait_for("every cell of the mig scenario in its state", lambda: grid(fleet),
                          lambda found: found == expected_cells(fleet))


def test_the_scenario_has_slices_and_a_gpu_without_mig(fleet: Fleet) -> None:
    """What the checks below stand on: slices of two GPUs, busy and free ones, and a whole
    GPU beside them."""
    cells = expected_cells(fleet)
    assert {c.gpu for c in cells if c.is_slice} == {0, 1}
    assert [c for c in cells if not c.is_slice] == [Cell(2)]
    assert {e.state for c, e in cells.items() if c.is_slice} == {states.BUSY.name,
                                                                 states.FREE.name}


def test_every_slice_has_its_state_users_model_and_profile(fleet: Fleet) -> None:
    settled(fleet)


def test_a_slice_is_labelled_as_its_cell_with_its_parents_uuid_and_its_mig_uuid(
        fleet: Fleet) -> None:
    settled(fleet)
    parents = {s.labels["gpu"]: s.labels["uuid"]
               for s in fleet.api.query(f'{metrics.UP.name}{{host="{HOST}"}}')}
    mig_uuids = {(s.labels["gpu"], s.labels["gpu_instance_id"]): s.labels["mig_uuid"]
                 for s in fleet.api.query(f'{metrics.MIG_INFO.name}{{host="{HOST}"}}')}
    for s in fleet.api.query(f'{states.STATE_INFO}{{host="{HOST}"}}'):
        cell = Cell.parse(s.labels["gpu"])
        if not cell.is_slice:
            assert {"gpu_instance_id", "profile", "mig_uuid"}.isdisjoint(s.labels), s.labels
            continue
        assert s.labels["gpu_instance_id"] == str(cell.instance)
        assert s.labels["uuid"] == parents[str(cell.gpu)]
        assert s.labels["mig_uuid"] == mig_uuids[str(cell.gpu), str(cell.instance)]
        assert "compute_instance_id" not in s.labels


def test_the_mig_enabled_gpus_have_no_cell(fleet: Fleet) -> None:
    settled(fleet)
    enabled = {s.labels["gpu"] for s in fleet.api.query(
        f'{metrics.INFO.name}{{host="{HOST}", mig_mode="enabled"}}')}
    assert enabled == {"0", "1"}
    for record in (states.STATE_INFO, states.STATE_CODE, "instance_gpu:gpuwatch_inventory:info",
                   "instance_gpu:gpuwatch_held:bool"):
        found = {s.labels["gpu"] for s in fleet.api.query(f'{record}{{host="{HOST}"}}')}
        assert found and not found & enabled, record


def test_the_gpu_without_mig_is_busy_as_before(fleet: Fleet) -> None:
    cells = settled(fleet)
    assert cells[Cell(2)] == Shown(states.BUSY.name, ("judy",), "NVIDIA H100 80GB HBM3", None)


def test_free_slices_are_counted_per_model_and_profile(fleet: Fleet) -> None:
    cells = settled(fleet)
    free = Counter((e.model, e.profile or "") for e in cells.values()
                   if e.state == states.FREE.name)
    counted = {(s.labels["model"], s.labels.get("profile", "")): s.value for s in
               fleet.api.query(f'instance_model:gpuwatch_gpus_free:count{{host="{HOST}"}}')}
    assert counted == {(e.model, e.profile or ""): free[e.model, e.profile or ""]
                       for e in cells.values()}
    assert fleet.api.query_value(f'instance:gpuwatch_gpus_free:count{{host="{HOST}"}}') == \
        sum(free.values())


FAILING = """
description: >-
  A MIG node whose A100s fail: GPU 0 fell off the bus before the exporter ever read it, GPU 1
  (a busy 3g.40gb slice and a free 1g.10gb one) a few seconds after the exporter started.
gpus:
  - name: NVIDIA A100-SXM4-80GB
    lost: true
    mig:
      - {profile: 1g.10gb, gpu_instance_id: 7}
  - name: NVIDIA A100-SXM4-80GB
    lost_after_seconds: %(lost_after)s
    mig:
      - profile: 3g.40gb
        gpu_instance_id: 1
        processes:
          - {pid: 81001, user: kim, command: python, memory_gib: 20}
      - {profile: 1g.10gb, gpu_instance_id: 9}
  - name: NVIDIA H100 80GB HBM3
"""
LOST_AFTER = 6.0
"""When the failing node's GPU 1 is lost: after Prometheus has seen it (the harness's
SEEN_SCRAPES scrapes), soon enough for a short test."""


def test_failing_mig_nodes_keep_their_slices_down(fleet: Fleet,
                                                  tmp_path_factory: pytest.TempPathFactory
                                                  ) -> None:
    """The rules and the oracle agree on MIG nodes that fail: a node whose exporter stops
    keeps every cell it had, down, with its model and profile; a MIG-enabled GPU lost before
    Prometheus read it is a GPU down without a model (its slices were never seen); one lost
    after keeps its slices, down, and is no cell itself."""
    scenario = tmp_path_factory.mktemp("failing") / "failing.yaml"
    scenario.write_text(FAILING % {"lost_after": LOST_AFTER})
    failing = fleet.add_node(Node("mig-failing", str(scenario)))
    stopping = fleet.add_node(Node("mig-stopping", SCENARIO))
    hosts = ("mig-failing", "mig-stopping")
    try:
        fleet.wait_for_rules()
        running = expected_cells(fleet, "mig-stopping")
        stopping.stop()
        _, oracle = fleet.wait_for(
            "the failing nodes' cells as the oracle has them, GPU 1 of mig-failing lost",
            lambda: ({h: grid(fleet, h) for h in hosts}, {h: expected_cells(fleet, h)
                                                          for h in hosts}),
            lambda both: both[0] == both[1] and
            both[1]["mig-failing"][Cell(1, 1)].state == states.DOWN.name)
        down = states.DOWN.name
        assert oracle["mig-stopping"] == {c: Shown(down, (), e.model, e.profile)
                                          for c, e in running.items()}
        assert {e.profile for e in running.values()} > {None}, "its slices are kept"
        cells = oracle["mig-failing"]
        a100 = "NVIDIA A100-SXM4-80GB"
        assert cells == {Cell(0): Shown(down, (), "", None),
                         Cell(1, 1): Shown(down, (), a100, "3g.40gb"),
                         Cell(1, 9): Shown(down, (), a100, "1g.10gb"),
                         Cell(2): Shown(states.FREE.name, (), "NVIDIA H100 80GB HBM3", None)}
    finally:
        fleet.remove_node(failing)
        fleet.remove_node(stopping)


def test_a_claimed_slice_and_a_booking_of_the_whole_host(fleet: Fleet) -> None:
    """A slice claimed through gpuwatch serve, then the whole MIG node booked for grace (all):
    the rules and the oracle agree on every cell: the claimed slice claimed (not held), the
    slices grace works on busy, every other cell reserved, each with the booking in words."""
    settled(fleet)
    claim = fleet.claim("zoe", HOST)
    (claimed,) = [Cell.from_json(g) for g in claim["gpus"]]
    assert claimed.is_slice, claim  # GPU 2, the one whole GPU, is busy
    until = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=1)
    reservations.write(fleet.reservations_file,
                       [Reservation(HOST, None, "grace", until, comment="whole node")])
    try:
        _, cells = fleet.wait_for(
            "the claim and the booking of every cell in the grid",
            lambda: (grid(fleet), expected_cells(fleet)),
            lambda both: both[0] == both[1] and all(e.reservation for e in both[1].values()))
        assert cells[claimed].state == states.CLAIMED.name and cells[claimed].claim == "zoe"
        assert {c for c, e in cells.items() if e.state == states.BUSY.name} == {
            c for c, e in cells.items() if "grace" in e.users} != set()
        assert {e.state for c, e in cells.items() if c != claimed and "grace" not in e.users
                } == {states.RESERVED.name}
    finally:
        fleet.end_claim(claim)
        reservations.write(fleet.reservations_file, [])


def test_no_rule_fails_to_evaluate(fleet: Fleet) -> None:
    settled(fleet)
    rules = [r for g in fleet.api.rules() for r in g["rules"]]
    assert len(rules) == sum(len(localstack.rules(localstack.load_rules(p)))
                             for p in localstack.rule_files())
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    failures = fleet.wait_for("Prometheus' own rule metrics scraped", lambda: fleet.api.query(
        "prometheus_rule_evaluation_failures_total"), lambda found: len(found) > 0)
    assert {s.labels["rule_group"]: s.value for s in failures if s.value} == {}
