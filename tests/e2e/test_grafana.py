"""Grafana: the provisioning and the dashboards.

Grafana itself cannot be installed here, so the dashboards are checked as files (schema,
uids, datasource, panel types, variables, links, metric names) and every panel query is run
against a real Prometheus fed by simulated exporters (tests/prom_harness.py), with Grafana's
variables replaced by the values Grafana would give them. The availability grid must show
every simulated GPU in the state and with the users its scenario says.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from grafana_provisioning import provisioned
from paths import REPO
from prom_harness import Fleet, Node, recorded_names, rules
from promql import grafana_metric_names

from gpuwatch.contract import metrics, states
from gpuwatch.contract.prometheus import SCRAPE_SERIES
from gpuwatch.contract.thresholds import IDLE_DURATION
from gpuwatch.fleet.prometheus import Sample
from gpuwatch.reservations import Reservation
from tools.dashboards import (
    VARIABLE,
    expand,
    label_values_query,
    load,
    load_all,
    panels,
    targets,
    variable_query,
    variables,
)
from tools.dashboards import grafana_values as grafana_builtins
from tools.dashboards import resolve_variables as resolve_with

GRAFANA = REPO / "grafana"
PROVISIONING = GRAFANA / "provisioning"
RUN_GRAFANA = GRAFANA / "run-grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))

PUBLISHED_UIDS = {"gpuwatch-fleet", "gpuwatch-usage", "gpuwatch-users", "gpuwatch-node"}
"""Uids in people's bookmarks and links: a dashboard may be added, never renamed away."""

CURRENT_PANEL_TYPES = {
    "row", "timeseries", "stat", "gauge", "bargauge", "table", "state-timeline",
    "status-history", "barchart", "histogram", "heatmap", "piechart", "text", "logs",
    "news", "dashlist", "alertlist", "nodeGraph", "trend", "xychart", "canvas",
}
"""Grafana 10/11 core panels; graph, singlestat, table-old and the old plugins are not here."""

GRAFANA_BUILTINS = {"__range", "__range_s", "__range_ms", "__interval", "__interval_ms",
                    "__rate_interval", "__data", "__field", "__value", "__series",
                    "__url_time_range", "__all", "__dashboard", "__from", "__to", "__org",
                    "__user", "timeFilter"}

DASHBOARD_LINK = re.compile(r"^/d/([\w-]+)(?:/[\w-]*)?(?:\?(.*))?$")


# -- reading dashboards ------------------------------------------------------------------------

DASHBOARDS = load_all(GRAFANA / "dashboards")


def strings(node: Any) -> Iterator[str]:
    """Every string in a JSON document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def links(node: Any) -> Iterator[str]:
    """The URL of every link (dashboard links, panel links, data links) in a document."""
    if isinstance(node, dict):
        if isinstance(node.get("url"), str) and node["url"]:
            yield node["url"]
        for value in node.values():
            yield from links(value)
    elif isinstance(node, list):
        for value in node:
            yield from links(value)


def normalized(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def js_regex(pattern: str) -> re.Pattern[str]:
    """Grafana's stringToJsRegex: /re/flags as written, anything else anchored as ^...$."""
    m = re.fullmatch(r"/(.*?)/([gimys]*)", pattern)
    if m is None:
        return re.compile(f"^{pattern}$")
    return re.compile(m.group(1), re.IGNORECASE if "i" in m.group(2) else 0)


def apply_mappings(mappings: list[dict[str, Any]], value: str) -> dict[str, Any] | None:
    """What Grafana shows for a value: the first mapping that matches (value, regex)."""
    for mapping in mappings:
        options = mapping["options"]
        if mapping["type"] == "value" and value in options:
            return dict(options[value])
        if mapping["type"] == "regex":
            pattern = js_regex(options["pattern"])
            if pattern.search(value):
                result = dict(options["result"])
                if "text" in result:  # JavaScript's replace: $1 is the first group
                    result["text"] = pattern.sub(re.sub(r"\$(\d)", r"\\\1", result["text"]),
                                                 value, count=1)
                return result
    return None


def panel_titled(dashboard: str, title: str) -> dict[str, Any]:
    found = [p for p in panels(DASHBOARDS[dashboard]) if p.get("title") == title]
    assert len(found) == 1, f"{dashboard}: expected one panel titled {title!r}"
    return found[0]


