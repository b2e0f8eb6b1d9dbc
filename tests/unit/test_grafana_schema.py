"""The dashboards against Grafana's own schema.

Grafana is in no registry this project can reach, so it cannot be started here. Its schema
can: grafana-foundation-sdk (Grafana Labs' SDK, generated from the CUE schemas of Grafana's
dashboards, panels and datasource queries) is on PyPI, pinned in pyproject.toml to the build
for one Grafana release. Grafana ignores a field it does not know and draws a panel with its
defaults instead, so a misspelt option or an option a release renamed shows as a wrong
picture, never as an error; these tests turn both into failures:

- every key of a dashboard is a field of Grafana's schema at its place: the dashboard, each
  panel, its `options` and `fieldConfig.defaults.custom` (the panel plugin's own schema), each
  Prometheus query, each variable;
- every value of an enumerated field (legend placement, draw style, colour mode, ...) is one
  the schema allows;
- every panel type has a schema there, so it is a core panel of that release.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools import dashboards

sdk = pytest.importorskip("grafana_foundation_sdk", reason="needs Python 3.11 (pyproject.toml)")

from grafana_foundation_sdk.cog import runtime  # noqa: E402
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402
from grafana_foundation_sdk.cog.plugins import register_default_plugins  # noqa: E402
from grafana_foundation_sdk.models.dashboard import Dashboard  # noqa: E402

register_default_plugins()

GRAFANA_VERSION = "11.6"
"""The Grafana release of the pinned SDK build (pyproject.toml: grafana-foundation-sdk)."""

OUTSIDE_THE_SCHEMA = {
    "definition": "a query variable's query as its editor shows it: Grafana's variable editor "
                  "writes it and reads it back, the CUE schema leaves it out",
}
"""Keys Grafana itself writes into dashboards that its schema does not declare."""

DASHBOARDS = dashboards.load_all()


def unknown_keys(written: Any, parsed: Any, path: str = "") -> Iterator[str]:
    """Paths of `written` that Grafana's schema dropped when it parsed the dashboard (a key it
    does not know) or whose value it changed."""
    if isinstance(written, dict):
        for key, value in written.items():
            here = f"{path}.{key}"
            if key in OUTSIDE_THE_SCHEMA or value is None:
                continue
            if not isinstance(parsed, dict) or key not in parsed:
                yield f"{here}: Grafana {GRAFANA_VERSION} has no field {key!r} here"
            else:
                yield from unknown_keys(value, parsed[key], here)
    elif isinstance(written, list):
        if not isinstance(parsed, list) or len(parsed) != len(written):
            yield f"{path}: not read back as a list of {len(written)}"
            return
        for i, (w, p) in enumerate(zip(written, parsed, strict=True)):
            yield from unknown_keys(w, p, f"{path}[{i}]")
    elif written != parsed:
        yield f"{path}: {written!r} read back as {parsed!r}"


def allowed_values(annotation: Any) -> set[Any] | None:
    """The values an enumerated field takes (an Enum or a Literal, optional or not); None for
    any other field."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {member.value for member in annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        values: set[Any] = set()
        for arm in typing.get_args(annotation):
            if arm is type(None):
                continue
            found = allowed_values(arm)
            if found is None:
                return None
            values |= found
        return values
    return None


