"""`make bench` runs: its smoke mode prints a row for every node and every target.

Timings depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tools.bench import LATENCY_NODES, NODES


def test_quick_bench_prints_every_node_and_target() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench", "--quick"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    scrape_cost, rest = done.stdout.split("Concurrency:", 1)
    concurrency, targets = rest.split("Targets:", 1)
    number = r"\s+\d+(\.\d+)?"
    for gpus, processes in NODES:
        # GPUs, processes, samples, scrapes, median, p99, CPU, exposition, RSS, NVML calls/GPU
        row = rf"^\s*{gpus}\s+{processes}{number * 8}$"
        assert re.search(row, scrape_cost, re.MULTILINE), f"no row for {gpus}x{processes}"
    for gpus, processes in LATENCY_NODES:
        # GPUs, processes, scrapes, slowest GPU, all GPUs, NVML done, wall, p99 wall,
        # exposition, wall/slowest
        row = rf"^\s*{gpus}\s+{processes}{number * 7}\s+\d+\.\d+x$"
        assert re.search(row, concurrency, re.MULTILINE), f"no row for {gpus}x{processes}"
    for target in ("CPU per scrape", "NVML calls per GPU per scrape", "peak RSS",
                   "wall / slowest"):
        assert re.search(rf"{target}.*: (met|MISSED)$", targets, re.MULTILINE), target
