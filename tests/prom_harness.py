"""A small GPU fleet for end-to-end tests: simulated exporters and a real Prometheus.

Built on tools.localstack (the processes and the generated Prometheus configuration):
every process listens on 127.0.0.1 only and is stopped by `Fleet.close()` (or the `with`
block). With `bookings`, a reservations endpoint serves them from a reservations file, as on
the monitoring host. Prometheus runs the project's own prometheus.yml (its scrape job and host
relabelling) and rule files, changed only where a test must be quick: shorter scrape and
evaluation intervals, this fleet's targets file, and thresholds a test overrides
(`Fleet(..., thresholds={...})`). What a test expects is derived from the scenarios the
exporters simulate and from the thresholds the rules read, never copied.

    with Fleet([Node("ws-01", "workstation", {"cluster": "lab"})], tmp_path) as fleet:
        fleet.wait_for_rules()
        rows = fleet.query("instance_gpu:gpuwatch_state:info")
        fleet.expected_grid()
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuwatch import reservations
from gpuwatch.exporter.nvml import NVMLError
from gpuwatch.sim import Scenario, SimulatedNode, SimulatedNvml, load_scenario
from tools import localstack

LOCALHOST = localstack.LOCALHOST
DEADLINE = 30.0
"""Seconds the fleet waits for a condition before it gives up (a guard, not a measure)."""

THRESHOLD_HELD_MEMORY = "gpuwatch:threshold_held_memory_bytes:constant"
THRESHOLD_IDLE_UTILIZATION = "gpuwatch:threshold_idle_utilization_ratio:constant"
THRESHOLD_IDLE_DURATION = "gpuwatch:threshold_idle_duration_seconds:constant"


class FleetError(RuntimeError):
    """Prometheus did not answer, or a condition was not reached in time."""


# -- the project's rule files ------------------------------------------------------------------

def rules() -> Iterator[dict[str, Any]]:
    """Every rule (recording and alerting) of the rule files prometheus.yml loads."""
    for path in localstack.rule_files():
        yield from localstack.rules(localstack.load_rules(path))


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def thresholds() -> dict[str, float]:
    """The constant thresholds the rules publish, by record name."""
    return localstack.threshold_values()


# -- the fleet ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One simulated GPU node: its host name, scenario and target labels (cluster, rack)."""

    host: str
    scenario: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunningNode:
    node: Node
    scenario: Scenario
    port: int
    service: localstack.Service
    started: float
    """Unix time just before the exporter started: its simulated clock starts a moment later."""

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"


@dataclass(frozen=True)
class ExpectedProcess:
    host: str
    gpu: str
    pid: str
    user: str
    command: str


@dataclass(frozen=True)
class ExpectedGpu:
    host: str
    gpu: str
    state: str
    users: tuple[str, ...]
    model: str | None
    reservation: str | None = None
    """The booking in words, as the grid shows it: alice until ... (why)."""


