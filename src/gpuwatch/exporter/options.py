"""What gpuwatch-exporter is asked to do, as data: one frozen object.

The flags become an `ExporterOptions` in one place (`main.options_from_args`); the wiring
(`main.build_collectors`, `main.build_exporter`, `main.build_registry`) reads only this
object. Tools and tests build exporters from `ExporterOptions(...)` or
`dataclasses.replace(...)`, never through the flag parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpuwatch.contract import ports
from gpuwatch.exporter.collectors.gpu import GpuCollector
from gpuwatch.exporter.collectors.process import GpuProcessCollector, ProcessOptions
from gpuwatch.exporter.collectors.reservation import ReservationCollector
from gpuwatch.exporter.collectors.xid import XidCollector
from gpuwatch.exporter.scrape import DEFAULT_TIMEOUT
from gpuwatch.exporter.web import DEFAULT_READ_TIMEOUT

DEFAULT_PORT = ports.EXPORTER_PORT
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"


@dataclass(frozen=True)
class CollectorEntry:
    name: str
    help: str
    enabled: bool
    implied_by: str | None = None
    """The flag dest of an option that turns the collector on when given (unless it is
    turned off explicitly); the collector needs that option."""


# The collectors, with their default state: each becomes --collector.NAME / --no-collector.NAME
COLLECTORS = (
    CollectorEntry(GpuCollector.name, GpuCollector.help, True),
    CollectorEntry(GpuProcessCollector.name, GpuProcessCollector.help, True),
    CollectorEntry(XidCollector.name, XidCollector.help, True),
    CollectorEntry(ReservationCollector.name, ReservationCollector.help, False,
                   implied_by="reservations_file"),
)
DEFAULT_COLLECTORS = frozenset(entry.name for entry in COLLECTORS if entry.enabled)


@dataclass(frozen=True)
class ExporterOptions:
    """Everything the exporter's wiring needs; the defaults are the flags' defaults."""

    listen_address: str = DEFAULT_LISTEN_ADDRESS
    telemetry_path: str = "/metrics"
    web_config_file: Path | None = None
    max_connections: int | None = None
    """None: the server's default (fewer when the fd limit is low)."""
    read_timeout: float = DEFAULT_READ_TIMEOUT
    config_file: Path | None = None
    """The exporter config (display_names)."""
    collectors: frozenset[str] = DEFAULT_COLLECTORS
    """The names of the collectors that run (COLLECTORS' names)."""
    reservations_file: Path | None = None
    process: ProcessOptions = field(default_factory=ProcessOptions)
    collection_timeout: float = DEFAULT_TIMEOUT
    log_level: str = "info"
    simulate: str | None = None
    """A shipped scenario's name or a scenario file: simulated GPUs instead of the host's."""
    xid_in_background: bool = True
    """A thread waits on the Xid event set; False drains it on each scrape (tests, the fleet
    simulator: no thread per exporter)."""
    own_process_metrics: bool = True
    """prometheus_client's process_* series of the exporter itself."""

    def __post_init__(self) -> None:
        unknown = self.collectors - {entry.name for entry in COLLECTORS}
        if unknown:
            raise ValueError(f"no such collector: {', '.join(sorted(unknown))}")
