"""Past one Prometheus: Prometheus remote_writes to VictoriaMetrics, and the grid reads from it.

Simulated exporters and Debian's Prometheus run this repository's configuration and rules
(tests/prom_harness.py, 1 s intervals) with a remote_write block to a VictoriaMetrics (Debian's
victoria-metrics, scripts/ensure-victoria-metrics) on 127.0.0.1, with its data in a
temporary directory. The recording rules stay in Prometheus (docs/scale.md says why):
VictoriaMetrics evaluates nothing, so every recorded series it answers with was forwarded.

`gpuwatch status --prometheus <VictoriaMetrics URL>` must show the same grid, and the same
JSON, as against Prometheus: while every node answers, and after one node stops (its GPUs
down, kept by the inventory rule's memory of them). The GPUs do no work (load 0), so
nothing shown moves between two scrapes and the two answers can be compared exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prom_harness import Fleet, Node

from gpuwatch.contract import states
from gpuwatch.fleet.prometheus import Prometheus
from tools import dashboards, localstack

LATENCY_OFFSET = "1s"
"""VictoriaMetrics' -search.latencyOffset: how old a sample must be before queries see it
(30 s by default; docs/scale.md)."""
REMOTE_WRITE_QUEUE = {"batch_send_deadline": "1s", "min_backoff": "100ms"}

# Static nodes: load 0 keeps utilisation, temperature and power still; the held GPUs stay
# busy (the idle duration, 30 minutes, is far away); one GPU is lost.
NODES = {
    "vm-a": """
description: four GPUs, still
gpu_defaults: {load: 0}
gpus:
  - {}
  - processes: [{pid: 4101, user: alice, command: python, memory_gib: 20}]
  - processes: [{pid: 4102, user: bob, memory_gib: 8}, {pid: 4103, user: carol, memory_gib: 8}]
  - lost: true
""",
    "vm-b": """
description: two GPUs, still
gpu_defaults: {name: NVIDIA H100 80GB HBM3, load: 0}
gpus:
  - processes: [{pid: 5101, user: dave, command: torchrun, memory_gib: 70}]
  - {}
""",
    "vm-c": """
description: two GPUs, still, on a node that stops answering
gpu_defaults: {name: NVIDIA GeForce RTX 3090, memory_gib: 24, load: 0, ecc: false}
gpus:
  - processes: [{pid: 6101, user: erin, memory_gib: 2}]
  - {}