def grid_panel() -> dict[str, Any]:
    """The availability grid: the table that turns (host, gpu) rows into a matrix."""
    found = [p for p in panels(DASHBOARDS["gpuwatch-fleet"])
             if any(t["id"] == "groupingToMatrix" for t in p.get("transformations", []))]
    assert len(found) == 1, "the fleet dashboard has one grid"
    return found[0]


# -- the files ---------------------------------------------------------------------------------

def test_dashboards_are_there_and_published_uids_stay() -> None:
    assert DASHBOARD_FILES, "no dashboards in grafana/dashboards"
    assert set(DASHBOARDS) >= PUBLISHED_UIDS


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_is_a_provisionable_grafana_dashboard(path: Path) -> None:
    d = load(path)
    assert d["uid"] == path.stem, "the uid is the file name (without .json)"
    assert re.fullmatch(r"gpuwatch-[a-z0-9-]+", d["uid"]) and len(d["uid"]) <= 40
    assert d.get("id") is None, "a provisioned dashboard carries no database id"
    assert d["title"].startswith("gpuwatch / ")
    assert d["schemaVersion"] >= 36, "Grafana 10 or later"
    assert "gpuwatch" in d["tags"], "the dashboards link to each other by this tag"
    assert d["editable"] is False, "the files are the source; provisioning refuses UI saves"


def test_titles_are_unique() -> None:
    titles = [d["title"] for d in DASHBOARDS.values()]
    assert len(titles) == len(set(titles))
    for d in DASHBOARDS.values():
        names = [p["title"] for p in panels(d) if p["type"] != "row"]
        assert len(names) == len(set(names)), f"{d['title']}: panel titles are unique"


