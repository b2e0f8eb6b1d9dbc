"""Many simulated GPU nodes in one process, for load work: `python -m tools.fleetsim`.

Every node is what gpuwatch-exporter serves for its simulated GPUs, built with the exporter's
own code (`ExporterOptions`, `simulated_sources`, `build_exporter`, `build_registry` and the web
`App`), so each /metrics answer holds the same families, names, labels and encodings
(OpenMetrics or text, gzip when asked) as a real exporter's. Each node listens on its own
loopback address, 127.1.0.1, 127.1.0.2, ... (only 127.0.0.0/8), all on one port, so
Prometheus sees one target per node with its own `instance`, and the repository's
relabelling derives `host` as it does in production (the targets file names each node).

What stands in for one exporter per machine:
- one asyncio loop accepts and reads the HTTP requests of every node; a small thread pool
  renders the answers (the collection and the exposition, most of the cost, hold the GIL);
- the Xid collector drains its event set on each scrape instead of one watcher thread per
  node (`xid_in_background=False`, as the tests do); each node keeps the exporter's one worker
  thread per GPU;
- with `--cache-seconds`, a node answers repeated scrapes within that time with the bytes
  of its last collection (for several scrapers of one fleet; off by default).

Processes: `--processes` per GPU, each held by one of `--users` users. With `--job-seconds`
every process slot runs jobs of that length back to back, each with a new pid and start time
(churn: every job is a new series of each per-process metric); without it they run for ever.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpuwatch.argtypes import non_negative_int, positive_int
from gpuwatch.exporter.main import (
    FlagError,
    build_exporter,
    build_registry,
    parse_flags,
    simulated_sources,
)
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.exporter.scrape import Exporter
from gpuwatch.exporter.web import App
from gpuwatch.sim import GIB, Scenario, SimGpu, SimProcess
from tools import localstack

PROG = "gpuwatch-fleetsim"
log = logging.getLogger("tools.fleetsim")

DEFAULT_BASE_ADDRESS = "127.1.0.1"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
TELEMETRY_PATH = "/metrics"
STATS_PATH = "/-/fleetsim"
"""JSON: the simulator's own figures (nodes, scrapes, render time, CPU, RSS)."""
RENDER_THREADS = 4
WORKER_STACK_BYTES = 256 * 1024
"""Stack of each GPU worker thread: thousands of them, each waiting on a queue."""
MAX_REQUEST_HEAD = 64 * 1024
PORT_ATTEMPTS = 5


class FleetSimError(Exception):
    """A fleet that cannot be built or served; the message says what to change."""


