"""A small GPU fleet for end-to-end tests: simulated exporters and a real Prometheus.

Every process listens on 127.0.0.1 only and is stopped by `Fleet.close()` (or the `with`
block). Prometheus runs the project's own configuration, prometheus/prometheus.yml (its
scrape job and host relabelling) and rule files, changed only where a test must be quick:
shorter scrape and evaluation intervals, this fleet's targets file, and thresholds a test
overrides (`Fleet(..., thresholds={...})`). What a test expects is derived from the
scenarios the exporters simulate and from the thresholds the rules read, never copied.

    with Fleet([Node("ws-01", "workstation", {"cluster": "lab"})], tmp_path) as fleet:
        fleet.wait_for_rules()
        rows = fleet.query("instance_gpu:gpuwatch_state:info")
        fleet.expected_grid()
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from gpuwatch.nvml import NVMLError
from gpuwatch.simulate import Scenario, SimulatedNode, SimulatedNvml, load_scenario

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
LOCALHOST = "127.0.0.1"
STARTUP_DEADLINE = 30.0
"""Seconds a server may take to answer before the fleet gives up (a guard, not a measure)."""

THRESHOLD_HELD_MEMORY = "gpuwatch:threshold_held_memory_bytes:constant"
THRESHOLD_IDLE_UTILIZATION = "gpuwatch:threshold_idle_utilization_ratio:constant"
THRESHOLD_IDLE_DURATION = "gpuwatch:threshold_idle_duration_seconds:constant"


class FleetError(RuntimeError):
    """A server of the fleet did not start or answer; the message holds its log."""


# -- the project's rule files ------------------------------------------------------------------

def rule_files() -> list[Path]:
    """The rule files prometheus.yml loads, in its order (those that exist)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    files: list[Path] = []
    for pattern in config.get("rule_files") or []:
        files.extend(sorted(PROMETHEUS_DIR.glob(pattern)))
    return files


def rules() -> Iterator[dict[str, Any]]:
    """Every rule (recording and alerting) of the project's rule files."""
    for path in rule_files():
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups") or []:
            yield from group.get("rules") or []


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def thresholds() -> dict[str, float]:
    """The constant thresholds the rules publish (`record: ...:constant`, `vector(N)`)."""
    found = {}
    for rule in rules():
        name = rule.get("record", "")
        expr = str(rule.get("expr", "")).strip()
        if name.endswith(":constant") and expr.startswith("vector(") and expr.endswith(")"):
            found[name] = float(expr[len("vector("):-1])
    return found