def test_the_guide_explains_every_panel() -> None:
    """docs/grafana.md has a section per dashboard naming each of its panels in bold."""
    guide = (REPO / "docs" / "grafana.md").read_text()
    sections = dict(re.findall(r"^### (.+?)\n(.*?)(?=^##|\Z)", guide, re.S | re.M))
    for d in DASHBOARDS.values():
        name = d["title"].removeprefix("gpuwatch / ")
        assert name in sections, f"docs/grafana.md has no section '### {name}'"
        explained = set(re.findall(r"\*\*(.+?)\*\*", sections[name]))
        shown = {p["title"] for p in panels(d) if p["type"] != "row"}
        assert explained == shown, f"{name}: explained but not shown: " \
            f"{sorted(explained - shown)}; shown but not explained: {sorted(shown - explained)}"


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_panels_are_current_types_and_laid_out(uid: str) -> None:
    d = DASHBOARDS[uid]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    taken: dict[tuple[int, int], str] = {}
    for p in panels(d):
        assert p["type"] in CURRENT_PANEL_TYPES, f"{p['title']}: {p['type']} is deprecated"
        assert p.get("title"), f"panel {p['id']} has a title"
        if p["type"] != "row":
            assert p.get("description"), f"{p['title']}: says what it answers"
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for cell in itertools.product(range(g["x"], g["x"] + g["w"]),
                                      range(g["y"], g["y"] + g["h"])):
            assert cell not in taken, f"{p['title']} overlaps {taken[cell]}"
            taken[cell] = p["title"]


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_datasource_is_the_variable_everywhere(uid: str) -> None:
    d = DASHBOARDS[uid]
    by_variable = {"type": "prometheus", "uid": "${datasource}"}
    ds = variables(d)["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    source, _ = provisioned(PROVISIONING)
    assert ds["current"]["value"] == source["uid"]
    for p in panels(d):
        if p["type"] in ("row", "text"):
            continue
        assert p["datasource"] == by_variable, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == by_variable, f"{p['title']} {t['refId']}"
    for v in variables(d).values():
        if v["type"] == "query":
            assert v["datasource"] == by_variable, v["name"]


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_every_variable_used_is_defined(uid: str) -> None:
    d = DASHBOARDS[uid]
    defined = set(variables(d)) | GRAFANA_BUILTINS
    used = {next(g for g in m.groups() if g) for s in strings(d) for m in VARIABLE.finditer(s)}
    assert used - defined == set()
    for name, v in variables(d).items():
        if v["type"] == "query":
            selector, _ = label_values_query(variable_query(v))
            earlier = list(variables(d))[:list(variables(d)).index(name)]
            refs = {next(g for g in m.groups() if g) for m in VARIABLE.finditer(selector)}
            assert refs <= set(earlier), f"{name} depends on variables defined before it"


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_queries_name_only_exported_or_recorded_metrics(uid: str) -> None:
    known = {m.name for m in metrics.ALL} | recorded_names() | set(SCRAPE_SERIES)
    d = DASHBOARDS[uid]
    exprs = [(p["title"], t["expr"]) for p, t in targets(d)]
    exprs += [(f"variable {v['name']}", label_values_query(variable_query(v))[0])
              for v in variables(d).values() if v["type"] == "query"]
    for where, expr in exprs:
        names = grafana_metric_names(expr)
        assert names, f"{where}: {expr} selects no metric"
        assert names <= known, f"{where}: unknown metrics {sorted(names - known)}"


def test_panels_read_the_recording_rules_instead_of_repeating_them() -> None:
    recorded = [(r["record"], normalized(str(r["expr"]))) for r in rules() if "record" in r]
    for uid, d in DASHBOARDS.items():
        for p, t in targets(d):
            for name, expr in recorded:
                assert expr not in normalized(t["expr"]), \
                    f"{uid} / {p['title']}: repeats the expression of {name}; read {name}"
    read = {n for d in DASHBOARDS.values() for _, t in targets(d)
            for n in grafana_metric_names(t["expr"])}
    assert read & recorded_names(), "the dashboards read the recording rules"


def test_links_point_at_dashboards_and_their_variables() -> None:
    followed = 0
    for uid, d in DASHBOARDS.items():
        for url in links(d):
            m = DASHBOARD_LINK.match(url)
            assert m, f"{uid}: {url} is not a link to a dashboard by uid"
            target = DASHBOARDS.get(m.group(1))
            assert target is not None, f"{uid}: {url} points at no dashboard"
            for key, _ in parse_qsl(m.group(2) or "", keep_blank_values=True):
                if key.startswith("var-"):
                    assert key[4:] in variables(target), f"{uid}: {url} sets {key}"
            followed += 1
    assert followed, "the dashboards link to each other"


def test_grid_cells_link_to_the_node_detail_of_their_host() -> None:
    (url,) = [link["url"] for link in grid_panel()["fieldConfig"]["defaults"]["links"]]
    path = urlsplit(url)
    assert path.path == "/d/gpuwatch-node"
    assert ("var-host", "${__data.fields.host}") in parse_qsl(path.query)


def test_dashboard_links_reach_every_dashboard_by_tag() -> None:
    for d in DASHBOARDS.values():
        assert any(link["type"] == "dashboards" and "gpuwatch" in link["tags"]
                   for link in d["links"])


def test_states_look_the_same_everywhere() -> None:
    """Grid, state timelines, counts and tables name and colour the states as
    gpuwatch.contract.states does (the CLI's grid uses the same colours)."""
    by_code = {str(s.code): {"text": s.name, "color": s.colour} for s in states.ALL}
    timelines = 0
    for d in DASHBOARDS.values():
        for p in panels(d):
            if any(states.STATE_CODE in t.get("expr", "") for t in p.get("targets", [])):
                options = p["fieldConfig"]["defaults"]["mappings"][0]["options"]
                assert {code: {"text": m["text"], "color": m["color"]}
                        for code, m in options.items()} == by_code, p["title"]
                timelines += 1
            for override in p.get("fieldConfig", {}).get("overrides", []):
                name = override["matcher"]["options"]
                for prop in override["properties"]:
                    if name in states.BY_NAME and prop["id"] == "color":
                        assert prop["value"]["fixedColor"] == states.BY_NAME[name].colour
                    if name == "state" and prop["id"] == "mappings":
                        cells = {v: m["color"] for v, m in prop["value"][0]["options"].items()}
                        assert cells == {s.name: s.colour for s in states.ALL}, p["title"]
    assert timelines >= 2, "the fleet and the node detail draw the state history"
    grid = grid_panel()["fieldConfig"]["defaults"]["mappings"]
    for state in states.ALL:
        for cell in (f"{state.name}: ", f"{state.name}: alice,bob"):
            shown = apply_mappings(grid, cell)
            assert shown is not None and shown["color"] == state.colour, cell


# -- provisioning and run-grafana --------------------------------------------------------------

@dataclass(frozen=True)
class FakeGrafana:
    """A Grafana laid out like its tarball (bin/, conf/defaults.ini) whose binary records how
    it was started instead of starting."""

    home: Path
    binary: Path
    record: Path

    @property
    def path(self) -> str:
        return f"{self.binary.parent}:{os.environ['PATH']}"

    def started(self) -> dict[str, Any]:
        return dict(json.loads(self.record.read_text()))


@pytest.fixture(params=["grafana", "grafana-server"])
def fake_grafana(request: pytest.FixtureRequest, tmp_path: Path) -> FakeGrafana:
    """`grafana` (Grafana 10 and later: `grafana server`) or `grafana-server` (before)."""
    home = tmp_path / "grafana-home"
    (home / "conf").mkdir(parents=True)
    (home / "conf" / "defaults.ini").write_text("")
    (home / "bin").mkdir()
    record = tmp_path / "started.json"
    binary = home / "bin" / request.param
    dump = ("import json, os, sys; "
            f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open('{record}', 'w'))")
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{dump}" "$@"\n')
    binary.chmod(0o755)
    return FakeGrafana(home, binary, record)


def run_grafana(path: str, tmp_path: Path, *args: str,
                **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("GPUWATCH_", "GF_", "GRAFANA_"))}
    return subprocess.run([str(RUN_GRAFANA), *args], capture_output=True, text=True,
                          env={**base, "PATH": path,
                               "GPUWATCH_GRAFANA_STATE": str(tmp_path / "state"), **env},
                          timeout=60, check=False)


