"""Grafana's queries against a real Prometheus, and its frontend code on their answers.

Every panel query of the dashboards runs against a real Prometheus fed by simulated exporters
(tests/prom_harness.py), with Grafana's variables replaced by the values Grafana would give
them; the availability grid must show every simulated GPU in the state and with the users the
harness's oracle says, and the tables and state timelines go through Grafana's own frontend
data code (@grafana/data). The dashboards as files: tests/unit/test_grafana_files.py.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from grafana_dashboards import DASHBOARDS, apply_mappings, grid_panel, panel_titled
from paths import FIXTURES, REPO
from prom_harness import Fleet, Node

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

FLEET_NODES = [
    Node("ws-01", "workstation", {"cluster": "lab"}),
    Node("srv-01", "server", {"cluster": "dc", "rack": "r1"}),
    Node("a100-01", "lost-gpu", {"cluster": "dc", "rack": "r2"}),
    # the health series that exist only once something went wrong (retired pages, a failed
    # row remapping): so that the node dashboard's health panels have data to show
    Node("old-01", str(FIXTURES / "worn-memory.yaml"), {"cluster": "dc", "rack": "r3"}),
]


def fleet_reservations() -> list[Reservation]:
    """A free GPU of srv-01 booked for frank, and a GPU carol works on booked for her."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return [Reservation("srv-01", (4,), "frank", now + dt.timedelta(days=2),
                        comment="camera-ready"),
            Reservation("srv-01", (0,), "carol", now + dt.timedelta(days=1))]


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
    dashboard = DASHBOARDS[uid]
    assignments = resolve_variables(fleet, dashboard)
    empty = []
    for panel, target in targets(dashboard):
        results = [fleet.api.query(expand(target["expr"], values)) for values in assignments]
        if not any(results):
            empty.append(f"{panel['title']} {target['refId']}: {target['expr']}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def grid_rows(fleet: Fleet) -> dict[tuple[str, int], Mapping[str, str]]:
    (target,) = grid_panel()["targets"]
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    rows = {}
    for series in fleet.api.query(expand(target["expr"], values)):
        labels = series.labels
        key = (labels["host"], int(labels["gpu"]))
        assert key not in rows, f"two cells for {key}"
        rows[key] = labels
    return rows


def test_grid_shows_every_gpu_in_its_state_with_its_users(fleet: Fleet) -> None:
    rows = grid_rows(fleet)
    expected = fleet.expected().values()
    assert sorted(rows) == sorted((e.host, e.gpu) for e in expected)
    mappings = grid_panel()["fieldConfig"]["defaults"]["mappings"]
    for e in expected:
        labels = rows[(e.host, e.gpu)]
        where = f"{e.host} GPU {e.gpu}"
        assert labels["state"] == e.state, where
        users = labels.get("users", "")
        assert tuple(u for u in users.split(",") if u) == e.users, where
        assert labels.get("model", "") == e.model, where
        shown = apply_mappings(mappings, labels["cell"])
        assert shown is not None, f"{where}: no colour for {labels['cell']!r}"
        assert shown["color"] == states.BY_NAME[e.state].colour, where
        assert labels.get("reservation") == e.reservation, where
        assert labels.get("claim") == e.claim, where
        if e.state == states.RESERVED.name:  # who booked it, until when, why
            assert shown["text"] == f"reserved: {e.reservation}", where
            continue
        if e.state == states.CLAIMED.name:  # who claimed it
            assert shown["text"] == f"claimed: {e.claim}", where
            continue
        for user in e.users:
            assert user in shown["text"], f"{where}: the cell names {user}"
        if e.state != "busy" or not e.users:
            assert e.state in shown["text"], f"{where}: the cell says {e.state}"
    assert {e.state for e in expected} == {s.name for s in states.ALL}, \
        "the simulated fleet shows every state the rules produce"
    assert any(e.state == states.BUSY.name and e.reservation for e in expected), \
        "a booked GPU its holder uses is busy"


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
    expected = fleet.expected()
    hosts = sorted({host for host, _ in expected})
    indices = sorted({index for _, index in expected})
    columns = {field["name"]: field for field in drawn["fields"]}
    assert list(columns) == ["host", *map(str, indices)], json.dumps(drawn)[:3000]
    assert [cell["text"] for cell in columns["host"]["cells"]] == hosts
    assert columns["host"]["custom"]["cellOptions"]["type"] == "auto", "host is not coloured"
    assert len({host for host, _ in expected if (host, max(indices)) not in expected}) > 0, \
        "a host with fewer GPUs than another leaves cells empty"
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
            if e.state == states.RESERVED.name:
                assert cell["text"] == f"reserved: {e.reservation}", where
            elif e.state == states.CLAIMED.name:
                assert cell["text"] == f"claimed: {e.claim}", where
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
        results = {t["refId"]: fleet.api.query(expand(t["expr"], values))
                   for t in panel["targets"] if not t.get("hide")}
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
        assert shown["text"] == rows[(labels["host"], int(labels["gpu"]))]["state"]


def test_free_counts_match_the_scenarios(fleet: Fleet) -> None:
    expected = fleet.expected().values()
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    (total,) = panel_titled("gpuwatch-fleet", "Free GPUs")["targets"]
    (result,) = fleet.api.query(expand(total["expr"], values))
    assert result.value == sum(e.state == "free" for e in expected)
    (per_model,) = panel_titled("gpuwatch-fleet", "Free GPUs per model")["targets"]
    got = {r.labels["model"]: r.value
           for r in fleet.api.query(expand(per_model["expr"], values))}
    assert got == {model: float(sum(e.state == "free" and e.model == model for e in expected))
                   for model in {e.model for e in expected if e.model}}


def test_holders_table_lists_every_process(fleet: Fleet) -> None:
    table = panel_titled("gpuwatch-fleet", "Who holds GPUs now")
    values = resolve_variables(fleet, DASHBOARDS["gpuwatch-fleet"])[0]
    for target in table["targets"]:
        got = sorted((r.labels["host"], r.labels["gpu"], r.labels["pid"], r.labels["user"],
                      r.labels["command"])
                     for r in fleet.api.query(expand(target["expr"], values)))
        assert got == sorted((p.host, str(p.gpu), str(p.pid), p.user, p.command)
                             for p in fleet.expected_processes()), target["refId"]
