"""grafana/ as files: the dashboards (uids, datasource, panel types, layout, variables, links,
the metric names their queries read, the guide that explains them) and the provisioning, with
run-grafana started on a stand-in Grafana. Grafana itself cannot be installed here;
tests/unit/test_grafana_schema.py checks the dashboards against Grafana's own schema, and
tests/e2e/test_grafana.py runs every query against a real Prometheus.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from grafana_dashboards import DASHBOARDS, GRAFANA, apply_mappings, grid_panel
from grafana_provisioning import provisioned
from paths import REPO
from prom_harness import recorded_names, rules
from promql import grafana_metric_names

from gpuwatch.cells import Cell
from gpuwatch.contract import metrics, states
from gpuwatch.contract.prometheus import SCRAPE_SERIES
from tools.dashboards import (
    VARIABLE,
    label_values_query,
    load,
    panels,
    targets,
    variable_query,
    variables,
)

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
            coloured = [o["matcher"]["options"] for o in p.get("fieldConfig", {})
                        .get("overrides", []) if o["matcher"]["options"] in states.BY_NAME]
            if coloured:  # a panel with a series per state colours every state
                assert coloured == [s.name for s in states.ALL], p["title"]
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
            assert shown["text"].startswith(state.name) or "alice" in shown["text"], cell
            # a MIG slice's cell: the same state, the profile first
            for profile in ("1g.10gb", "1g.10gb+me"):
                on_slice = apply_mappings(grid, f"{profile} {cell}")
                assert on_slice is not None, f"{profile} {cell}"
                assert on_slice["color"] == state.colour, f"{profile} {cell}"
                assert on_slice["text"] == f"{profile} {shown['text']}", f"{profile} {cell}"


_GRID_BRANCH = re.compile(r'label_join\(\S+\{state(=~|!~|!=|=)"([^"]*)"[^}]*\}, "cell", ": ", '
                          r'"state", "(\w+)"\)')


def test_the_grid_writes_every_state_with_who_holds_booked_or_claimed_it() -> None:
    """Each state's cell comes from one branch of the grid's query: a reserved GPU's text is its
    booking, a claimed one's its claim, any other's its users."""
    (target,) = grid_panel()["targets"]
    branches = _GRID_BRANCH.findall(target["expr"])
    assert branches and len(branches) == target["expr"].count('"cell", ": "'), target["expr"]
    text = {states.RESERVED.name: "reservation", states.CLAIMED.name: "claim"}
    for state in states.ALL:
        taken = [label for op, value, label in branches
                 if op.startswith("=") == (re.fullmatch(value, state.name) is not None)]
        assert taken == [text.get(state.name, "users")], state.name


def test_the_grid_starts_a_slices_cell_with_its_profile() -> None:
    """The text every branch writes gets the cell's profile in front of it (a whole GPU has
    none, and keeps its text), the profile the records carry for a MIG slice. Through a
    label of its own: VictoriaMetrics' label_join cannot read the label it writes unless it
    is the first it joins."""
    (target,) = grid_panel()["targets"]
    expr = normalized(target["expr"])
    prefix = normalized('label_replace(label_replace(label_join(')
    suffix = normalized(', "cell_text", " ", "profile", "cell"), "cell", "$1", "cell_text", '
                        '" ?(.*)"), "cell_text", "", "", "")')
    assert expr.startswith(prefix) and expr.endswith(suffix), target["expr"]


def test_the_grid_places_every_gpu_and_its_slices_after_it() -> None:
    """The grid's columns in cell order (tools' Cell.sort_key): GPU 0, its slices 0/0 to
    0/14 (the GPU instance ids NVML gives), GPU 1, ... for up to 16 GPUs a host."""
    (organize,) = [t["options"] for t in grid_panel()["transformations"]
                   if t["id"] == "organize"]
    placed = sorted(organize["indexByName"].items(), key=lambda item: item[1])
    assert placed[0] == ("host\\gpu", 0)
    names = [name for name, _ in placed[1:]]
    cells = [Cell.parse(name) for name in names]
    assert names == [str(c) for c in cells], "each column is a cell's name"
    assert cells == sorted(cells, key=Cell.sort_key)
    assert set(cells) == {Cell(g, i) for g in range(16) for i in (None, *range(15))}
    assert [index for _, index in placed] == list(range(len(placed)))


SLICE_SERIES = {m.name for m in metrics.ALL if metrics.MIG_PROCESS_LABEL in m.labels} | {
    m.name for m in (metrics.PROCESS_MEMORY, metrics.PROCESS_START, metrics.USER_MEMORY,
                     metrics.USER_PROCESSES)}
"""The series a MIG slice's figures come in: gpu is the parent's, gpu_instance_id the slice."""

_AS_CELL = (r'label_replace\(label_join\((?:topk by \(instance, gpu, gpu_instance_id\) \(1, )?'
            r'(?P<selector>(?P<name>[a-z_:]+)(?:\{{[^}}]*\}})?)\)?, "gpu", "/", "gpu", '
            r'"gpu_instance_id"\), "gpu", "\$1", "gpu", "\(\.\*\)/"\)')


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_slice_series_are_read_as_cells(uid: str) -> None:
    """Every query reading a series that a MIG slice's figures come in turns it into the
    slice's cell first (gpu="0/7", as the records have it; the contract's label_replace of
    label_join), so that joins on (instance, gpu) with the records find the slices instead of
    dropping them, and a table shows the slice, not its parent."""
    as_cell = re.compile(_AS_CELL.format())
    checked = 0
    for panel, target in targets(DASHBOARDS[uid]):
        expr = target["expr"]
        wrapped = [m.start("selector") for m in as_cell.finditer(expr)
                   if m.group("name") in SLICE_SERIES]
        reads = [m.start() for m in re.finditer(r"(?<![\w:])([a-z_:]+)(?=[{\s),]|$)", expr)
                 if m.group(1) in SLICE_SERIES]
        assert reads == wrapped, f"{panel['title']} {target['refId']}: {expr}"
        checked += len(reads)
    if uid in ("gpuwatch-fleet", "gpuwatch-node", "gpuwatch-users"):
        assert checked, f"{uid} reads slice series"


def test_the_node_dashboards_gpu_is_a_physical_gpu() -> None:
    """The gpu variable lists the node's GPUs as NVML numbers them (a MIG-enabled GPU too,
    whose own panels it selects), and a cell record's panel takes the slices of the GPUs
    chosen (gpu 0: 0, 0/7, 0/8...)."""
    node = DASHBOARDS["gpuwatch-node"]
    selector, label = label_values_query(variable_query(variables(node)["gpu"]))
    assert (selector, label) == (f'{metrics.UP.name}{{host="$host"}}', "gpu")
    assert variables(node)["gpu"]["sort"] == 3, "numerically: 2 before 10"
    for panel, target in targets(node):
        if "instance_gpu:" in target["expr"] and 'gpu=~"' in target["expr"]:
            for found in re.findall(r'instance_gpu:\w+:\w+\{[^}]*gpu=~"([^"]*)"', target["expr"]):
                assert found == "($gpu)(/.*)?", panel["title"]


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