# -- the fleet ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetSpec:
    """A fleet of `gpus` GPUs on nodes of `gpus_per_node` (the last node takes the rest)."""

    gpus: int
    gpus_per_node: int = 8
    processes_per_gpu: int = 2
    users: int = 64
    """Distinct users holding the processes across the fleet."""
    job_seconds: float = 0.0
    """0: processes run for ever; else each process slot runs back-to-back jobs this long."""
    cluster_size: int = 100
    """Nodes per `cluster` target label (cluster-00, cluster-01, ...)."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise FleetSimError("a fleet needs at least one GPU and one GPU per node")
        if self.processes_per_gpu < 0 or self.users < 1 or self.cluster_size < 1:
            raise FleetSimError("processes per GPU must be 0 or more, users and the cluster "
                                "size 1 or more")
        if self.job_seconds < 0:
            raise FleetSimError("--job-seconds must be 0 (no churn) or more")
        if self.processes_per_gpu * self.job_seconds and self.job_seconds < 1:
            raise FleetSimError("--job-seconds below 1 s is not a job, it is noise")

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    def node_gpus(self, node: int) -> int:
        return min(self.gpus_per_node, self.gpus - node * self.gpus_per_node)

    def host(self, node: int) -> str:
        return f"node-{node + 1:05d}"

    def cluster(self, node: int) -> str:
        return f"cluster-{node // self.cluster_size:02d}"

    @property
    def jobs_per_day(self) -> float:
        """Jobs started per day across the fleet (0 without churn)."""
        if not self.job_seconds:
            return 0.0
        return self.gpus * self.processes_per_gpu * 86400 / self.job_seconds


def node_scenario(spec: FleetSpec, node: int) -> Scenario:
    """The simulated GPUs of one node: identical A100s, each with its processes.

    Pids are unique within the node; users are spread over the fleet so that per-user series
    and rules see `spec.users` users. With churn, a slot's jobs are staggered across the
    job length so that jobs end at an even pace rather than all at once.
    """
    gpus = []
    slots = max(1, spec.gpus_per_node * spec.processes_per_gpu)
    for index in range(spec.node_gpus(node)):
        processes = []
        for slot in range(spec.processes_per_gpu):
            n = index * spec.processes_per_gpu + slot
            seat = node * slots + n  # this slot's place in the fleet
            job = spec.job_seconds
            processes.append(SimProcess(
                pid=100_000 + n * 10_000, user=f"user{seat % spec.users:04d}",
                command="python", cmdline=f"python train.py --run {node}-{n}",
                memory_bytes=(4 + 2 * (n % 8)) * GIB, age_seconds=600.0 + 60 * n,
                period_seconds=job, active_seconds=job,
                offset_seconds=job * (seat % 97) / 97))
        gpus.append(SimGpu(processes=tuple(processes),
                           pci_bus_id=f"00000000:{0x17 + index * 0x10:02X}:00.0"))
    return Scenario(name=f"fleetsim/{spec.host(node)}", gpus=tuple(gpus))


def node_address(base: str, node: int) -> str:
    """The loopback address of node `node`: `base` + node; only inside 127.0.0.0/8."""
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError as e:
        raise FleetSimError(f"--base-address {base!r} is not an IPv4 address") from e
    address = first + node
    if first not in LOOPBACK or address not in LOOPBACK or address == LOOPBACK[-1]:
        raise FleetSimError(f"node {node + 1} would listen on {address}, outside 127.0.0.0/8 "
                            f"(base {base}): pick a lower --base-address or fewer nodes")
    return str(address)


# -- one node ----------------------------------------------------------------------------------

Response = tuple[str, list[tuple[str, str]], bytes]


@dataclass
class SimNode:
    """One simulated node: the exporter's registry behind the exporter's own web app."""

    index: int
    host: str
    cluster: str
    address: str
    exporter: Exporter
    app: App
    cache_seconds: float = 0.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[tuple[str, ...], tuple[float, Response]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def respond(self, method: str, target: str, headers: dict[str, str]) -> tuple[Response, bool]:
        """The answer to one request, and whether it came from the cache."""
        path, _, query = target.partition("?")
        key = (method, path, query, headers.get("accept", ""),
               headers.get("accept-encoding", ""))
        cacheable = self.cache_seconds > 0 and method == "GET" and path == TELEMETRY_PATH
        if cacheable:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None and self.clock() - hit[0] < self.cache_seconds:
                return hit[1], True
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
            "SERVER_NAME": self.address, "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
        }
        for name, value in headers.items():
            environ[f"HTTP_{name.upper().replace('-', '_')}"] = value
        started: list[Any] = []

        def start_response(status: str, response_headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, list(response_headers)]
            return lambda _: None

        began = self.clock()
        body = b"".join(self.app(environ, start_response))
        response: Response = (started[0], started[1], body)
        if cacheable:
            with self._lock:
                self._cache = {key: (began, response)}
        return response, False

    def close(self) -> None:
        self.exporter.close()


NODE_OPTIONS = ExporterOptions(telemetry_path=TELEMETRY_PATH, xid_in_background=False)
"""gpuwatch-exporter's defaults, but the Xid event set is drained on each scrape (no watcher
thread per node)."""


def exporter_options(flags: Sequence[str] = ()) -> ExporterOptions:
    """The nodes' options: gpuwatch-exporter's, from its own flags (--exporter-flag);
    FleetSimError for a bad one."""
    try:
        options = parse_flags(flags)
    except FlagError as e:
        raise FleetSimError(f"--exporter-flag {' '.join(flags)}: not valid for "
                            f"gpuwatch-exporter: {e}") from e
    return replace(options, telemetry_path=NODE_OPTIONS.telemetry_path,
                   xid_in_background=NODE_OPTIONS.xid_in_background)


def build_node(spec: FleetSpec, index: int, address: str,
               options: ExporterOptions = NODE_OPTIONS, cache_seconds: float = 0.0) -> SimNode:
    """A node as gpuwatch-exporter --simulate would serve it, with the exporter's options."""
    sources = simulated_sources(node_scenario(spec, index))
    exporter = build_exporter(options, sources)
    app = App(build_registry(exporter, options), options.telemetry_path)
    return SimNode(index, spec.host(index), spec.cluster(index), address, exporter, app,
                   cache_seconds)