def write_rule_files(dest: Path, overrides: Mapping[str, float]) -> list[Path]:
    """Copies of the rule files under dest, with the given constants replaced."""
    unknown = set(overrides) - set(thresholds())
    if unknown:
        raise ValueError(f"no such threshold in the rule files: {', '.join(sorted(unknown))}")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in rule_files():
        data = yaml.safe_load(path.read_text()) or {}
        for group in data.get("groups") or []:
            for rule in group.get("rules") or []:
                if rule.get("record") in overrides:
                    rule["expr"] = f"vector({overrides[rule['record']]!r})"
        target = dest / path.relative_to(PROMETHEUS_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        written.append(target)
    return written


# -- servers -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                           if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        raise FleetError("prometheus is not installed: run `make prometheus` (Debian's package)")
    return found


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def _wait_until_answers(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        if process.poll() is not None:
            raise FleetError(f"{url}: the server exited with {process.returncode}:\n"
                             f"{log.read_text()[-3000:]}")
        try:
            _get(url, timeout=2.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise FleetError(f"{url}: no answer after {STARTUP_DEADLINE:.0f} s:\n"
                             f"{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    process: subprocess.Popen[bytes]
    started: float
    """Unix time just before the exporter started: its simulated clock starts a moment later."""

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"


@dataclass(frozen=True)
class ExpectedGpu:
    host: str
    gpu: str
    state: str
    users: tuple[str, ...]
    model: str | None


class Fleet:
    """Simulated exporters and a Prometheus with the project's config and rules."""

    def __init__(self, nodes: Sequence[Node], workdir: Path, interval: float = 1.0,
                 thresholds: Mapping[str, float] | None = None) -> None:
        self.nodes = list(nodes)
        self.workdir = workdir
        self.interval = interval
        self.overrides = dict(thresholds or {})
        self.running: list[RunningNode] = []
        self.prometheus: subprocess.Popen[bytes] | None = None
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
            self.running.append(self._start_exporter(node))
        for running in self.running:
            _wait_until_answers(f"http://{running.address}/metrics", running.process,
                                self.workdir / f"exporter-{running.node.host}.log")
        self._start_prometheus()

    def _start_exporter(self, node: Node) -> RunningNode:
        port = free_port()
        log = (self.workdir / f"exporter-{node.host}.log").open("wb")
        started = time.time()
        process = subprocess.Popen(
            [sys.executable, "-m", "gpuwatch.exporter_main", "--simulate", node.scenario,
             "--web.listen-address", f"{LOCALHOST}:{port}", "--log.level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        return RunningNode(node, load_scenario(node.scenario), port, process, started)

    def _start_prometheus(self) -> None:
        targets = self.workdir / "targets"
        targets.mkdir(exist_ok=True)
        (targets / "fleet.yml").write_text(yaml.safe_dump([
            {"targets": [r.address], "labels": {"host": r.node.host, **r.node.labels}}
            for r in self.running]))
        rules = write_rule_files(self.workdir / "rules", self.overrides)

        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        every = f"{self.interval:g}s"
        config["global"].update(scrape_interval=every, scrape_timeout=every,
                                evaluation_interval=every)
        config["rule_files"] = [str(p) for p in rules]
        for job in config["scrape_configs"]:
            for sd in job.get("file_sd_configs") or []:
                sd["files"] = [str(targets / "*.yml")]
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))

        self.prometheus_port = free_port()
        log_path = self.workdir / "prometheus.log"
        log = log_path.open("wb")
        self.prometheus_started = time.time()
        self.prometheus = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config_file}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address={LOCALHOST}:{self.prometheus_port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        _wait_until_answers(f"{self.url}/-/ready", self.prometheus, log_path)

    def close(self) -> None:
        if self.prometheus is not None:
            _stop(self.prometheus)
        for running in self.running:
            _stop(running.process)

    # -- asking Prometheus ---------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = _get(url, timeout=30.0)
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
        deadline = time.monotonic() + STARTUP_DEADLINE
        while True:
            result = self.query(expr)
            if done(result):
                return result
            if time.monotonic() > deadline:
                raise FleetError(f"waited {STARTUP_DEADLINE:.0f} s for {what}; {expr} "
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
        Prometheus started, since it has seen no earlier samples); down: lost.
        """
        now = time.time() if at is None else at
        t = self.thresholds()
        inactive_long_enough = now - self.prometheus_started >= t[THRESHOLD_IDLE_DURATION]
        expected = []
        for running in self.running:
            node = SimulatedNode(running.scenario, clock=lambda: now, start=running.started)
            nvml = SimulatedNvml(node)
            for index, gpu in enumerate(running.scenario.gpus):
                host, name = running.node.host, str(index)
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                except NVMLError:
                    expected.append(ExpectedGpu(host, name, "down", (), None))
                    continue
                live = node.processes(index)
                users = tuple(sorted({p.process.user for p in live if not p.process.vanished}))
                held = (bool(live) or nvml.nvmlDeviceGetMemoryInfo(handle).used
                        >= t[THRESHOLD_HELD_MEMORY])
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                inactive = utilization < t[THRESHOLD_IDLE_UTILIZATION]
                if held and inactive and inactive_long_enough:
                    state = "idle"
                elif held:
                    state = "busy"
                else:
                    state = "free"
                expected.append(ExpectedGpu(host, name, state, users, gpu.name))
        return expected

