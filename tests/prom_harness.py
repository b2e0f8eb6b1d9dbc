"""A small GPU fleet for end-to-end tests: simulated exporters, `gpuwatch serve` (the
reservations endpoint) and a real Prometheus, and what they should show.

Built on tools.localstack (the processes and the generated Prometheus configuration): every
process listens on 127.0.0.1 only and is stopped when the `with` block ends (`Fleet.close()`).
Prometheus runs the project's own prometheus.yml (its scrape jobs and host relabelling) and
rule files, changed only where a test must be quick: shorter scrape, evaluation and target
refresh intervals, this fleet's targets file, and the thresholds and alert `for`s a test
overrides. `gpuwatch serve` serves the fleet's reservations file and its claims on the
reservations job's port, as on the monitoring host; tests edit the file with `gpuwatch reserve
--file` and `gpuwatch release --file`, as an admin does, or ask the service's API as a user
(`Fleet.ask_service`, who they are in the trusted proxy header `SERVICE_USER_HEADER`; claims
with `Fleet.claim`). Prometheus is asked through gpuwatch.fleet.prometheus, the client the CLI
uses (`fleet.api`).

What a test expects comes from `Fleet.expected_cells()`, the one oracle: every cell's (a
whole GPU's or a MIG slice's) state, users, model and profile derived from the scenarios the
exporters simulate (the simulator's own view of each GPU at a given time), the thresholds the
rules read, the reservations in the reservations file and the claims the service holds (its
own GET /api/v1/claims), never copied. `Fleet.expected()` is its whole GPUs by index.

    with Fleet(tmp_path, [Node("ws-01", "workstation", {"cluster": "lab"})]) as fleet:
        fleet.wait_for_rules()
        fleet.api.query(states.STATE_INFO)
        fleet.expected_cells()
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import bcrypt
import yaml

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.contract import states
from gpuwatch.contract.thresholds import HELD_MEMORY, IDLE_DURATION, IDLE_UTILIZATION
from gpuwatch.exporter.nvml import NVMLError
from gpuwatch.fleet.prometheus import Prometheus
from gpuwatch.reservations import Reservation
from gpuwatch.sim import Scenario, SimProcess, SimulatedNode, SimulatedNvml, load_scenario
from tools import localstack

T = TypeVar("T")

LOCALHOST = localstack.LOCALHOST
DEADLINE = 30.0
"""Seconds a condition may take to come true before the fleet gives up (a bound, not a
timing assertion)."""

SERVICE_USER_HEADER = "X-Forwarded-User"
"""Who asks `gpuwatch serve` (--web.auth-header), believed from 127.0.0.1 (the trusted proxy):
the tests are the proxy."""
SCRAPER = "prometheus"
"""The basic-auth user Prometheus scrapes `gpuwatch serve` as, and the tests' proxy passes
basic auth as, when the fleet has web users (Fleet(web_users=...))."""


class FleetError(AssertionError):
    """A condition was not reached in time; the message has Prometheus' log."""


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
    """One simulated GPU node: the host label its target gets (None: Prometheus derives it
    from the target, 127.0.0.1), its scenario (a name or a file), other target labels
    (cluster, rack) and extra exporter flags."""

    host: str | None
    scenario: str
    labels: Mapping[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()


@dataclass
class RunningNode:
    node: Node
    scenario: Scenario
    port: int
    service: localstack.Service
    started: float
    """Unix time just before the exporter started: its simulated clock starts a moment later."""
    stopped_at: float | None = None
    """Unix time just before the exporter was stopped or killed (its target stays); None
    while it runs."""

    @property
    def stopped(self) -> bool:
        """The exporter no longer runs (stopped or killed); its target stays."""
        return self.stopped_at is not None

    @property
    def instance(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def host(self) -> str:
        """The host label Prometheus gives its series."""
        return self.node.host or LOCALHOST

    def kill(self) -> None:
        """Ends the exporter at once, as a crash would; its target stays."""
        self.stopped_at = time.time()
        self.service.kill()

    def stop(self) -> None:
        """Stops the exporter as its service manager would (SIGTERM); its target stays."""
        self.stopped_at = time.time()
        self.service.stop()


@dataclass(frozen=True)
class ExpectedCell:
    """A cell of the grid, a whole GPU or a MIG slice, as the rules should see it
    (Fleet.expected_cells)."""

    host: str
    cell: Cell
    state: str
    users: tuple[str, ...]
    """Who has a process on it, sorted; none when it is down."""
    model: str
    """The NVML name of the GPU (a slice's parent's); "" where Prometheus has never seen it
    (a GPU lost or hung from the start)."""
    memory_total_bytes: float | None
    """The GPU's device memory (a slice's own); None where the exporter cannot read it."""
    user_memory: Mapping[str, float]
    """Bytes of device memory each user's processes on it hold (whole bytes: sums are exact)."""
    processes: int = 0
    """The processes on it the exporter counts."""
    reservation: str | None = None
    """The booking that covers it in words, as the grid shows it: alice until ... (why)."""
    claim: str | None = None
    """Who claimed it (gpuwatch run), as the claim label says; None when not claimed."""
    profile: str | None = None
    """A slice's MIG profile (1g.10gb); None for a whole GPU."""
    mig_uuid: str | None = None
    """A slice's MIG UUID (its compute instance 0's: what CUDA_VISIBLE_DEVICES takes)."""


@dataclass(frozen=True)
class ExpectedGpu:
    """A whole GPU as the rules should see it (Fleet.expected: ExpectedCell by GPU index)."""

    host: str
    gpu: int
    state: str
    users: tuple[str, ...]
    model: str
    """"" where Prometheus has never seen the GPU's name (a GPU lost or hung from the start)."""
    memory_total_bytes: float | None
    user_memory: Mapping[str, float]
    """Bytes of device memory each user's processes hold (whole bytes: sums are exact)."""
    reservation: str | None = None
    """The reservation in words, as the grid shows it: alice until ... (why)."""
    claim: str | None = None
    """Who claimed it (gpuwatch run), as the claim label says; None when not claimed."""


@dataclass(frozen=True)
class ExpectedProcess:
    host: str
    gpu: int
    pid: int
    user: str
    command: str
    gpu_instance_id: int | None = None
    """The MIG slice (GPU instance) it runs on; None on a GPU without MIG."""

    @property
    def cell(self) -> Cell:
        """The cell it holds: its GPU, or its slice."""
        return Cell(self.gpu, self.gpu_instance_id)


@dataclass(frozen=True)
class _Reading:
    """What an exporter reads of one cell at one moment (read_cells), or of a GPU never seen
    (the defaults)."""

    cell: Cell
    model: str = ""
    memory_total: float | None = None
    memory_used: float = 0.0
    processes: tuple[SimProcess, ...] = ()
    """The processes on it the exporter lists (not those that exit while being read)."""
    utilization: float | None = None
    """The GPU's utilisation ratio; None for a slice (NVML has none per slice)."""
    profile: str | None = None
    mig_uuid: str | None = None


SEEN_SCRAPES = 3
"""Scrape intervals after which Prometheus has surely seen a GPU answer (scraped it and run
the rules on it) once both started; a GPU lost sooner may or may not have been seen."""


class Fleet:
    """Simulated exporters, `gpuwatch serve` and a Prometheus with the project's config and
    rules."""

    def __init__(self, workdir: Path, nodes: Sequence[Node] = (), interval: float = 1.0,
                 thresholds: Mapping[str, float] | None = None,
                 alert_for: Mapping[str, str] | None = None,
                 reservations: Sequence[Reservation] = (),
                 prometheus_config: Callable[[Path], None] | None = None,
                 web_users: Mapping[str, str] | None = None,
                 admins: Sequence[str] = (),
                 serve_flags: Sequence[str] = (),
                 alertmanager: str | None = None) -> None:
        """`alertmanager` (HOST:PORT) is where Prometheus sends its alerts (none: nowhere).
        `prometheus_config` changes the rendered prometheus.yml before Prometheus starts
        (a remote_write block, say). `web_users` (name -> password) become the basic-auth
        users of the service's web config, with SCRAPER beside them (Prometheus scrapes the
        service as it, and ask_service passes basic auth as it before naming the user in the
        header); `admins` its --admins; `serve_flags` more flags of `gpuwatch serve`."""
        self.workdir = workdir
        self.initial_nodes = list(nodes)
        self.interval = interval
        self.overrides = dict(thresholds or {})
        self.alert_for = dict(alert_for or {})
        self.initial_reservations = list(reservations)
        self.prometheus_config = prometheus_config
        self.alertmanager = alertmanager
        self.targets = workdir / "targets"
        self.reservations_file = workdir / "reservations.yml"
        self.nodes: list[RunningNode] = []
        self.port = localstack.free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.reservations_port = localstack.free_port()
        self.service_url = f"http://{LOCALHOST}:{self.reservations_port}"
        self.web_users = dict(web_users or {})
        self.scraper_password = secrets.token_urlsafe(12) if self.web_users else ""
        self.web_config = workdir / "web-config.yml" if self.web_users else None
        self.reservations_endpoint = serve(self.reservations_file, self.reservations_port,
                                           self.url, workdir / "serve.log",
                                           web_config=self.web_config, admins=admins,
                                           flags=serve_flags)
        self.api = Prometheus(self.url, timeout=30)
        self.prometheus: localstack.Service | None = None
        self.prometheus_started = 0.0
        self._stack = ExitStack()

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def thresholds(self) -> dict[str, float]:
        """The thresholds this fleet's Prometheus runs with."""
        return {**thresholds(), **self.overrides}

    def start(self) -> None:
        self.targets.mkdir(parents=True, exist_ok=True)
        for node in self.initial_nodes:
            self._start_exporter(node)
        self.write_targets()
        if self.initial_reservations:
            reservations.write(self.reservations_file, self.initial_reservations)
        if self.web_config is not None:
            write_web_config(self.web_config, {**self.web_users,
                                               SCRAPER: self.scraper_password})
        self._stack.callback(self.reservations_endpoint.stop)
        self.reservations_endpoint.start()
        every = f"{self.interval:g}s"
        config = localstack.render_config(
            self.workdir / "prometheus", self.targets,
            localstack.Overrides(scrape_interval=every, evaluation_interval=every,
                                 refresh_interval=every, thresholds=self.overrides,
                                 alert_for=self.alert_for),
            reservations=f"{LOCALHOST}:{self.reservations_port}",
            alertmanager=self.alertmanager, prometheus=f"{LOCALHOST}:{self.port}")
        if self.web_config is not None:
            password_file = self.workdir / "scraper-password"
            password_file.write_text(self.scraper_password)
            localstack.scrape_with_basic_auth(config, states.RESERVATIONS_JOB, SCRAPER,
                                              password_file)
        if self.prometheus_config is not None:
            self.prometheus_config(config)
        self.prometheus = localstack.prometheus(config, self.workdir / "data", self.port,
                                                self.workdir / "prometheus.log")
        self._stack.callback(self.prometheus.stop)
        self.prometheus_started = time.time()
        self.prometheus.start()

    def close(self) -> None:
        """Stops every process the fleet started (Prometheus first)."""
        self._stack.close()

    # -- nodes ---------------------------------------------------------------------------------

    def _start_exporter(self, node: Node) -> RunningNode:
        port = localstack.free_port()
        service = localstack.exporter(node.scenario, port,
                                      self.workdir / f"exporter-{port}.log",
                                      ["--log.level", "warn", *node.flags])
        running = RunningNode(node, load_scenario(node.scenario), port, service, time.time())
        self._stack.callback(service.stop)
        service.start()
        self.nodes.append(running)
        return running

    def add_node(self, node: Node) -> RunningNode:
        """Starts an exporter and adds it to the targets file (Prometheus picks it up)."""
        running = self._start_exporter(node)
        self.write_targets()
        return running

    def remove_node(self, running: RunningNode) -> None:
        """Takes a node out of the targets file, then stops its exporter."""
        self.nodes.remove(running)
        self.write_targets()
        running.service.stop()

    def write_targets(self) -> None:
        localstack.write_targets(self.targets / "nodes.yml", [
            {"targets": [n.instance],
             **({"labels": {**({"host": n.node.host} if n.node.host else {}),
                            **n.node.labels}} if n.node.host or n.node.labels else {})}
            for n in self.nodes])

    def node(self, host: str) -> RunningNode:
        """The node whose series carry this host label."""
        (found,) = [n for n in self.nodes if n.host == host]
        return found

    # -- waiting -------------------------------------------------------------------------------

    def wait_for(self, what: str, probe: Callable[[], T], ok: Callable[[T], bool]) -> T:
        """probe() until ok(value), at most DEADLINE seconds; FleetError otherwise, with the
        last value and Prometheus' log."""
        deadline = time.monotonic() + DEADLINE
        while True:
            value = probe()
            if ok(value):
                return value
            if time.monotonic() > deadline:
                log = self.prometheus.log_tail() if self.prometheus else "(not started)"
                raise FleetError(f"{what}: not within {DEADLINE:g} s; last seen {value!r}; "
                                 f"prometheus log: {log}")
            time.sleep(min(0.25, self.interval / 2))

    def wait_for_rules(self, evaluations: int = 3) -> None:
        """Waits until every running exporter is scraped, every cell (expected_cells: a
        MIG-enabled GPU is none, each of its slices one) has a state, the rules have run
        `evaluations` times since, and the state has that much history.

        The idle clock and `rate()` need a few samples; the state of every cell needs the
        rule of its own previous evaluation (the inventory keeps itself).
        """
        live = sum(not n.stopped for n in self.nodes)
        self.wait_for("every exporter scraped",
                      lambda: self.api.query_value(f'count(up{{job="{states.JOB}"}} == 1)'),
                      lambda found: found == live)
        cells = len(self.expected_cells())
        self.wait_for("the state of every cell",
                      lambda: self.api.query_value(f"count({states.STATE_INFO})"),
                      lambda found: found == cells)
        first = time.time()
        self.wait_for("more evaluations", lambda: self.api.query_value("time()"),
                      lambda now: now is not None and now >= first + evaluations * self.interval)
        self.wait_for("history of the state", lambda: self.api.query_value(
            f"count({states.STATE_INFO} offset {evaluations * self.interval:g}s)"),
            lambda found: found == cells)

    # -- the service -----------------------------------------------------------------------------

    def ask_service(self, method: str, path: str, user: str | None = None,
                    body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """(HTTP status, JSON answer or None) of `gpuwatch serve` for `user` (none: no
        identity)."""
        request = urllib.request.Request(
            self.service_url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={**({SERVICE_USER_HEADER: user} if user else {}),
                     **({"Content-Type": "application/json"} if body is not None else {}),
                     **self.scraper_authorization()})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        return status, json.loads(text) if text else None

    def scraper_authorization(self) -> dict[str, str]:
        """The Authorization header of SCRAPER when the service has web users, else none."""
        if not self.web_users:
            return {}
        token = base64.b64encode(f"{SCRAPER}:{self.scraper_password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def claim(self, user: str, host: str, count: int = 1, minutes: int | None = None,
              ) -> dict[str, Any]:
        """Claims `count` free GPUs of `host` for `user` as `gpuwatch run` does; the claim
        (id, host, gpus, uuids, user, until). FleetError when the service refuses."""
        status, answer = self.ask_service("POST", "/api/v1/claims", user, {
            "count": count, "host": host, **({"minutes": minutes} if minutes else {})})
        if status != 201:
            raise FleetError(f"claim of {count} GPU(s) of {host} for {user}: HTTP {status} "
                             f"{answer}; serve log: {self.reservations_endpoint.log_tail()}")
        claim: dict[str, Any] = answer
        return claim

    def end_claim(self, claim: Mapping[str, Any]) -> None:
        """Ends a claim as its owner (as `gpuwatch run` does when its command ends)."""
        status, answer = self.ask_service("DELETE", f"/api/v1/claims/{claim['id']}",
                                          claim["user"])
        if status != 204:
            raise FleetError(f"ending claim {claim['id']}: HTTP {status} {answer}")

    def active_claims(self, at: float | None = None) -> list[dict[str, Any]]:
        """The claims the service holds (GET /api/v1/claims) that are still on at `at`."""
        status, answer = self.ask_service("GET", "/api/v1/claims")
        assert status == 200, (status, answer)
        now = time.time() if at is None else at
        return [c for c in answer["claims"]
                if dt.datetime.fromisoformat(c["until"]).timestamp() > now]

    # -- what the scenarios say ----------------------------------------------------------------

    def active_reservations(self, at: float | None = None) -> list[Reservation]:
        """The reservations of the reservations file that are active at `at` (now)."""
        now = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.timezone.utc)
        return [r for r in reservations.load(self.reservations_file, now) if r.active(now)]

    def expected_cells(self, at: float | None = None) -> dict[tuple[str, Cell], ExpectedCell]:
        """Every cell's state, users, model (a slice's profile and MIG UUID), memory,
        processes, booking and claim at `at` (now), by (host, cell), from the scenarios the
        exporters simulate (the simulator's own view of each GPU then), the thresholds the
        rules read, the reservations file and the claims the service holds; what the rules
        should find (prometheus/rules/state.yml; docs/prometheus.md, "GPU states" and "MIG
        slices").

        The cells: every GPU, except that a MIG-enabled GPU is none and each slice its NVML
        walks then is one. The state, the first that applies:
        down: the exporter is stopped (the inventory keeps the cells it had then, with their
        model, memory and booking), the GPU is lost (one lost before Prometheus saw it is a
        cell of its own without a model, MIG or not; one seen before keeps its model, a lost
        parent its slices) or one of its NVML calls hangs (the collection timeout gives up on
        it; Prometheus never saw its name); busy: booked, and the one who booked it has a
        process on it; claimed: an active claim covers it and it is not held; reserved:
        booked; idle: held and inactive for the idle duration (counted from when Prometheus
        or the exporter started, whichever is later: nothing earlier was seen), a GPU with
        utilisation below the idle threshold, a slice with no process on it; busy: held (a
        process on it, or memory used at or above the held threshold); free.
        A booking or a claim covers the cell it names and, where that is a MIG-enabled GPU,
        every slice of it; a booking of the host (all) covers every cell of it (booking_of:
        which of several the rules take).
        """
        now = time.time() if at is None else at
        t = self.thresholds()
        bookings = self.active_reservations(now)
        claims = [(c["host"], [Cell.from_json(g) for g in c["gpus"]], c["user"])
                  for c in self.active_claims(now)]
        expected: dict[tuple[str, Cell], ExpectedCell] = {}
        for running in self.nodes:
            host = running.host
            seen_for = now - max(self.prometheus_started, running.started)
            for r, answers in self._node_cells(running, now):
                booking = booking_of(bookings, host, r.cell)
                words = None if booking is None else describe(booking)
                claim = next((user for on, cells, user in claims
                              if on == host and any(c.covers(r.cell) for c in cells)), None)
                if not answers:
                    expected[host, r.cell] = ExpectedCell(
                        host, r.cell, states.DOWN.name, (), r.model, r.memory_total, {}, 0,
                        words, claim, r.profile, r.mig_uuid)
                    continue
                user_memory: dict[str, float] = {}
                for p in r.processes:
                    user_memory[p.user] = user_memory.get(p.user, 0.0) + int(p.memory_bytes)
                users = tuple(sorted(user_memory))
                held = bool(r.processes) or r.memory_used >= t[HELD_MEMORY]
                inactive = not r.processes if r.utilization is None else \
                    r.utilization < t[IDLE_UTILIZATION]
                if booking is not None and booking.user in users:
                    state = states.BUSY
                elif claim is not None and not held:
                    state = states.CLAIMED
                elif booking is not None:
                    state = states.RESERVED
                elif held and inactive and seen_for >= t[IDLE_DURATION]:
                    state = states.IDLE
                elif held:
                    state = states.BUSY
                else:
                    state = states.FREE
                expected[host, r.cell] = ExpectedCell(
                    host, r.cell, state.name, users, r.model, r.memory_total, user_memory,
                    len(r.processes), words, claim, r.profile, r.mig_uuid)
        return expected

    def _node_cells(self, running: RunningNode, now: float
                    ) -> Iterator[tuple[_Reading, bool]]:
        """Each cell of a node the rules know at `now`, as its exporter last read it, and
        whether it answers then."""
        if running.scenario.hang:
            raise NotImplementedError(f"{running.node.scenario}: the oracle does not model "
                                      "NVML library calls that hang")
        stopped = running.stopped_at is not None and running.stopped_at <= now
        if stopped:
            assert running.stopped_at is not None
            now = running.stopped_at
        seen_from = max(self.prometheus_started, running.started)
        for index, gpu in enumerate(running.scenario.gpus):
            if gpu.missing_after_seconds is not None:
                raise NotImplementedError(f"{running.node.scenario}: the oracle does not model "
                                          "GPUs that leave NVML's count")
            if gpu.hang:  # the exporter gives up on it; Prometheus never saw its name
                if gpu.mig:
                    raise NotImplementedError(f"{running.node.scenario}: the oracle does not "
                                              "model MIG-enabled GPUs that hang")
                yield _Reading(Cell(index)), False
                continue
            readings = read_cells(running, index, now)
            if readings is not None:  # a stopped node's as they were when it stopped
                yield from ((r, not stopped) for r in readings)
                continue
            # lost (from the start: `lost`, an error of nvmlDeviceGetHandleByIndex)
            lost = running.started + (gpu.lost_after_seconds or 0.0)
            if lost <= seen_from:  # never seen: nothing but its index is known
                yield _Reading(Cell(index)), False
                continue
            if lost < seen_from + SEEN_SCRAPES * self.interval:
                raise NotImplementedError(f"{running.node.scenario}: GPU {index} is lost within "
                                          "Prometheus' first scrapes of it: seen or not, the "
                                          "oracle cannot tell")
            before = read_cells(running, index, lost - 1e-3)
            assert before is not None
            yield from ((dataclasses.replace(r, memory_total=None), False) for r in before)

    def expected(self, at: float | None = None) -> dict[tuple[str, int], ExpectedGpu]:
        """Every whole GPU of expected_cells at `at` (now), by (host, GPU index); a
        MIG-enabled GPU is no cell (its slices are in expected_cells)."""
        return {(host, cell.gpu): ExpectedGpu(host, cell.gpu, e.state, e.users, e.model,
                                              e.memory_total_bytes, e.user_memory,
                                              e.reservation, e.claim)
                for (host, cell), e in self.expected_cells(at).items() if not cell.is_slice}

    def expected_processes(self, at: float | None = None) -> list[ExpectedProcess]:
        """The processes the exporters report at `at` (now): what NVML lists, less those that
        exit while being read (they are skipped)."""
        now = time.time() if at is None else at
        expected: list[ExpectedProcess] = []
        for running in self.nodes:
            if running.stopped:
                continue
            node = SimulatedNode(running.scenario, clock=lambda: now, start=running.started)
            nvml = SimulatedNvml(node)
            for index, gpu in enumerate(running.scenario.gpus):
                if gpu.hang:
                    continue  # the exporter gives up on it
                try:
                    nvml.nvmlDeviceGetHandleByIndex(index)
                except NVMLError:
                    continue  # a lost GPU: nothing is read from it
                expected.extend(
                    ExpectedProcess(running.host, index, p.pid, p.process.user,
                                    p.process.command, p.process.gpu_instance_id)
                    for p in node.processes(index) if not p.process.vanished)
        return expected


def serve(path: Path, port: int, prometheus: str, log: Path, web_config: Path | None = None,
          admins: Sequence[str] = (), flags: Sequence[str] = ()) -> localstack.Service:
    """`gpuwatch serve` on 127.0.0.1:`port`, as on the monitoring host: the reservations file
    `path`, the fleet from `prometheus`; who asks comes from SERVICE_USER_HEADER (from
    127.0.0.1 only), and /metrics is open, as Prometheus scrapes it here. With `web_config`
    (write_web_config) every request but /-/healthy needs one of its basic-auth users, who is
    the asker unless the header names another; `admins`, `flags`: more of its flags."""
    return localstack.Service(
        f"gpuwatch serve on port {port}",
        [sys.executable, "-m", "gpuwatch.cli", "serve", "--reservations.file", str(path),
         "--web.listen-address", f"{LOCALHOST}:{port}", "--prometheus", prometheus,
         "--web.auth-header", SERVICE_USER_HEADER, "--web.trusted-proxies", LOCALHOST,
         *(["--web.config.file", str(web_config)] if web_config is not None else []),
         *(["--admins", ",".join(admins)] if admins else []), *flags],
        f"http://{LOCALHOST}:{port}/-/healthy", log)


def write_web_config(path: Path, users: Mapping[str, str]) -> None:
    """A web config whose basic-auth users are `users` (name -> password; bcrypt's fewest
    rounds: the tests check passwords on every request)."""
    path.write_text(yaml.safe_dump({"basic_auth_users": {
        name: bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        for name, password in users.items()}}))


def read_cells(running: RunningNode, index: int, at: float) -> list[_Reading] | None:
    """The cells of GPU `index` of a node as its exporter reads them at `at`: the GPU, or
    for a MIG-enabled one each slice its NVML walks (a GPU instance, named by its compute
    instance 0's MIG UUID); None when it cannot be opened then (lost)."""
    node = SimulatedNode(running.scenario, clock=lambda: at, start=running.started)
    nvml = SimulatedNvml(node)
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except NVMLError:
        return None
    model = nvml.nvmlDeviceGetName(handle)
    try:
        mig = nvml.nvmlDeviceGetMigMode(handle)[0] == 1
    except NVMLError:  # a GPU that cannot do MIG
        mig = False
    listed = tuple(p.process for p in node.processes(index) if not p.process.vanished)
    if not mig:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return [_Reading(Cell(index), model, float(memory.total), float(memory.used), listed,
                         nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)]
    instances: dict[int, dict[int, Any]] = {}
    for place in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            device = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, place)
        except NVMLError:
            continue  # no MIG device in that place
        instances.setdefault(nvml.nvmlDeviceGetGpuInstanceId(device), {})[
            nvml.nvmlDeviceGetComputeInstanceId(device)] = device
    cells = []
    for instance, devices in instances.items():
        if 0 not in devices and len(devices) > 1:
            raise NotImplementedError(f"{running.node.scenario}: GPU instance {instance} of "
                                      f"GPU {index} has compute instances but not 0: which "
                                      "one's MIG UUID the rules take is topk's choice")
        compute, device = (0, devices[0]) if 0 in devices else next(iter(devices.items()))
        (profile,) = {m.profile for m in running.scenario.gpus[index].mig
                      if (m.gpu_instance_id, m.compute_instance_id) == (instance, compute)}
        memory = nvml.nvmlDeviceGetMemoryInfo(device)
        cells.append(_Reading(Cell(index, instance), model, float(memory.total),
                              float(memory.used),
                              tuple(p for p in listed if p.gpu_instance_id == instance),
                              None, profile, nvml.nvmlDeviceGetUUID(device)))
    return cells


def booking_of(bookings: Sequence[Reservation], host: str, cell: Cell) -> Reservation | None:
    """The booking of `bookings` (active ones) the rules give `cell` of `host`: the cell's
    own, else, for a slice, its whole GPU's, else the host's (every GPU); of several at the
    first of these that has one, the one that ends last (topk)."""
    on_host = [r for r in bookings if r.host == host]
    for named in (cell, cell.whole if cell.is_slice else None, "all"):
        found = [r for r in on_host
                 if (r.gpus is None if named == "all" else r.gpus is not None and named in r.gpus)]
        if found:
            return max(found, key=lambda r: r.until)
    return None


def describe(reservation: Reservation) -> str:
    """A reservation in words, as the rules write it in the reservation label."""
    note = f" ({reservation.comment})" if reservation.comment else ""
    return f"{reservation.user} until {reservations.short(reservation.until)}{note}"
