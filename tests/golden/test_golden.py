"""The whole /metrics page of every shipped scenario, byte for byte.

Rewrite the files after an intended change with GPUWATCH_UPDATE_GOLDEN=1 and read the diff.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from paths import GOLDEN
from simnode import build

from gpuwatch.sim import scenario_names

UPDATE = os.environ.get("GPUWATCH_UPDATE_GOLDEN") == "1"


def exposition(name: str) -> str:
    node = build(name)
    try:
        return node.text()
    finally:
        node.close()


@pytest.mark.parametrize("name", scenario_names())
def test_exposition_matches_golden_file(name: str) -> None:
    path = GOLDEN / f"{name}.prom"
    text = exposition(name)
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"no golden file for {name}: run with GPUWATCH_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_a_scrape_is_reproducible() -> None:
    assert exposition("server") == exposition("server")


@pytest.mark.parametrize("name", scenario_names())
def test_golden_file_passes_promtool_lint(promtool: str, name: str) -> None:
    path = GOLDEN / f"{name}.prom"
    result = subprocess.run([promtool, "check", "metrics"], input=path.read_bytes(),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