class Fleet:
    """Simulated exporters and a Prometheus with the project's config and rules."""

    def __init__(self, nodes: Sequence[Node], workdir: Path, interval: float = 1.0,
                 thresholds: Mapping[str, float] | None = None,
                 bookings: Sequence[reservations.Reservation] = ()) -> None:
        self.nodes = list(nodes)
        self.workdir = workdir
        self.interval = interval
        self.overrides = dict(thresholds or {})
        self.bookings = list(bookings)
        self.running: list[RunningNode] = []
        self.reservations: localstack.Service | None = None
        self.prometheus: localstack.Service | None = None
        self.prometheus_port = 0
        self.prometheus_started = 0.0

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.prometheus_port}"

    def thresholds(self) -> dict[str, float]:
        """The thresholds this fleet's Prometheus runs with."""
        return {**thresholds(), **self.overrides}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            port = localstack.free_port()
            service = localstack.exporter(node.scenario, port,
                                          self.workdir / f"exporter-{node.host}.log",
                                          ["--log.level", "warn"])
            running = RunningNode(node, load_scenario(node.scenario), port, service,
                                  time.time())
            self.running.append(running)
            service.start()

        targets = self.workdir / "targets"
        targets.mkdir(exist_ok=True)
        localstack.write_targets(targets / "fleet.yml", [
            {"targets": [r.address], "labels": {"host": r.node.host, **r.node.labels}}
            for r in self.running])
        endpoint = None
        if self.bookings:
            reservations.write(self.workdir / "reservations.yml", self.bookings)
            port = localstack.free_port()
            self.reservations = localstack.reservations_endpoint(
                self.workdir / "reservations.yml", port, self.workdir / "reservations.log")
            self.reservations.start()
            endpoint = f"{LOCALHOST}:{port}"
        every = f"{self.interval:g}s"
        config = localstack.render_config(
            self.workdir / "prometheus", targets,
            localstack.Overrides(scrape_interval=every, evaluation_interval=every,
                                 thresholds=self.overrides), reservations=endpoint)
        self.prometheus_port = localstack.free_port()
        self.prometheus = localstack.prometheus(config, self.workdir / "data",
                                                self.prometheus_port,
                                                self.workdir / "prometheus.log")
        self.prometheus_started = time.time()
        self.prometheus.start()

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.reservations is not None:
            self.reservations.stop()
        for running in self.running:
            running.service.stop()

    # -- asking Prometheus ---------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30.0) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            body = e.read()
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise FleetError(f"{path} {params}: {answer.get('errorType')}: "
                             f"{answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result: a list of {"metric": labels, "value": [t, "v"]}."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return sorted(self.api(f"label/{label}/values", **{"match[]": match}))

    def wait_for(self, expr: str, done: Callable[[list[dict[str, Any]]], bool],
                 what: str) -> list[dict[str, Any]]:
        """Polls an instant query until `done(result)`; FleetError past the deadline."""
        deadline = time.monotonic() + DEADLINE
        while True:
            result = self.query(expr)
            if done(result):
                return result
            if time.monotonic() > deadline:
                raise FleetError(f"waited {DEADLINE:.0f} s for {what}; {expr} "
                                 f"gives {result}")
            time.sleep(self.interval / 2)

    def wait_for_rules(self, evaluations: int = 3) -> None:
        """Waits until every node is scraped and the rules have run `evaluations` times since.

        The idle clock and `rate()` need a few samples; the state of every GPU needs the
        rule of its own previous evaluation (the inventory keeps itself).
        """
        self.wait_for('count(up{job="gpuwatch"} == 1)',
                      lambda r: bool(r) and float(r[0]["value"][1]) == len(self.running),
                      "every exporter to be scraped")
        gpus = sum(len(r.scenario.gpus) for r in self.running)
        self.wait_for("count(instance_gpu:gpuwatch_state:info)",
                      lambda r: bool(r) and float(r[0]["value"][1]) == gpus,
                      "the state of every GPU")
        first = time.time()
        self.wait_for("time()", lambda r: float(r[0]["value"][1])
                      >= first + evaluations * self.interval, "more evaluations")
        self.wait_for(f"count(instance_gpu:gpuwatch_state:info offset {evaluations}s)",
                      lambda r: bool(r) and float(r[0]["value"][1]) == gpus,
                      "history of the state")

    # -- what the scenarios say ----------------------------------------------------------------

    def expected_grid(self, at: float | None = None) -> list[ExpectedGpu]:
        """Every simulated GPU's state and users at `at`, from its scenario and thresholds.

        free: answers, no process, memory below the held threshold; busy: held; idle: held
        with utilisation below the idle threshold for the idle duration (counted from when
        Prometheus started, since it has seen no earlier samples); down: lost. A GPU with an
        active booking is reserved, unless it is down, or busy by the user who booked it.
        """
        now = time.time() if at is None else at
        now_at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        t = self.thresholds()
        inactive_long_enough = now - self.prometheus_started >= t[THRESHOLD_IDLE_DURATION]
        expected = []
        for running in self.running:
            node = SimulatedNode(running.scenario, clock=lambda: now, start=running.started)
            nvml = SimulatedNvml(node)
            for index, gpu in enumerate(running.scenario.gpus):
                host, name = running.node.host, str(index)
                booked = self.booking(host, index, now)
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                except NVMLError:
                    expected.append(ExpectedGpu(host, name, "down", (), None, booked))
                    continue
                live = node.processes(index)
                users = tuple(sorted({p.process.user for p in live if not p.process.vanished}))
                held = (bool(live) or nvml.nvmlDeviceGetMemoryInfo(handle).used
                        >= t[THRESHOLD_HELD_MEMORY])
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                inactive = utilization < t[THRESHOLD_IDLE_UTILIZATION]
                holder = next((b.user for b in self.bookings
                               if b.shares_gpus(host, (index,)) and b.active(now_at)), None)
                if booked is not None and holder in users:
                    state = "busy"
                elif booked is not None:
                    state = "reserved"
                elif held and inactive and inactive_long_enough:
                    state = "idle"
                elif held:
                    state = "busy"
                else:
                    state = "free"
                expected.append(ExpectedGpu(host, name, state, users, gpu.name, booked))
        return expected

    def booking(self, host: str, gpu: int, now: float) -> str | None:
        """The active booking of a GPU in words, as the rules write it, or None."""
        at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        for b in self.bookings:
            if b.shares_gpus(host, (gpu,)) and b.active(at):
                note = f" ({b.comment})" if b.comment else ""
                return f"{b.user} until {reservations.short(b.until)}{note}"
        return None

    def expected_processes(self, at: float | None = None) -> list[ExpectedProcess]:
        """The processes the exporters report at `at`: what NVML lists, less those that exit
        while being read (they are skipped)."""
        now = time.time() if at is None else at
        expected: list[ExpectedProcess] = []
        for running in self.running:
            node = SimulatedNode(running.scenario, clock=lambda: now, start=running.started)
            nvml = SimulatedNvml(node)
            for index in range(len(running.scenario.gpus)):
                try:
                    nvml.nvmlDeviceGetHandleByIndex(index)
                except NVMLError:
                    continue  # a lost GPU: nothing is read from it
                expected.extend(
                    ExpectedProcess(running.node.host, str(index), str(p.pid), p.process.user,
                                    p.process.command)
                    for p in node.processes(index) if not p.process.vanished)
        return expected
