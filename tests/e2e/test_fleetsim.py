"""The fleet simulator: every node serves what gpuwatch-exporter serves for its GPUs, on its own
loopback address; churn gives new pids; only 127.0.0.0/8 is used.

What a node should serve is built here with the exporter's own code (the same scenario,
collectors, registry and web app), then compared with what the simulator answers over HTTP:
the same headers, the same HELP and TYPE lines, the same series. Values that move with time
(utilisation, energy, collection durations) are not compared.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch.exporter.main import build_exporter, build_registry, simulated_sources
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.exporter.web import App
from gpuwatch.sim import SimulatedNode
from tools import fleetsim, localstack

SPEC = fleetsim.FleetSpec(gpus=10, gpus_per_node=4, processes_per_gpu=3, users=5)
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}


# -- the fleet as data ---------------------------------------------------------------------------

def test_nodes_take_the_gpus_the_last_one_the_rest() -> None:
    assert SPEC.nodes == 3
    assert [SPEC.node_gpus(n) for n in range(SPEC.nodes)] == [4, 4, 2]
    scenarios = [fleetsim.node_scenario(SPEC, n) for n in range(SPEC.nodes)]
    assert [len(s.gpus) for s in scenarios] == [4, 4, 2]
    assert all(len(g.processes) == 3 for s in scenarios for g in s.gpus)
    users = {p.user for s in scenarios for g in s.gpus for p in g.processes}
    assert len(users) == SPEC.users
    for s in scenarios:
        pids = [p.pid for g in s.gpus for p in g.processes]
        assert len(pids) == len(set(pids)), "pids are unique within a node"


def test_churn_starts_a_new_pid_for_every_job() -> None:
    spec = fleetsim.FleetSpec(gpus=2, gpus_per_node=2, processes_per_gpu=2, job_seconds=60)
    assert spec.jobs_per_day == 2 * 2 * 86400 / 60
    now = 1_800_000_000.0
    node = SimulatedNode(fleetsim.node_scenario(spec, 0), clock=lambda: now, start=now)
    before = {(i, p.pid, p.started) for i in range(2) for p in node.processes(i)}
    now += 60
    after = {(i, p.pid, p.started) for i in range(2) for p in node.processes(i)}
    assert len(before) == len(after) == 4, "a slot is never empty: jobs run back to back"
    assert not {pid for _, pid, _ in before} & {pid for _, pid, _ in after}
    assert all(started > now - 60 for _, _, started in after)


def test_without_churn_processes_keep_their_pids() -> None:
    now = 1_800_000_000.0
    node = SimulatedNode(fleetsim.node_scenario(SPEC, 0), clock=lambda: now, start=now)
    before = [p.pid for p in node.processes(0)]
    now += 86400
    assert [p.pid for p in node.processes(0)] == before


def test_addresses_are_loopback_only() -> None:
    assert fleetsim.node_address("127.1.0.1", 0) == "127.1.0.1"
    assert fleetsim.node_address("127.1.0.1", 1249) == "127.1.4.226"
    for base, node in (("10.0.0.1", 0), ("127.255.255.250", 10), ("127.255.255.254", 1),
                       ("not-an-address", 0)):
        with pytest.raises(fleetsim.FleetSimError):
            fleetsim.node_address(base, node)


@pytest.mark.parametrize("argv", [["--gpus", "0"], ["--processes", "-1"],
                                  ["--exporter-flag=--no-such-flag"],
                                  ["--base-address", "192.168.1.1"]])
def test_bad_arguments_stop_with_one_line(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "tools.fleetsim", *argv],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(("gpuwatch-fleetsim: error:",
                                                            "usage:"))


# -- the simulator over HTTP ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("fleetsim")
    port = localstack.free_port()
    targets = workdir / "targets.yml"
    service = localstack.Service(
        "fleet simulator",
        [sys.executable, "-m", "tools.fleetsim", f"--gpus={SPEC.gpus}",
         f"--gpus-per-node={SPEC.gpus_per_node}", f"--processes={SPEC.processes_per_gpu}",
         f"--users={SPEC.users}", f"--port={port}", f"--targets-file={targets}"],
        f"http://{fleetsim.node_address(fleetsim.DEFAULT_BASE_ADDRESS, 0)}:{port}/-/healthy",
        workdir / "fleetsim.log")
    with service:
        yield {"port": port, "targets": yaml.safe_load(targets.read_text())}


def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def exporter_answer(node: int, headers: dict[str, str]) -> tuple[str, list[tuple[str, str]],
                                                                 bytes]:
    """What gpuwatch-exporter answers for the node's scenario, built with its own code."""
    sources = simulated_sources(fleetsim.node_scenario(SPEC, node))
    options = ExporterOptions()  # what gpuwatch-exporter runs with, no flags given
    exporter = build_exporter(options, sources)
    app = App(build_registry(exporter, options), options.telemetry_path)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()}}
    started: list[Any] = []
    try:
        body = b"".join(app(environ, lambda status, h, exc=None: started.extend([status, h])))
    finally:
        exporter.close()
    return started[0], started[1], body


