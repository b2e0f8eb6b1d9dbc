"""Grafana's queries against a real Prometheus, and its frontend code on their answers.

Every panel query of the dashboards runs against a real Prometheus fed by simulated exporters
(tests/prom_harness.py), with Grafana's variables replaced by the values Grafana would give
them; the availability grid must show every simulated GPU and MIG slice (the fleet has a MIG
node) in the state and with the users the harness's oracle (Fleet.expected_cells) says, and
the tables and state timelines go through Grafana's own frontend data code (@grafana/data).
The dashboards as files: tests/unit/test_grafana_files.py.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from grafana_dashboards import DASHBOARDS, apply_mappings, grid_panel, panel_titled
from paths import FIXTURES, REPO
from prom_harness import Fleet, Node

from gpuwatch.cells import Cell
from gpuwatch.contract import states
from gpuwatch.contract.thresholds import IDLE_DURATION
from gpuwatch.fleet.prometheus import Sample
from gpuwatch.reservations import Reservation
from tools.dashboards import (
    expand,
    panels,
    targets,
)
from tools.dashboards import grafana_values as grafana_builtins
from tools.dashboards import resolve_variables as resolve_with

# -- every query against a real Prometheus -----------------------------------------------------

MIG_HOST = "mig-01"

FLEET_NODES = [
    Node("ws-01", "workstation", {"cluster": "lab"}),
    Node("srv-01", "server", {"cluster": "dc", "rack": "r1"}),
    Node("a100-01", "lost-gpu", {"cluster": "dc", "rack": "r2"}),
    # the health series that exist only once something went wrong (retired pages, a failed
    # row remapping): so that the node dashboard's health panels have data to show
    Node("old-01", str(FIXTURES / "worn-memory.yaml"), {"cluster": "dc", "rack": "r3"}),
    # MIG: an A100 in seven 1g.10gb slices, a mixed H100, an H100 without MIG; every query
    # runs with it in the fleet, and the grid and the node dashboard's MIG row show its slices
    Node("mig-01", "mig", {"cluster": "dc", "rack": "r4"}),
]


def fleet_reservations() -> list[Reservation]:
    """A free GPU of srv-01 booked for frank, a GPU carol works on booked for her, a free MIG
    slice of mig-01 booked for frank, and mig-01's MIG-enabled H100 booked for ivan, who works
    on one of its slices (the booking covers every slice of it)."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return [Reservation("srv-01", (4,), "frank", now + dt.timedelta(days=2),
                        comment="camera-ready"),
            Reservation("srv-01", (0,), "carol", now + dt.timedelta(days=1)),
            Reservation(MIG_HOST, (Cell(0, 12),), "frank", now + dt.timedelta(days=3),
                        comment="ablation"),
            Reservation(MIG_HOST, (Cell(1),), "ivan", now + dt.timedelta(days=1))]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # The idle duration is 0 so erin's held-but-unused GPU is idle at once; every other
    # threshold is the rules' own. gina claims a100-01's free GPU (gpuwatch run) for the
    # longest a claim may last, and starts nothing on it.
    with Fleet(tmp_path_factory.mktemp("fleet"), FLEET_NODES,
               thresholds={IDLE_DURATION: 0},
               reservations=fleet_reservations()) as running:
        running.wait_for_rules()
        claim = running.claim("gina", "a100-01", minutes=60)
        running.wait_for("gina's claim in the grid", lambda: {
            (s.labels["host"], s.labels["gpu"], s.labels.get("claim"))
            for s in running.api.query(f'{states.STATE_INFO}{{state="claimed"}}')},
            lambda found: found == {("a100-01", str(g), "gina") for g in claim["gpus"]})
        yield running


def grafana_values(fleet: Fleet) -> dict[str, str]:
    """Grafana's own variables, as they would be for a one-hour range."""
    return grafana_builtins(fleet.interval)


