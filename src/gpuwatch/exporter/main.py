"""gpuwatch-exporter: the flags, turned into options once, and the wiring that reads them."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry
from prometheus_client.process_collector import ProcessCollector

from gpuwatch import __version__
from gpuwatch.argtypes import non_negative_int, positive_float, positive_int
from gpuwatch.contract import ports
from gpuwatch.exporter.collectors import Collector
from gpuwatch.exporter.collectors.gpu import GpuCollector
from gpuwatch.exporter.collectors.process import GpuProcessCollector, ProcessOptions
from gpuwatch.exporter.collectors.reservation import ReservationCollector
from gpuwatch.exporter.collectors.xid import XidCollector
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.options import (
    COLLECTORS,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_PORT,
    CollectorEntry,
    ExporterOptions,
)
from gpuwatch.exporter.processes import ProcessInspector, read_proc_cgroup
from gpuwatch.exporter.scrape import DEFAULT_TIMEOUT, Exporter
from gpuwatch.exporter.web import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
    App,
    WebConfigSource,
    parse_listen_address,
    serve,
)
from gpuwatch.exporter.webconfig import ConfigError, load_display_names
from gpuwatch.sim import Scenario, SimulatedNode, SimulatedNvml, SimulatedPsutil, load_scenario
from gpuwatch.sim.scenario import scenario_names

__all__ = ["COLLECTORS", "DEFAULT_LISTEN_ADDRESS", "DEFAULT_PORT", "ExporterOptions"]

PROG = "gpuwatch-exporter"
RESERVATIONS_LISTEN_ADDRESS = f"127.0.0.1:{ports.RESERVATIONS_PORT}"
"""Where the reservations endpoint (this exporter with --reservations.file and the GPU
collectors off) listens on the monitoring host: beside Prometheus, which alone scrapes it."""

log = logging.getLogger("gpuwatch")


@dataclass(frozen=True)
class Sources:
    """Where NVML, psutil and the cgroup files come from: the host, or a simulated node."""

    nvml_lib: Any = None
    psutil: Any = None
    read_cgroup: Callable[[int], str] | None = None
    clock: Callable[[], float] = time.time


# -- the flags ---------------------------------------------------------------------------------

class FlagError(ValueError):
    """A flag parse_flags cannot take (argparse's message)."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
                 ) -> argparse.ArgumentParser:
    p = parser_class(
        prog=PROG, description="Prometheus exporter for NVIDIA GPUs and the processes and "
        "users holding them.")
    p.add_argument("--web.listen-address", dest="listen_address", default=DEFAULT_LISTEN_ADDRESS,
                   metavar="HOST:PORT", help="address to listen on (default %(default)s)")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                   metavar="PATH", help="path under which to expose metrics (default "
                   "%(default)s)")
    p.add_argument("--web.config.file", dest="web_config", type=Path, metavar="FILE",
                   help="exporter-toolkit web config: TLS (tls_server_config) and basic auth "
                   "(basic_auth_users with bcrypt hashes); re-read when it changes")
    p.add_argument("--web.max-connections", dest="max_connections", type=positive_int,
                   metavar="N", help="open connections at most; past it the one idle longest "
                   f"is closed (default {DEFAULT_MAX_CONNECTIONS}, fewer when the fd limit "
                   "is low)")
    p.add_argument("--web.read-timeout", dest="read_timeout", type=positive_float,
                   default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                   help="longest a client may take over a TLS handshake, a request or taking "
                   "its answer, and stay idle between requests (default %(default)s)")
    p.add_argument("--config.file", dest="config", type=Path, metavar="FILE",
                   help="exporter config: display_names (model name -> short name)")
    # None: not given on the command line; options_from_args decides
    for entry in COLLECTORS:
        p.add_argument(f"--collector.{entry.name}", dest=f"collector_{entry.name}",
                       action=argparse.BooleanOptionalAction, default=None,
                       help=f"{entry.help} (default {'on' if entry.enabled else 'off'})")
    p.add_argument("--collector.disable-defaults", dest="disable_defaults",
                   action="store_true", help="turn off the collectors that are on by default; "
                   "turn single ones back on with --collector.NAME (as node_exporter)")
    p.add_argument("--reservations.file", dest="reservations_file", type=Path, metavar="FILE",
                   help="the reservations file that gpuwatch reserve writes; turns the "
                   "reservation collector on (run it on the monitoring host, with the GPU "
                   "collectors off)")
    p.add_argument("--process.command", dest="process_command", default="name",
                   choices=("name", "cmdline", "none"),
                   help="the command label: process name, command line (truncated; may hold "
                   "secrets) or none (default %(default)s)")
    p.add_argument("--process.pid", dest="process_pid", action=argparse.BooleanOptionalAction,
                   default=True, help="a pid label on per-process series (default on); off "
                   "sums processes of one user and command")
    p.add_argument("--process.max-per-gpu", dest="process_max", type=non_negative_int, default=64,
                   metavar="N", help="per-process series per GPU, largest memory first "
                   "(default %(default)s); the rest are counted in "
                   "nvidia_gpu_process_series_dropped_total")
    p.add_argument("--collection.timeout", dest="timeout", type=positive_float,
                   default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="longest a collection may take before it is reported as failed "
                   "(default %(default)s)")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=("debug", "info", "warn", "error"), help="(default %(default)s)")
    p.add_argument("--simulate", metavar="SCENARIO",
                   help="serve simulated GPUs instead of the host's: a shipped scenario "
                   f"({', '.join(scenario_names())}) or a scenario YAML file")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _enabled(args: argparse.Namespace, entry: CollectorEntry) -> bool:
    """--collector.NAME / --no-collector.NAME when given, else the collector's default (off
    with --collector.disable-defaults), else on when the option it needs is given."""
    chosen: bool | None = getattr(args, f"collector_{entry.name}")
    if chosen is not None:
        return chosen
    if entry.implied_by is not None and getattr(args, entry.implied_by) is not None:
        return True
    return entry.enabled and not args.disable_defaults