""",
}
STOPPED = "vm-c"
CLUSTERS = {"vm-a": "dc", "vm-b": "dc", "vm-c": "lab"}


def victoria_metrics(data_dir: Path, port: int, log: Path) -> localstack.Service:
    binary = shutil.which("victoria-metrics")
    assert binary, "victoria-metrics is missing: run `make test`, which installs it " \
        "(scripts/ensure-victoria-metrics)"
    return localstack.Service(
        f"victoria-metrics on port {port}",
        [binary, f"-storageDataPath={data_dir}", f"-httpListenAddr={localstack.LOCALHOST}:{port}",
         "-retentionPeriod=1d", f"-search.latencyOffset={LATENCY_OFFSET}",
         "-loggerLevel=WARN"],
        f"http://{localstack.LOCALHOST}:{port}/health", log)


def with_remote_write(config: Path, url: str) -> None:
    """Adds a remote_write block to a rendered prometheus.yml, as the Ansible role does with
    gpuwatch_prometheus_remote_write (through the filter's remote_write_block)."""
    doc = yaml.safe_load(config.read_text())
    block = {"url": url, "queue_config": REMOTE_WRITE_QUEUE}
    doc["remote_write"] = [localstack.prometheus_config_plugin().remote_write_block(block)]
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


@dataclass
class Stack:
    fleet: Fleet
    victoria_metrics: Prometheus

    @property
    def prometheus(self) -> Prometheus:
        return self.fleet.api

    @property
    def gpus(self) -> int:
        return sum(len(node.scenario.gpus) for node in self.fleet.nodes)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("victoriametrics")
    with ExitStack() as stop:
        vm_port = localstack.free_port()
        vm = victoria_metrics(workdir / "vm-data", vm_port, workdir / "victoria-metrics.log")
        vm.start()
        stop.callback(vm.stop)
        vm_url = f"http://{localstack.LOCALHOST}:{vm_port}"
        nodes = []
        for host, scenario in NODES.items():
            path = workdir / f"{host}.yaml"
            path.write_text(scenario)
            nodes.append(Node(host, str(path), {"cluster": CLUSTERS[host]}))

        def remote_write(config: Path) -> None:
            with_remote_write(config, f"{vm_url}/api/v1/write")
            check = subprocess.run(["promtool", "check", "config", str(config)],
                                   capture_output=True, text=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr

        fleet = stop.enter_context(Fleet(workdir / "fleet", nodes,
                                         prometheus_config=remote_write))
        yield Stack(fleet, Prometheus(vm_url))


def status(server: Prometheus, *extra: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gpuwatch.cli", "--prometheus", server.url,
                           "status", "--color=never", *extra],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def grids(stack: Stack) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """(text, JSON) of `gpuwatch status` against Prometheus, then against VictoriaMetrics."""
    def both(server: Prometheus) -> tuple[str, Any]:
        return status(server), json.loads(status(server, "--json"))
    return both(stack.prometheus), both(stack.victoria_metrics)


def same(pair: tuple[tuple[str, Any], tuple[str, Any]]) -> bool:
    (text, rows), (vm_text, vm_rows) = pair
    return text == vm_text and comparable(rows) == comparable(vm_rows)


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, with Unix times to 10 ms: VictoriaMetrics keeps 12 significant digits."""
    return [{k: round(v, 2) if k.endswith("_since") and isinstance(v, float) else v
             for k, v in row.items()} for row in rows]


def states_of(rows: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    return {(row["host"], row["gpu"]): row["state"] for row in rows}


# -- the tests -------------------------------------------------------------------------------

def test_recorded_series_reach_victoriametrics_from_prometheus(stack: Stack) -> None:
    count = f"count({states.STATE_INFO})"
    wait_for = stack.fleet.wait_for
    wait_for("every GPU's state in Prometheus", lambda: stack.prometheus.query_value(count),
             lambda n: n == stack.gpus)
    wait_for("every GPU's state in VictoriaMetrics",
             lambda: stack.victoria_metrics.query_value(count), lambda n: n == stack.gpus)
    recorded = '{__name__=~"[a-z_]+:.+"}'
    names = {s.labels["__name__"] for s in stack.prometheus.query(recorded)}
    assert states.STATE_INFO in names and states.STATE_CODE in names
    forwarded = wait_for(
        "every recorded series in VictoriaMetrics",
        lambda: {s.labels["__name__"] for s in stack.victoria_metrics.query(recorded)},
        lambda got: names <= got)
    assert forwarded == names, "VictoriaMetrics records nothing of its own"


def test_status_shows_the_same_grid_from_victoriametrics(stack: Stack) -> None:
    pair = stack.fleet.wait_for("the same grid from both", lambda: grids(stack), same)
    (text, rows), _ = pair
    assert len(rows) == stack.gpus
    assert set(states_of(rows).values()) == {"free", "busy", "down"}
    assert states_of(rows) == {key: gpu.state for key, gpu in stack.fleet.expected().items()}
    assert "alice" in text and "bob,carol" in text
    print(text)


def test_every_dashboard_query_answers_the_same_series_from_victoriametrics(
        stack: Stack) -> None:
    """Grafana pointed at VictoriaMetrics: every panel query (variables as Grafana fills them
    when a dashboard opens) finds the series it finds in Prometheus. Values are not compared:
    MetricsQL's increase() does not extrapolate as PromQL's does."""
    stack.fleet.wait_for("the same grid from both", lambda: grids(stack), same)
    differ = []
    for uid, dashboard in dashboards.load_all().items():
        values = dashboards.resolve_variables(dashboard, stack.victoria_metrics.label_values,
                                              dashboards.grafana_values(1.0, 60.0),
                                              each_value=False)[0]
        for panel, target in dashboards.targets(dashboard):
            expr = dashboards.expand(target["expr"], values)
            if series(stack.prometheus, expr) != series(stack.victoria_metrics, expr):
                differ.append(f"{uid}: {panel['title']} {target['refId']}: {expr}")
    assert differ == [], "\n".join(differ)


def series(server: Prometheus, expr: str) -> list[list[tuple[str, str]]]:
    return sorted(sorted(s.labels.items()) for s in server.query(expr))


def test_a_node_that_stops_is_down_in_both(stack: Stack) -> None:
    stack.fleet.node(STOPPED).stop()
    stopped = sum(1 for line in NODES[STOPPED].splitlines() if line.startswith("  - "))

    def down_everywhere(pair: tuple[tuple[str, Any], tuple[str, Any]]) -> bool:
        (_, rows), _ = pair
        gone = [s for (host, _), s in states_of(rows).items() if host == STOPPED]
        return gone == ["down"] * stopped and same(pair)

    (text, rows), _ = stack.fleet.wait_for(f"{STOPPED}'s GPUs down in both",
                                           lambda: grids(stack), down_everywhere)
    assert len(rows) == stack.gpus, "the stopped node's GPUs stay in the grid"
    assert states_of(rows) == {key: gpu.state for key, gpu in stack.fleet.expected().items()}
    print(text)