def shape(text: str) -> tuple[list[str], set[tuple[str, tuple[tuple[str, str], ...]]]]:
    """The HELP and TYPE lines, and every series (name and labels), of an exposition (text,
    or OpenMetrics, which its own strict parser reads)."""
    comments = [line for line in text.splitlines() if line.startswith("#")]
    parse = openmetrics_parser.text_string_to_metric_families if text.endswith("# EOF\n") \
        else text_string_to_metric_families
    series = {(s.name, tuple(sorted(s.labels.items())))
              for family in parse(text) for s in family.samples}
    return comments, series


def test_targets_file_lists_every_node_on_its_own_loopback_address(
        simulator: dict[str, Any]) -> None:
    groups = simulator["targets"]
    assert [g["labels"]["host"] for g in groups] == [SPEC.host(n) for n in range(SPEC.nodes)]
    addresses = [g["targets"][0] for g in groups]
    assert addresses == [f"{fleetsim.node_address(fleetsim.DEFAULT_BASE_ADDRESS, n)}:"
                         f"{simulator['port']}" for n in range(SPEC.nodes)]
    assert all(g["labels"]["cluster"] == "cluster-00" for g in groups)


@pytest.mark.parametrize("node", range(SPEC.nodes))
def test_every_node_serves_what_the_exporter_serves(simulator: dict[str, Any],
                                                    node: int) -> None:
    address = simulator["targets"][node]["targets"][0]
    status, headers, body = get(f"http://{address}/metrics", PROMETHEUS_HEADERS)
    want_status, want_headers, want_body = exporter_answer(node, PROMETHEUS_HEADERS)
    assert f"{status} OK" == want_status
    for name, value in want_headers:
        assert headers.get(name) == value, name
    assert headers["Content-Type"].startswith("application/openmetrics-text")  # as asked
    got_comments, got_series = shape(gzip.decompress(body).decode())
    want_comments, want_series = shape(gzip.decompress(want_body).decode())
    assert got_comments == want_comments
    assert got_series == want_series
    gpus = {labels for name, labels in got_series if name == "nvidia_gpu_up"}
    assert len(gpus) == SPEC.node_gpus(node)


def test_nodes_are_different_gpus(simulator: dict[str, Any]) -> None:
    uuids: list[str] = []
    for group in simulator["targets"]:
        _, _, body = get(f"http://{group['targets'][0]}/metrics", {})
        for family in text_string_to_metric_families(body.decode()):
            uuids += [s.labels["uuid"] for s in family.samples if s.name == "nvidia_gpu_up"]
    assert len(uuids) == SPEC.gpus == len(set(uuids))


def test_a_scrape_its_scraper_gave_up_on_is_not_rendered(simulator: dict[str, Any]) -> None:
    address = simulator["targets"][0]["targets"][0]
    status, _, body = get(f"http://{address}/metrics",
                          {"X-Prometheus-Scrape-Timeout-Seconds": "-1"})
    assert (status, body) == (503, b"too late\n")
    stats = get(f"http://{address}{fleetsim.STATS_PATH}", {})
    assert stats[0] == 200
    figures = yaml.safe_load(stats[2])
    assert figures["nodes"] == SPEC.nodes and figures["gpus"] == SPEC.gpus
    assert figures["too_late"] >= 1


def test_landing_page_and_health_are_the_exporters(simulator: dict[str, Any]) -> None:
    address = simulator["targets"][1]["targets"][0]
    assert get(f"http://{address}/-/healthy", {})[2] == b"Healthy\n"
    assert b"gpuwatch exporter" in get(f"http://{address}/", {})[2]


def test_stops_on_sigterm_leaving_nothing(tmp_path: Path) -> None:
    port = localstack.free_port()
    service = localstack.Service(
        "fleet simulator", [sys.executable, "-m", "tools.fleetsim", "--gpus=2",
                            f"--port={port}", "--base-address=127.1.200.1"],
        f"http://127.1.200.1:{port}/-/healthy", tmp_path / "log")
    service.start()
    process = service._process
    assert process is not None
    service.stop()
    assert process.returncode == 0, service.log_tail()