def options_from_args(args: argparse.Namespace) -> ExporterOptions:
    """The options the parsed flags ask for: the one place flags become options."""
    return ExporterOptions(
        listen_address=args.listen_address,
        telemetry_path=args.telemetry_path,
        web_config_file=args.web_config,
        max_connections=args.max_connections,
        read_timeout=args.read_timeout,
        config_file=args.config,
        collectors=frozenset(e.name for e in COLLECTORS if _enabled(args, e)),
        reservations_file=args.reservations_file,
        process=ProcessOptions(command=args.process_command, pid=args.process_pid,
                               max_per_gpu=args.process_max),
        collection_timeout=args.timeout,
        log_level=args.log_level,
        simulate=args.simulate,
    )


def parse_flags(argv: Sequence[str]) -> ExporterOptions:
    """The options of gpuwatch-exporter flags, for a tool that passes them on (the fleet
    simulator's --exporter-flag): FlagError for a bad or unknown one, never an exit."""
    return options_from_args(build_parser(_RaisingParser).parse_args(list(argv)))


# -- the wiring --------------------------------------------------------------------------------

def build_collectors(options: ExporterOptions, sources: Sources) -> list[Collector]:
    """The collectors the options turn on, in the table's order, over the sources."""
    display_names = load_display_names(options.config_file)
    collectors: list[Collector] = []
    on = options.collectors
    if GpuCollector.name in on:
        collectors.append(GpuCollector(display_names))
    if GpuProcessCollector.name in on:
        inspector = ProcessInspector() if sources.psutil is None else \
            ProcessInspector(sources.psutil, sources.read_cgroup or read_proc_cgroup)
        collectors.append(GpuProcessCollector(inspector, options.process))
    if XidCollector.name in on:
        collectors.append(XidCollector(background=options.xid_in_background,
                                       clock=sources.clock))
    if ReservationCollector.name in on:
        path = options.reservations_file
        if path is None:
            raise ConfigError("--collector.reservation needs --reservations.file FILE")
        if not path.parent.is_dir():
            raise ConfigError(f"--reservations.file {path}: the directory {path.parent} does "
                              "not exist")
        collectors.append(ReservationCollector(path, clock=sources.clock))
    return collectors


def build_exporter(options: ExporterOptions, sources: Sources,
                   timer: Callable[[], float] = time.perf_counter) -> Exporter:
    """The Exporter of the options over the sources; ConfigError for an unusable config."""
    nvml = Nvml(sources.nvml_lib) if sources.nvml_lib is not None else Nvml()
    return Exporter(nvml, build_collectors(options, sources),
                    timeout=options.collection_timeout, timer=timer)


def build_registry(exporter: Exporter, options: ExporterOptions) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    if options.own_process_metrics:
        ProcessCollector(registry=registry)  # prometheus_client's: the exporter's own process_*
    return registry


def simulated_sources(scenario: Scenario, clock: Callable[[], float] = time.time) -> Sources:
    """A simulated node's NVML, psutil and cgroup files, all on one clock."""
    node = SimulatedNode(scenario, clock)
    ps = SimulatedPsutil(node)
    return Sources(nvml_lib=SimulatedNvml(node), psutil=ps, read_cgroup=ps.read_cgroup,
                   clock=node.clock)


def sources_for(options: ExporterOptions) -> Sources:
    """The host's, or the simulated node of --simulate."""
    return simulated_sources(load_scenario(options.simulate)) if options.simulate \
        else Sources()


def deprecation(options: ExporterOptions) -> str | None:
    """The warning for a way of running that goes in the next release, or None."""
    if options.reservations_file is not None and options.collectors <= {
            ReservationCollector.name}:
        return (f"{PROG} --collector.disable-defaults --reservations.file (the reservations "
                "endpoint) is deprecated and goes in the next release: run `gpuwatch serve "
                f"--reservations.file {options.reservations_file}` instead (the same metrics on "
                "the same port, plus the bookings API and claims; docs/api.md)")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    options = options_from_args(build_parser().parse_args(argv))
    logging.basicConfig(
        level=options.log_level.upper().replace("WARN", "WARNING"), stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)r")
    warning = deprecation(options)
    if warning is not None:
        log.warning("%s", warning)
    try:
        parse_listen_address(options.listen_address)
        if not options.telemetry_path.startswith("/"):
            raise ConfigError(f"--web.telemetry-path {options.telemetry_path!r} must start "
                              "with /")
        web_config = WebConfigSource.watch(options.web_config_file)
        exporter = build_exporter(options, sources_for(options))
    except (ConfigError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    app = App(build_registry(exporter, options), options.telemetry_path, web_config)
    try:
        server = serve(app, options.listen_address, options.max_connections,
                       options.read_timeout)
    except OSError as e:
        exporter.close()
        print(f"{PROG}: error: cannot listen on {options.listen_address}: {e.strerror}; pick "
              "another --web.listen-address", file=sys.stderr)
        return 2
    # serve_forever returns on SIGTERM; this covers one that comes before it runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    scheme = "https" if web_config.latest.tls is not None else "http"
    log.info("gpuwatch-exporter %s listening on %s://%s%s%s", __version__, scheme,
             options.listen_address, options.telemetry_path,
             f" (simulated: {options.simulate})" if options.simulate else "")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
        exporter.close()
    return 0