def bad_enum_values(node: Any, path: str = "") -> Iterator[str]:
    """Every enumerated field of the parsed dashboard whose value the schema does not list."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from bad_enum_values(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from bad_enum_values(item, f"{path}.{key}")
    elif callable(getattr(node, "to_json", None)) and hasattr(node, "__dict__"):
        hints = typing.get_type_hints(type(node))
        for name, value in vars(node).items():
            allowed = allowed_values(hints.get(name))
            if value is not None and allowed is not None and value not in allowed:
                yield (f"{path}.{name}: {value!r} is not one of {sorted(map(str, allowed))} "
                       f"({type(node).__name__}, Grafana {GRAFANA_VERSION})")
            yield from bad_enum_values(value, f"{path}.{name}")


def schema_problems(written: dict[str, Any]) -> list[str]:
    parsed = Dashboard.from_json(written)
    read_back = json.loads(json.dumps(parsed, cls=JSONEncoder))
    problems = list(unknown_keys(written, read_back)) + list(bad_enum_values(parsed))
    for panel in dashboards.panels(written):
        if panel["type"] != "row" and runtime.panelcfg_config(panel["type"]) is None:
            problems.append(f"panel {panel.get('title')!r}: Grafana {GRAFANA_VERSION} has no "
                            f"core panel {panel['type']!r}")
    return problems


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_follows_grafanas_schema(uid: str) -> None:
    assert schema_problems(DASHBOARDS[uid]) == []


def first_panel(dashboard: dict[str, Any], panel_type: str) -> dict[str, Any]:
    return next(p for p in dashboards.panels(dashboard) if p["type"] == panel_type)


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda d: first_panel(d, "timeseries")["options"]["legend"].update(placment="right"),
     ".legend.placment: Grafana 11.6 has no field 'placment' here"),
    (lambda d: first_panel(d, "timeseries")["options"]["legend"].update(placement="left"),
     ".placement: 'left' is not one of ['bottom', 'right']"),
    (lambda d: first_panel(d, "timeseries")["fieldConfig"]["defaults"]["custom"]
     .update(drawStyle="lines"), ".draw_style: 'lines' is not one of"),
    (lambda d: first_panel(d, "timeseries")["targets"][0].update(legend="{{host}}"),
     ".legend: Grafana 11.6 has no field 'legend' here"),
    (lambda d: first_panel(d, "timeseries").update(type="graph"),
     "has no core panel 'graph'"),
], ids=["misspelt-option", "enum-value", "custom-field-config", "query-field", "old-panel"])
def test_the_schema_check_finds_what_grafana_would_ignore(damage: Any, expected: str) -> None:
    dashboard = json.loads(json.dumps(DASHBOARDS["gpuwatch-usage"]))
    assert schema_problems(dashboard) == []
    damage(dashboard)
    problems = schema_problems(dashboard)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_folder_without_dashboards_is_an_error_not_an_empty_answer(
        tmp_path: Path, folder: str) -> None:
    """From an installed wheel (no grafana/ beside the code) the reader says where it looked
    and what to do, instead of answering {} and letting every check pass on nothing."""
    source = tmp_path / folder
    if folder == "empty":
        source.mkdir()
        (source / "README.md").write_text("not a dashboard")
    with pytest.raises(FileNotFoundError) as raised:
        dashboards.load_all(source)
    (line,) = str(raised.value).splitlines()
    assert line == f"{source}: no dashboards (*.json) here; run this from a checkout of the " \
        "gpuwatch repository"


def test_the_checkouts_dashboards_are_found() -> None:
    assert set(DASHBOARDS) == {p.stem for p in dashboards.SOURCE_DIR.glob("*.json")} != set()


# -- the fleet dashboard names GPUs as `gpuwatch status` does -----------------------------------

def test_fleet_dashboard_shows_display_names_not_nvml_names() -> None:
    """The short names (display_name of nvidia_gpu_info: the exporter's --config.file, else
    the NVML name without vendor words) wherever the fleet dashboard names a model; the
    queries keep the model label (the Model variable filters on it)."""
    fleet = DASHBOARDS["gpuwatch-fleet"]
    shown = 0
    for panel in dashboards.panels(fleet):
        for target in panel.get("targets", []):
            if target.get("legendFormat") in ("{{model}}", "{{display_name}}"):
                assert target["legendFormat"] == "{{display_name}}", panel["title"]
                assert "display_name" in target["expr"], panel["title"]
                shown += 1
        if panel["type"] != "table":
            continue
        for step in panel.get("transformations", []):
            options = step["options"]
            placed = options.get("indexByName", {})
            if step["id"] == "organize" and ("model" in placed or "display_name" in placed):
                assert options["renameByName"].get("display_name") == "model", panel["title"]
                assert options["excludeByName"].get("model") is True, panel["title"]
                assert all("group_left (display_name)" in t["expr"] for t in panel["targets"])
                shown += 1
    assert shown == 3, "Free GPUs per model, Who holds GPUs now, Idle-held GPUs"
