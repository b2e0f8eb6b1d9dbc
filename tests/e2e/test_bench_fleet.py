"""The fleet benchmark runs: its smoke mode (one small fleet, 1 s intervals) prints every figure,
every rule group and every dashboard query, the MIG node beside the fleet, and stops everything
it started.

Timings depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from gpuwatch.contract import metrics
from gpuwatch.sim import load_scenario
from tools import dashboards, localstack
from tools.bench_fleet import MIG_SCENARIO


def test_quick_fleet_bench_prints_every_figure(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench_fleet", "--quick",
                           "--json", str(figures)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("active series (head)", "series per GPU", "per process", "Prometheus memory",
                 "scrape duration", "grid query", "gpuwatch status", "MIG node",
                 "served by its exporter"):
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
    mig = load_scenario(MIG_SCENARIO)
    assert run["gpus"] == 16 and run["mig_gpus"] == len(mig.gpus)
    assert run["status_gpus"] >= 16 + len(mig.gpus)  # the MIG node's slices may be listed too
    # the MIG node's series are its own: its slices' series, none in the fleet's per GPU
    by_name = run["mig_series_by_name"]
    assert run["mig_slices"] == by_name[metrics.MIG_INFO.name] > 0
    assert by_name[metrics.MIG_MEMORY_TOTAL.name] > 0
    assert 0 < run["mig_series"] < sum(by_name.values())  # its processes and users apart
    assert 0 < run["series_per_gpu"] < run["mig_series"] / len(mig.gpus)
    assert len(run["queries"]) == len(queries)
    assert set(run["rule_groups"]) == set(groups)
    assert "Sizing" in out
