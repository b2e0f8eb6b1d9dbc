"""The fleet benchmark runs: its smoke mode (one small fleet, 1 s intervals) prints every figure,
every rule group and every dashboard query, and stops everything it started.

Timings depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tools import dashboards, localstack


def test_quick_fleet_bench_prints_every_figure(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench_fleet", "--quick",
                           "--json", str(figures)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("active series (head)", "series per GPU", "per process", "Prometheus memory",
                 "scrape duration", "grid query", "gpuwatch status"):
        assert re.search(rf"^\s+{re.escape(line)}\s+\S", out, re.MULTILINE), line
    groups = [g["name"] for path in localstack.rule_files()
              for g in localstack.load_rules(path)["groups"]]
    for group in groups:
        assert re.search(rf"^\s+{group}\s+\d", out, re.MULTILINE), group
    queries = [(uid, panel["title"], target["refId"])
               for uid, d in dashboards.load_all().items()
               for panel, target in dashboards.targets(d)]
    for uid, title, ref in queries:
        assert f"{uid.removeprefix('gpuwatch-')}: {title} {ref}"[:62] in out, (uid, title)
    (run,) = json.loads(figures.read_text())
    assert run["gpus"] == 16 and run["status_gpus"] == 16
    assert len(run["queries"]) == len(queries)
    assert set(run["rule_groups"]) == set(groups)
    assert "Sizing" in out