def resolve_variables(fleet: Fleet, dashboard: dict[str, Any]) -> list[dict[str, str]]:
    """Every assignment Grafana offers (tools.dashboards.resolve_variables)."""
    return resolve_with(dashboard, fleet.api.label_values, grafana_values(fleet))


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_every_panel_query_returns_data(fleet: Fleet, uid: str) -> None:
    """Every query, at every choice of the variables, answers (none fails: a join on
    (instance, gpu) with a MIG node in the fleet is no many-to-many match), and each has data
    at some choice."""
    dashboard = DASHBOARDS[uid]
    assignments = resolve_variables(fleet, dashboard)
    empty = []
    for panel, target in targets(dashboard):
        results = [fleet.api.query(expand(target["expr"], values)) for values in assignments]
        if not any(results):
            empty.append(f"{panel['title']} {target['refId']}: {target['expr']}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def grid_rows(fleet: Fleet) -> dict[tuple[str, Cell], Mapping[str, str]]:
    (target,) = grid_panel()["targets"]
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    rows = {}
    for series in fleet.api.query(expand(target["expr"], values)):
        labels = series.labels
        key = (labels["host"], Cell.parse(labels["gpu"]))
        assert key not in rows, f"two cells for {key}"
        rows[key] = labels
    return rows


def cell_key(key: tuple[str, Cell]) -> tuple[str, tuple[int, int]]:
    return key[0], key[1].sort_key()


def test_grid_shows_every_gpu_in_its_state_with_its_users(fleet: Fleet) -> None:
    rows = grid_rows(fleet)
    cells = fleet.expected_cells()
    expected = cells.values()
    assert sorted(rows, key=cell_key) == sorted(cells, key=cell_key)
    mappings = grid_panel()["fieldConfig"]["defaults"]["mappings"]
    for e in expected:
        labels = rows[(e.host, e.cell)]
        where = f"{e.host} GPU {e.cell}"
        assert labels["state"] == e.state, where
        users = labels.get("users", "")
        assert tuple(u for u in users.split(",") if u) == e.users, where
        assert labels.get("model", "") == e.model, where
        assert labels.get("profile") == e.profile, where
        shown = apply_mappings(mappings, labels["cell"])
        assert shown is not None, f"{where}: no colour for {labels['cell']!r}"
        assert shown["color"] == states.BY_NAME[e.state].colour, where
        assert labels.get("reservation") == e.reservation, where
        assert labels.get("claim") == e.claim, where
        profile = f"{e.profile} " if e.profile else ""  # a slice's text starts with it
        assert shown["text"].startswith(profile), where
        if e.state == states.RESERVED.name:  # who booked it, until when, why
            assert shown["text"] == f"{profile}reserved: {e.reservation}", where
            continue
        if e.state == states.CLAIMED.name:  # who claimed it
            assert shown["text"] == f"{profile}claimed: {e.claim}", where
            continue
        for user in e.users:
            assert user in shown["text"], f"{where}: the cell names {user}"
        if e.state != "busy" or not e.users:
            assert e.state in shown["text"], f"{where}: the cell says {e.state}"
    assert {e.state for e in expected} == {s.name for s in states.ALL}, \
        "the simulated fleet shows every state the rules produce"
    assert any(e.state == states.BUSY.name and e.reservation for e in expected), \
        "a booked GPU its holder uses is busy"
    on_slices = {e.state for e in expected if e.cell.is_slice}
    assert on_slices >= {states.FREE.name, states.BUSY.name, states.RESERVED.name}, \
        "the MIG node has free, busy and booked slices"
    parent_booked = [e for e in expected if e.cell.is_slice and e.cell.gpu == 1]
    assert len(parent_booked) > 1 and all(e.reservation for e in parent_booked), \
        "a booking of a MIG-enabled GPU covers its slices"
    assert {e.state for e in parent_booked} == {states.BUSY.name, states.RESERVED.name}, \
        "busy where the one who booked the GPU works on a slice, reserved elsewhere"


GRAFANA_FRONTEND = REPO / "tests" / "grafana_frontend"
"""Grafana's own frontend data code, @grafana/data (package.json pins it; `make test` installs
it with npm ci), and render-table.cjs, which runs a table panel's data through it."""


def prometheus_table_frames(results: dict[str, list[Sample]]) -> list[dict[str, Any]]:
    """The data frames Grafana's Prometheus datasource makes of instant queries in table
    format (transformDFToTable in Grafana's packages/grafana-prometheus), one per query by
    refId: Time, a string field per label name (each series' labels in name order, new names
    appended; "" where a series lacks one), and Value, "Value #<refId>" when there are
    several queries."""
    frames = []
    for ref_id, result in results.items():
        names: list[str] = []
        for series in result:
            names += [name for name in sorted(series.labels) if name not in names]
        value = "Value" if len(results) == 1 else f"Value #{ref_id}"
        frames.append({"refId": ref_id, "fields": [
            {"name": "Time", "type": "time",
             "values": [s.timestamp * 1000 for s in result]},
            *({"name": name, "type": "string", "config": {"filterable": True},
               "values": [s.labels.get(name, "") for s in result]} for name in names),
            {"name": value, "type": "number", "values": [s.value for s in result]},
        ]})
    return frames


def panel_answers(fleet: Fleet, panel: dict[str, Any], values: Mapping[str, str]
                  ) -> dict[str, list[Sample]]:
    """Each query's answer by refId, all at one instant, as Grafana asks them (one request
    time for the panel: the merge of a table's queries joins rows on equal times)."""
    at = time.time()
    return {t["refId"]: fleet.api.query(expand(t["expr"], values), at=at)
            for t in panel["targets"] if not t.get("hide")}


def draw_table(panel: dict[str, Any], frames: list[dict[str, Any]]) -> dict[str, Any]:
    """What Grafana's frontend makes of `frames` in `panel`: its transformations, field config
    and value mappings applied by @grafana/data (tests/grafana_frontend/render-table.cjs)."""
    if not (GRAFANA_FRONTEND / "node_modules" / "@grafana" / "data").is_dir():
        pytest.fail("@grafana/data is not installed: `make test` installs it "
                    "(cd tests/grafana_frontend && npm ci)")
    colours = sorted({state.colour for state in states.ALL})
    done = subprocess.run(["node", "render-table.cjs"], cwd=GRAFANA_FRONTEND,
                          input=json.dumps({"panel": panel, "frames": frames, "colors": colours}),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_grid_as_grafanas_own_code_draws_it(fleet: Fleet) -> None:
    """The grid query's answer through the grid panel in Grafana's frontend code: a row per
    host in name order, a column per GPU index, every GPU's cell in its state's colour naming
    who holds, claimed or booked it, and no colour where a host has no GPU of that index."""
    panel = grid_panel()
    (target,) = panel["targets"]
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    drawn = draw_table(panel, prometheus_table_frames(
        {target["refId"]: fleet.api.query(expand(target["expr"], values))}))
    expected = fleet.expected_cells()
    hosts = sorted({host for host, _ in expected})
    indices = sorted({index for _, index in expected}, key=Cell.sort_key)
    columns = {field["name"]: field for field in drawn["fields"]}
    assert list(columns) == ["host", *map(str, indices)], json.dumps(drawn)[:3000]
    assert any(index.is_slice for index in indices), "the MIG node's slices are columns"
    assert [cell["text"] for cell in columns["host"]["cells"]] == hosts
    assert columns["host"]["custom"]["cellOptions"]["type"] == "auto", "host is not coloured"
    assert len({host for host, _ in expected if (host, max(indices, key=Cell.sort_key))
                not in expected}) > 0, "a host with fewer GPUs than another leaves cells empty"
    state_colours = {drawn["colors"][state.colour] for state in states.ALL}
    for row, host in enumerate(hosts):
        for index in indices:
            cell = columns[str(index)]["cells"][row]
            where = f"{host} GPU {index}: {cell}"
            e = expected.get((host, index))
            if e is None:
                assert cell["text"] == "" and cell["color"] not in state_colours, where
                continue
            assert columns[str(index)]["custom"]["cellOptions"]["type"] == "color-background"
            assert cell["color"] == drawn["colors"][states.BY_NAME[e.state].colour], where
            profile = f"{e.profile} " if e.profile else ""
            assert cell["text"].startswith(profile), where
            if e.state == states.RESERVED.name:
                assert cell["text"] == f"{profile}reserved: {e.reservation}", where
            elif e.state == states.CLAIMED.name:
                assert cell["text"] == f"{profile}claimed: {e.claim}", where
            elif e.users:
                assert all(user in cell["text"] for user in e.users), where
            if e.state != states.BUSY.name or not e.users:
                assert e.state in cell["text"], where


TABLES = [(uid, panel["title"]) for uid, d in DASHBOARDS.items() for panel in panels(d)
          if panel["type"] == "table"]


@pytest.mark.parametrize(("uid", "title"), TABLES, ids=[f"{u}:{t}" for u, t in TABLES])
def test_table_columns_as_grafanas_own_code_draws_them(fleet: Fleet, uid: str,
                                                       title: str) -> None:
    """Every table's queries through its transformations in Grafana's frontend code: one
    table with rows, each column one the panel places (its `organize` step names it, by the
    name the column has when it reaches that step), in the order it gives, nothing it
    excludes; the columns it sorts by and sets options for by name are there."""
    panel = panel_titled(uid, title)
    assert all(t.get("format") == "table" for t in panel["targets"]), "table queries"
    for values in resolve_variables(fleet, DASHBOARDS[uid]):  # the first choice with data
        results = panel_answers(fleet, panel, values)
        if all(results.values()):
            break
    else:
        pytest.fail(f"{title}: no choice of the variables gives every query data")
    drawn = draw_table(panel, prometheus_table_frames(results))
    assert drawn["length"] > 0
    shown = [field["name"] for field in drawn["fields"]]
    organize = [t["options"] for t in panel.get("transformations", []) if t["id"] == "organize"]
    assert len(organize) == 1, f"{title}: one organize step places the columns"
    (options,) = organize
    renamed = options.get("renameByName", {})
    original = {new: old for old, new in renamed.items()}
    index = options.get("indexByName", {})
    excluded = {name for name, gone in options.get("excludeByName", {}).items() if gone}
    places = [index.get(original.get(name, name)) for name in shown]
    assert None not in places, \
        f"{title}: columns the organize step does not place: " \
        f"{[n for n, p in zip(shown, places, strict=True) if p is None]} (shown: {shown})"
    assert places == sorted(places), f"{title}: columns out of order: {shown}"
    assert not {original.get(name, name) for name in shown} & excluded
    sorted_by = {key["field"] for t in panel.get("transformations", []) if t["id"] == "sortBy"
                 for key in t["options"]["sort"]}
    assert sorted_by <= set(shown), f"{title}: sorts by a column it does not have"
    overridden = {o["matcher"]["options"] for o in panel["fieldConfig"].get("overrides", [])
                  if o["matcher"]["id"] == "byName"}
    assert overridden <= set(shown), \
        f"{title}: overrides for columns it does not have: {overridden - set(shown)}"


STATE_CODE_PANELS = [(uid, p["title"]) for uid, d in DASHBOARDS.items() for p in panels(d)
                     if any(states.STATE_CODE in t.get("expr", "") for t in p.get("targets", []))]


@pytest.mark.parametrize(("uid", "title"), STATE_CODE_PANELS,
                         ids=[f"{u}:{t}" for u, t in STATE_CODE_PANELS])
def test_state_codes_as_grafanas_own_code_shows_them(uid: str, title: str) -> None:
    """A panel drawing state codes (the state timelines) shows each code as its state's name
    in its colour when Grafana's display processor applies the panel's field config."""
    panel = {**panel_titled(uid, title), "transformations": []}
    codes = [state.code for state in states.ALL]
    drawn = draw_table(panel, [{"refId": "A", "fields": [
        {"name": "Value", "type": "number", "values": codes}]}])
    (field,) = drawn["fields"]
    assert [(cell["text"], cell["color"]) for cell in field["cells"]] == \
        [(state.name, drawn["colors"][state.colour]) for state in states.ALL]


def test_state_history_names_the_states_the_grid_shows(fleet: Fleet) -> None:
    timeline = panel_titled("gpuwatch-fleet", "State of every GPU")
    (target,) = timeline["targets"]
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    names = timeline["fieldConfig"]["defaults"]["mappings"]
    rows = grid_rows(fleet)
    codes = fleet.api.query(expand(target["expr"], values))
    assert len(codes) == len(rows)
    for series in codes:
        labels = series.labels
        shown = apply_mappings(names, f"{series.value:g}")
        assert shown is not None
        assert shown["text"] == rows[(labels["host"], Cell.parse(labels["gpu"]))]["state"]


def test_free_counts_match_the_scenarios(fleet: Fleet) -> None:
    """Free cells in all and per model and MIG profile (free 1g.10gb slices of A100s apart
    from free A100s), each named by its display name, a slice's with its profile."""
    expected = fleet.expected_cells().values()
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    (total,) = panel_titled("gpuwatch-fleet", "Free GPUs")["targets"]
    (result,) = fleet.api.query(expand(total["expr"], values))
    assert result.value == sum(e.state == "free" for e in expected)
    (per_model,) = panel_titled("gpuwatch-fleet", "Free GPUs per model")["targets"]
    answer = fleet.api.query(expand(per_model["expr"], values))
    got = {(r.labels["model"], r.labels.get("profile")): r.value for r in answer}
    assert len(got) == len(answer), "one bar per model and profile"
    kinds = {(e.model, e.profile) for e in expected if e.model}
    assert got == {(model, profile): float(sum(
        e.state == "free" and (e.model, e.profile) == (model, profile) for e in expected))
        for model, profile in kinds}
    assert any(profile for _, profile in got), "slices are counted by profile"
    for r in answer:
        profile = r.labels.get("profile")
        name = r.labels["display_name"]
        assert name.endswith(f" {profile}") if profile else not name.endswith(" "), name


def process_cells(fleet: Fleet, at: float) -> list[tuple[str, str, str, str, str]]:
    """(host, cell, pid, user, command) of every process the exporters report at `at`; a
    process on a MIG slice is on the slice's cell."""
    return sorted((p.host, str(p.cell), str(p.pid), p.user, p.command)
                  for p in fleet.expected_processes(at))


def test_holders_table_lists_every_process(fleet: Fleet) -> None:
    """Every process, those on MIG slices on their slice's cell (0/7), with the model."""
    table = panel_titled("gpuwatch-fleet", "Who holds GPUs now")
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    expected = process_cells(fleet, time.time())
    assert any("/" in cell for _, cell, *_ in expected), "processes on MIG slices"
    for target in table["targets"]:
        answer = fleet.api.query(expand(target["expr"], values))
        got = sorted((r.labels["host"], r.labels["gpu"], r.labels["pid"], r.labels["user"],
                      r.labels["command"]) for r in answer)
        assert got == expected, target["refId"]
        for r in answer:
            if "/" in r.labels["gpu"]:  # a slice: its parent's short name and its profile
                assert r.labels["display_name"].endswith(" 1g.10gb") or \
                    r.labels["display_name"].endswith("g.40gb"), r.labels


def test_users_panel_shows_where_the_slices_users_are(fleet: Fleet) -> None:
    """The users dashboard's table names the slice (cell) each user holds, with its state and
    profile."""
    (target,) = panel_titled("gpuwatch-users", "Where the users' GPUs are")["targets"]
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-users"])[0]
    cells = fleet.expected_cells()
    got = {(r.labels["host"], r.labels["gpu"], r.labels["user"]):
           (r.labels["state"], r.labels.get("profile"))
           for r in fleet.api.query(expand(target["expr"], values))}
    expected = {(e.host, str(e.cell), user): (e.state, e.profile)
                for e in cells.values() for user in e.users}
    assert got == expected
    assert any("/" in cell for _, cell, _ in got)


# -- the node dashboard on a MIG node ---------------------------------------------------------

MIG_ROW = ("MIG slices", "Memory per slice", "Processes per slice", "Users per slice")


def node_values(fleet: Fleet, host: str) -> dict[str, str]:
    (values,) = [v for v in resolve_variables(fleet, DASHBOARDS["gpuwatch-node"])
                 if v["host"] == host]
    return values


def mig_row_answers(fleet: Fleet, host: str) -> dict[tuple[str, str], list[Sample]]:
    values = node_values(fleet, host)
    return {(title, target["refId"]): fleet.api.query(expand(target["expr"], values))
            for title in MIG_ROW for target in panel_titled("gpuwatch-node", title)["targets"]}


def test_mig_row_shows_every_slice_of_a_mig_node(fleet: Fleet) -> None:
    """The node dashboard's MIG row on the MIG node: every slice (cell) with its profile,
    state, users, memory and processes; the users per slice."""
    answers = mig_row_answers(fleet, MIG_HOST)
    slices = {e.cell: e for (host, _), e in fleet.expected_cells().items()
              if host == MIG_HOST and e.cell.is_slice}
    assert len(slices) >= 10, "seven 1g.10gb slices and three of the H100"
    for (title, ref), answer in answers.items():
        where = f"{title} {ref}"
        by_cell = {Cell.parse(r.labels["gpu"]): r for r in answer}
        if title == "Users per slice":
            assert {(c, r.labels["user"]) for c, r in
                    ((Cell.parse(r.labels["gpu"]), r) for r in answer)} == \
                {(c, user) for c, e in slices.items() for user in e.users}, where
            continue
        assert len(by_cell) == len(answer) and set(by_cell) == set(slices), where
        for c, r in by_cell.items():
            e = slices[c]
            assert r.labels["profile"] == e.profile, f"{where} {c}"
            if title == "MIG slices":
                assert r.labels["state"] == e.state, f"{where} {c}"
                assert tuple(u for u in r.labels.get("users", "").split(",") if u) == e.users
                assert r.labels["mig_uuid"].startswith("MIG-"), f"{where} {c}"
            if (title, ref) in (("MIG slices", "B"), ("Memory per slice", "B")):
                assert r.value == e.memory_total_bytes, f"{where} {c}"
            if (title, ref) in (("MIG slices", "C"), ("Processes per slice", "A")):
                assert r.value == e.processes, f"{where} {c}"
    # as Grafana's own code draws the table: one row per slice, every column filled
    table = panel_titled("gpuwatch-node", "MIG slices")
    drawn = draw_table(table, prometheus_table_frames(
        panel_answers(fleet, table, node_values(fleet, MIG_HOST))))
    columns = {field["name"]: [cell["text"] for cell in field["cells"]]
               for field in drawn["fields"]}
    assert sorted(columns["slice"]) == sorted(map(str, slices)), columns["slice"]
    for row, name in enumerate(columns["slice"]):
        e = slices[Cell.parse(name)]
        assert columns["profile"][row] == e.profile and columns["state"][row] == e.state
        assert all(columns[c][row] != "" for c in ("Memory used", "Memory", "Processes")), \
            {c: v[row] for c, v in columns.items()}


def test_mig_row_is_empty_on_a_node_without_mig(fleet: Fleet) -> None:
    """Valid queries that find nothing (Grafana shows "No data"), not errors."""
    assert all(answer == [] for answer in mig_row_answers(fleet, "ws-01").values())


def test_node_dashboard_keeps_a_mig_gpus_own_panels(fleet: Fleet) -> None:
    """The GPU variable lists the MIG node's GPUs as NVML numbers them; a MIG-enabled GPU keeps
    its row in the GPUs table (state MIG, the users of its slices) and its own series
    (temperature); the state timeline draws its slices."""
    values = node_values(fleet, MIG_HOST)
    running = fleet.node(MIG_HOST)
    indices = [str(i) for i in range(len(running.scenario.gpus))]
    assert fleet.api.label_values("gpu", f'nvidia_gpu_up{{host="{MIG_HOST}"}}') == indices
    (target,) = panel_titled("gpuwatch-node", "GPUs")["targets"]
    rows = {r.labels["gpu"]: r.labels for r in fleet.api.query(expand(target["expr"], values))}
    assert sorted(rows) == indices
    cells = fleet.expected_cells()
    for index, gpu in enumerate(running.scenario.gpus):
        labels = rows[str(index)]
        if gpu.mig:
            assert labels["state"] == "MIG", labels
            users = {u for (host, c), e in cells.items()
                     if host == MIG_HOST and c.gpu == index for u in e.users}
            assert set(filter(None, labels.get("users", "").split(","))) == users
        else:
            assert labels["state"] == cells[MIG_HOST, Cell(index)].state
    (temperature, *_) = panel_titled("gpuwatch-node", "Temperature")["targets"]
    assert sorted(r.labels["gpu"] for r in
                  fleet.api.query(expand(temperature["expr"], values))) == indices
    (timeline,) = panel_titled("gpuwatch-node", "State")["targets"]
    for gpu_value in ("0", ".*"):
        drawn = {Cell.parse(r.labels["gpu"]) for r in fleet.api.query(
            expand(timeline["expr"], {**values, "gpu": gpu_value}))}
        assert drawn == {c for host, c in cells if host == MIG_HOST
                         and (gpu_value == ".*" or c.gpu == 0)}, gpu_value