def test_the_shipped_provisioning_works_as_it_is() -> None:
    """Copied unchanged into a stock Grafana: no value waits for an environment variable
    (Grafana expands $VAR and ${VAR} in provisioning files, an unset one to ""), and the
    provider reads an absolute directory that the guide's install commands fill with the
    dashboards (that the datasource is the one the dashboards ask for:
    test_datasource_is_the_variable_everywhere)."""
    for path in sorted(PROVISIONING.glob("*/*.yml")):
        assert "$" not in "".join(strings(yaml.safe_load(path.read_text()))), path
    source, provider = provisioned(PROVISIONING)
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "http://localhost:9090", "Prometheus' default address"
    folder = provider["options"]["path"]
    assert Path(folder).is_absolute()
    guide = (REPO / "docs" / "grafana.md").read_text()
    assert f"grafana/dashboards/*.json {folder}/" in guide, "the guide copies them there"
    assert f"grafana/dashboards:{folder}:ro" in guide, "the container mounts them there"


def test_run_grafana_starts_grafana_with_this_provisioning(fake_grafana: FakeGrafana,
                                                           tmp_path: Path) -> None:
    done = run_grafana(fake_grafana.path, tmp_path)
    assert done.returncode == 0, done.stderr
    started = fake_grafana.started()
    command = ["server"] if fake_grafana.binary.name == "grafana" else []
    assert started["argv"] == [*command, "--homepath", str(fake_grafana.home)]
    env = started["env"]
    assert env["GF_PATHS_PROVISIONING"] == str(tmp_path / "state" / "provisioning")
    assert env["GF_PATHS_DATA"].startswith(str(tmp_path / "state"))
    assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()

    source, provider = provisioned(Path(env["GF_PATHS_PROVISIONING"]))
    shipped_source, shipped_provider = provisioned(PROVISIONING)
    assert source == shipped_source, "the shipped datasource, Prometheus at its default"
    assert sorted(Path(provider["options"]["path"]).glob("*.json")) == DASHBOARD_FILES
    shipped_provider["options"]["path"] = provider["options"]["path"]
    assert provider == shipped_provider, "only the path changes"
    written = (tmp_path / "state/provisioning/datasources/gpuwatch.yml").read_text()
    assert written.count("\n#") == (PROVISIONING / "datasources/gpuwatch.yml").read_text() \
        .count("\n#"), "the comments stay"


