"""The README's generated sections stay in step with their sources.

GPUWATCH_UPDATE_GOLDEN=1 rewrites them, like the golden exposition files.
"""

from __future__ import annotations

import os
import re

import pytest
from paths import REPO

from gpuwatch.contract import metrics
from gpuwatch.exporter.main import build_parser

README = REPO / "README.md"
UPDATE = os.environ.get("GPUWATCH_UPDATE_GOLDEN") == "1"


def check(name: str, body: str) -> None:
    pattern = re.compile(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", re.DOTALL)
    text = README.read_text()
    match = pattern.search(text)
    assert match, f"README.md has no {name} section"
    if UPDATE:
        text = text[: match.start(1)] + body + text[match.end(1):]
        README.write_text(text)
    assert README.read_text()[match.start(1):].startswith(body), \
        f"README.md's {name} section is stale: run with GPUWATCH_UPDATE_GOLDEN=1"


def test_metrics_reference_matches_the_definitions() -> None:
    check("metrics", metrics.reference_table() + "\n")


def test_every_metric_is_in_the_reference() -> None:
    text = README.read_text()
    for name in metrics.names():
        assert f"`{name}`" in text


def test_flags_match_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    check("flags", "```\n" + build_parser().format_usage() + "```\n")
