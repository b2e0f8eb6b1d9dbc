"""The Grafana dashboards as data: their panels, queries and variables, and the queries as
Grafana would send them (variables replaced by the values Grafana gives them).

tests/e2e/test_grafana.py runs every panel query against a Prometheus fed by simulated exporters;
the fleet benchmark (tools.bench_fleet) times the same queries at scale. Both read the
dashboards from grafana/dashboards/ of the checkout through this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

SOURCE_DIR = Path(__file__).resolve().parents[1] / "grafana" / "dashboards"
"""grafana/dashboards/ of the checkout these tools run from."""

VARIABLE = re.compile(r"\$([a-zA-Z_]\w*)|\$\{([a-zA-Z_]\w*)(?:[.:][^}]*)?\}|\[\[(\w+)\]\]")
"""$var, ${var}, ${var:format}, ${__data.fields.x} and the old [[var]]; not a regex's $1."""

Dashboard = dict[str, Any]


def load(path: Path) -> Dashboard:
    return dict(json.loads(path.read_text()))


def load_all(source: Path = SOURCE_DIR) -> dict[str, Dashboard]:
    """Every dashboard file, by file name without .json (its uid), in name order. A folder
    without dashboards is an error, not an empty answer: the tools run from a checkout."""
    found = {path.stem: load(path) for path in sorted(source.glob("*.json"))}
    if not found:
        raise FileNotFoundError(f"{source}: no dashboards (*.json) here; run this from a "
                                "checkout of the gpuwatch repository")
    return found


def panels(dashboard: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: Dashboard) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, query) for every query a panel runs (hidden ones are not run)."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr") and not target.get("hide"):
                yield panel, target


def variables(dashboard: Dashboard) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query", "") if isinstance(query, dict) else query)


def label_values_query(query: str) -> tuple[str, str]:
    """label_values(SELECTOR, LABEL) -> (SELECTOR, LABEL); ValueError for anything else."""
    m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
    if m is None:
        raise ValueError(f"{query!r}: variable queries are label_values(selector, label)")
    return m.group(1), m.group(2)


def expand(text: str, values: Mapping[str, str]) -> str:
    """`text` with every variable replaced by its value (KeyError for an unknown one)."""
    return VARIABLE.sub(lambda m: values[next(g for g in m.groups() if g)], text)


def grafana_values(interval_seconds: float, range_seconds: float = 3600) -> dict[str, str]:
    """Grafana's own variables for a time range drawn at one point per `interval_seconds`
    ($__rate_interval as Grafana computes it with the scrape interval as the minimum step:
    four scrape intervals)."""
    return {"__range": f"{range_seconds:g}s", "__range_s": f"{range_seconds:g}",
            "__range_ms": f"{range_seconds * 1000:g}",
            "__interval": f"{interval_seconds:g}s",
            "__interval_ms": f"{interval_seconds * 1000:g}",
            "__rate_interval": f"{4 * interval_seconds:g}s"}


def resolve_variables(dashboard: Dashboard, label_values: Callable[[str, str], list[str]],
                      builtins: Mapping[str, str], each_value: bool = True
                      ) -> list[dict[str, str]]:
    """Every assignment Grafana offers: multi-value variables at All, single ones at each
    value their query finds (in order, each seeing the ones before); without `each_value`,
    single ones at their first value only (what a dashboard shows when it opens).

    `label_values(label, selector)` asks Prometheus; ValueError when a variable finds none.
    """
    assignments = [dict(builtins)]
    for name, v in variables(dashboard).items():
        if v["type"] != "query":
            continue
        following = []
        for values in assignments:
            selector, label = label_values_query(variable_query(v))
            found = label_values(label, expand(selector, values))
            if not found:
                raise ValueError(f"{dashboard.get('uid')}: variable {name} finds no values")
            if v.get("includeAll"):
                following.append({**values, name: v["allValue"]})
            else:
                following.extend({**values, name: value}
                                 for value in (found if each_value else found[:1]))
        assignments = following
    return assignments
