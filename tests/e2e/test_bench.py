"""`make bench` runs: its smoke mode prints a row for every node, every shipped scenario of
the scenario table (a MIG node among them, with its calls by GPU) and every target.

Timings depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tools.bench import LATENCY_NODES, NODES, SCENARIOS


def test_quick_bench_prints_every_node_and_target() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench", "--quick"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^load average at the start: \d+\.\d+ ", done.stdout, re.MULTILINE)
    assert re.search(r"^load average at the end: \d+\.\d+ ", done.stdout, re.MULTILINE)
    scrape_cost, rest = done.stdout.split("Scenarios:", 1)
    scenarios, rest = rest.split("Concurrency:", 1)
    concurrency, targets = rest.split("Targets:", 1)
    number = r"\s+\d+(\.\d+)?"
    for gpus, processes in NODES:
        # GPUs, processes, samples, scrapes, median, p99, CPU, exposition, RSS, NVML calls/GPU
        row = rf"^\s*{gpus}\s+{processes}{number * 8}$"
        assert re.search(row, scrape_cost, re.MULTILINE), f"no row for {gpus}x{processes}"
    assert "mig" in SCENARIOS
    for name in SCENARIOS:
        # scenario, GPUs, slices, samples, scrapes, median, p99, CPU, RSS, NVML calls/GPU
        row = rf"^\s*{name}\s+\d+\s+\d+{number * 7}$"
        assert re.search(row, scenarios, re.MULTILINE), f"no row for scenario {name}"
    # the MIG node's GPUs apart: a MIG GPU's slices cost calls of their own
    mig_gpus = re.findall(
        r"^\s+GPU \d+ \((MIG, (\d+) slices|no MIG)\): (\d+) \(first scrape \d+\)$",
        scenarios, re.MULTILINE)
    plain = {int(calls) for kind, _, calls in mig_gpus if kind == "no MIG"}
    assert len(plain) == 1, mig_gpus
    sliced = [(int(slices), int(calls)) for kind, slices, calls in mig_gpus if slices]
    assert sliced and all(slices and calls > min(plain) for slices, calls in sliced), mig_gpus
    for gpus, processes in LATENCY_NODES:
        # GPUs, processes, scrapes, slowest GPU, all GPUs, NVML done, wall, p99 wall,
        # exposition, wall/slowest
        row = rf"^\s*{gpus}\s+{processes}{number * 7}\s+\d+\.\d+x$"
        assert re.search(row, concurrency, re.MULTILINE), f"no row for {gpus}x{processes}"
    for target in ("CPU per scrape", "NVML calls per GPU per scrape", "peak RSS",
                   "wall / slowest"):
        assert re.search(rf"{target}.*: (met|MISSED)$", targets, re.MULTILINE), target