def target_groups(nodes: Sequence[SimNode], port: int) -> list[dict[str, Any]]:
    """file_sd target groups: one per node, with its host and cluster."""
    return [{"targets": [f"{n.address}:{port}"],
             "labels": {"host": n.host, "cluster": n.cluster}} for n in nodes]


# -- serving -----------------------------------------------------------------------------------

@dataclass
class Stats:
    requests: int = 0
    cache_hits: int = 0
    render_seconds: float = 0.0
    slowest_render_seconds: float = 0.0
    errors: int = 0
    too_late: int = 0
    """Requests answered 503 unrendered: they had waited past the scraper's timeout."""
    started: float = field(default_factory=time.monotonic)

    def as_json(self, nodes: int, gpus: int) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"nodes": nodes, "gpus": gpus, "requests": self.requests,
                "cache_hits": self.cache_hits, "errors": self.errors,
                "too_late": self.too_late,
                "render_seconds": self.render_seconds,
                "slowest_render_seconds": self.slowest_render_seconds,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "uptime_seconds": time.monotonic() - self.started,
                "rss_bytes": _rss_bytes(), "threads": threading.active_count()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class FleetServer:
    """Every node on its own loopback address, one port, one event loop."""

    def __init__(self, spec: FleetSpec, nodes: Sequence[SimNode]) -> None:
        self.spec = spec
        self.nodes = list(nodes)
        self.stats = Stats()
        self._pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="render")
        self._sockets: list[socket.socket] = []
        self._stats_lock = threading.Lock()
        self.port = 0

    def prewarm(self) -> float:
        """One collection of every node, so the first scrapes cost what later ones do (the
        first opens the GPUs, starts their worker threads and looks every process up);
        returns the seconds it took."""
        began = time.monotonic()
        request = {"accept": "text/plain"}
        list(self._pool.map(lambda node: node.respond("GET", TELEMETRY_PATH, request),
                            self.nodes))
        return time.monotonic() - began

    def bind(self, port: int = 0) -> int:
        """Listens on every node's address with one port (a free one for 0); returns it."""
        for _ in range(PORT_ATTEMPTS if port == 0 else 1):
            try:
                self._bind_all(port)
                return self.port
            except OSError as e:
                self._close_sockets()
                if port != 0:
                    raise FleetSimError(f"cannot listen on port {port} of every node address: "
                                        f"{e.strerror}; pick another --port") from e
        raise FleetSimError("found no port free on every node address; pass --port")

    def _bind_all(self, port: int) -> None:
        for node in self.nodes:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((node.address, port))
            s.listen(64)
            s.setblocking(False)
            port = self.port = s.getsockname()[1]

    def _close_sockets(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets = []

    async def serve(self, stop: asyncio.Event) -> None:
        servers = []
        try:
            for node, sock in zip(self.nodes, self._sockets, strict=True):
                servers.append(await asyncio.start_server(
                    functools.partial(self._connection, node), sock=sock,
                    limit=MAX_REQUEST_HEAD))
            await stop.wait()
        finally:
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()

    async def _connection(self, node: SimNode, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.monotonic()
                method, target, version, headers = _parse_head(head)
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                if target == STATS_PATH:
                    body = json.dumps(self.stats.as_json(len(self.nodes), self.spec.gpus))
                    response: Response = ("200 OK", [("Content-Type", "application/json")],
                                          body.encode())
                else:
                    response = await loop.run_in_executor(
                        self._pool, self._render, node, method, target, headers,
                        arrived + _scrape_timeout(headers))
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                writer.write(_response_bytes(response, keep))
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass  # the scraper went away or spoke something else than HTTP/1.x
        finally:
            writer.close()

    def _render(self, node: SimNode, method: str, target: str, headers: dict[str, str],
                deadline: float) -> Response:
        if time.monotonic() > deadline:
            # the scraper has given up on this answer: rendering it would only delay the
            # next ones (an overloaded simulator must not fall further and further behind)
            with self._stats_lock:
                self.stats.too_late += 1
            return "503 Service Unavailable", [("Content-Type", "text/plain")], b"too late\n"
        began = time.perf_counter()
        try:
            response, cached = node.respond(method, target, headers)
        except Exception as e:  # a bug in one node must not take the fleet down
            log.exception("node %s: %s", node.host, e)
            with self._stats_lock:
                self.stats.errors += 1
            return "500 Internal Server Error", [("Content-Type", "text/plain")], b"error\n"
        took = time.perf_counter() - began
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.cache_hits += cached
            self.stats.render_seconds += took
            self.stats.slowest_render_seconds = max(self.stats.slowest_render_seconds, took)
        return response

    def close(self) -> None:
        self._close_sockets()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for node in self.nodes:
            node.close()


def _scrape_timeout(headers: dict[str, str]) -> float:
    """How long the scraper waits for this answer: Prometheus says so in a header."""
    try:
        return float(headers.get("x-prometheus-scrape-timeout-seconds", "inf"))
    except ValueError:
        return math.inf


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")
    headers = {}
    for line in lines:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
    return method, target, version, headers


def _response_bytes(response: Response, keep_alive: bool) -> bytes:
    status, headers, body = response
    connection = "keep-alive" if keep_alive else "close"
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", f"Connection: {connection}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the command -------------------------------------------------------------------------------

def build_fleet(spec: FleetSpec, base_address: str = DEFAULT_BASE_ADDRESS,
                cache_seconds: float = 0.0, exporter_flags: Sequence[str] = ()
                ) -> list[SimNode]:
    addresses = [node_address(base_address, n) for n in range(spec.nodes)]
    options = exporter_options(exporter_flags)
    return [build_node(spec, n, address, options, cache_seconds)
            for n, address in enumerate(addresses)]


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__
                                else None)
    p.add_argument("--gpus", type=positive_int, default=80, help="GPUs in the fleet "
                   "(default %(default)s)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8,
                   help="GPUs per node; the last node takes the rest (default %(default)s)")
    p.add_argument("--processes", type=non_negative_int, default=2,
                   help="processes per GPU (default %(default)s)")
    p.add_argument("--users", type=positive_int, default=64,
                   help="distinct users across the fleet (default %(default)s)")
    p.add_argument("--job-seconds", type=float, default=0.0, metavar="SECONDS",
                   help="churn: each process slot runs jobs this long back to back, each a "
                   "new pid; 0 runs processes for ever (default %(default)s)")
    p.add_argument("--cluster-size", type=positive_int, default=100,
                   help="nodes per cluster label (default %(default)s)")
    p.add_argument("--base-address", default=DEFAULT_BASE_ADDRESS,
                   help="the first node's address; node n listens on base + n, all within "
                   "127.0.0.0/8 (default %(default)s)")
    p.add_argument("--port", type=int, default=0,
                   help="the port every node listens on (default: a free one)")
    p.add_argument("--targets-file", type=Path, metavar="FILE",
                   help="write the file_sd targets (host and cluster labels) here once "
                   "every node listens")
    p.add_argument("--cache-seconds", type=float, default=0.0, metavar="SECONDS",
                   help="answer repeated scrapes of a node within this time from its last "
                   "collection (default %(default)s: every scrape collects)")
    p.add_argument("--exporter-flag", action="append", default=[], metavar="FLAG",
                   help="a gpuwatch-exporter flag for every node, e.g. "
                   "--exporter-flag=--no-process.pid (repeatable)")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=("debug", "info", "warn", "error"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper().replace("WARN", "WARNING"), stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)r")
    threading.stack_size(WORKER_STACK_BYTES)
    try:
        spec = FleetSpec(args.gpus, args.gpus_per_node, args.processes, args.users,
                         args.job_seconds, args.cluster_size)
        nodes = build_fleet(spec, args.base_address, args.cache_seconds, args.exporter_flag)
    except (FleetSimError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    server = FleetServer(spec, nodes)
    try:
        took = server.prewarm()
        log.info("collected every node once in %.1f s", took)
        port = server.bind(args.port)
        if args.targets_file:
            args.targets_file.parent.mkdir(parents=True, exist_ok=True)
            localstack.write_targets(args.targets_file, target_groups(nodes, port))
        log.info("serving %d nodes (%d GPUs, %d processes each) on %s port %d%s", spec.nodes,
                 spec.gpus, spec.processes_per_gpu, f"{nodes[0].address}-{nodes[-1].address}", port,
                 f", a new job every {spec.job_seconds:g} s per slot" if spec.job_seconds
                 else "")
        asyncio.run(_run(server))
    except FleetSimError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        server.close()
    return 0


async def _run(server: FleetServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.serve(stop)


if __name__ == "__main__":
    sys.exit(main())
