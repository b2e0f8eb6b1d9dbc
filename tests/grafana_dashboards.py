"""The shipped dashboards as the dashboard tests read them (tests/unit/test_grafana_files.py,
tests/e2e/test_grafana.py), and what Grafana shows for a value."""

from __future__ import annotations

import re
from typing import Any

from paths import REPO

from tools.dashboards import load_all, panels

GRAFANA = REPO / "grafana"
DASHBOARDS = load_all(GRAFANA / "dashboards")
"""Every dashboard, by uid."""


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