@pytest.mark.parametrize("url", ["http://127.0.0.1:19090",
                                 'https://prom.example:9090/a|b&c\\d"e?x=1#f'])
def test_run_grafana_passes_the_prometheus_url_on(fake_grafana: FakeGrafana, tmp_path: Path,
                                                  url: str) -> None:
    done = run_grafana(fake_grafana.path, tmp_path, GPUWATCH_PROMETHEUS_URL=url)
    assert done.returncode == 0, done.stderr
    source, _ = provisioned(Path(fake_grafana.started()["env"]["GF_PATHS_PROVISIONING"]))
    assert source["url"] == url


def test_run_grafana_refuses_provisioning_it_cannot_set(fake_grafana: FakeGrafana,
                                                        tmp_path: Path) -> None:
    """A provisioning file without its `url:` line: a one-line error naming the file, and
    Grafana is not started with a datasource that has no address."""
    checkout = tmp_path / "checkout"
    shutil.copytree(GRAFANA, checkout / "grafana")
    broken = checkout / "grafana/provisioning/datasources/gpuwatch.yml"
    broken.write_text(broken.read_text().replace("    url: ", "    address: "))
    done = subprocess.run([str(checkout / "grafana/run-grafana")], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PATH": fake_grafana.path,
                               "GPUWATCH_GRAFANA_STATE": str(tmp_path / "state")})
    assert done.returncode == 5
    (line,) = done.stderr.splitlines()
    assert str(broken) in line and "url:" in line and "git checkout" in line
    assert not fake_grafana.record.exists()


def test_run_grafana_check_finds_grafana(fake_grafana: FakeGrafana, tmp_path: Path) -> None:
    done = run_grafana(fake_grafana.path, tmp_path, "--check")
    assert done.returncode == 0, done.stderr
    assert not fake_grafana.record.exists(), "--check starts nothing"


def test_run_grafana_needs_grafanas_home(fake_grafana: FakeGrafana, tmp_path: Path) -> None:
    (fake_grafana.home / "conf" / "defaults.ini").unlink()
    done = run_grafana(fake_grafana.path, tmp_path, GRAFANA_HOME=str(tmp_path / "nowhere"))
    assert done.returncode == 4
    assert "GRAFANA_HOME" in done.stderr
    assert not fake_grafana.record.exists()


def test_run_grafana_says_how_to_get_grafana_when_there_is_none(tmp_path: Path) -> None:
    bindir = tmp_path / "bin-without-grafana"
    bindir.mkdir()
    for tool in ("sh", "dirname", "cat", "readlink", "mkdir"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                               text=True, check=True).stdout.strip()
        (bindir / tool).symlink_to(found)
    for args in ((), ("--check",)):
        done = run_grafana(str(bindir), tmp_path, *args)
        assert done.returncode == 3
        assert "apt.grafana.com" in done.stderr and "grafana.com/grafana/download" in done.stderr


# -- every query against a real Prometheus -----------------------------------------------------

FLEET_NODES = [
    Node("ws-01", "workstation", {"cluster": "lab"}),
    Node("srv-01", "server", {"cluster": "dc", "rack": "r1"}),
    Node("a100-01", "lost-gpu", {"cluster": "dc", "rack": "r2"}),
]


def fleet_bookings() -> list[Reservation]:
    """A free GPU of srv-01 booked for frank, and a GPU carol works on booked for her."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return [Reservation("srv-01", (4,), "frank", now + dt.timedelta(days=2),
                        comment="camera-ready"),
            Reservation("srv-01", (0,), "carol", now + dt.timedelta(days=1))]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # The idle duration is 0 so erin's held-but-unused GPU is idle at once; every other
    # threshold is the rules' own.
    with Fleet(tmp_path_factory.mktemp("fleet"), FLEET_NODES,
               thresholds={IDLE_DURATION: 0},
               bookings=fleet_bookings()) as running:
        running.wait_for_rules()
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
        if e.state == states.RESERVED.name:  # who booked it, until when, why
            assert shown["text"] == f"reserved: {e.reservation}", where
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
    who holds or booked it, and no colour where a host has no GPU of that index."""
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
