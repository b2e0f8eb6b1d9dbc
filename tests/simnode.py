"""Builds exporters over simulated nodes for the tests: fresh registry, injected clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gpuwatch.exporter import encoding
from gpuwatch.exporter.main import build_collectors, build_registry, simulated_sources
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.exporter.scrape import Exporter
from gpuwatch.sim import Scenario, SimulatedNvml, load_scenario, parse_scenario

T0 = 1_800_000_000.0
"""The frozen clock of reproducible readings (2027-01-15)."""
OPTIONS = ExporterOptions(xid_in_background=False, own_process_metrics=False)
"""The exporter's defaults, without threads or series that make a reading irreproducible."""


@dataclass
class SimExporter:
    sim: SimulatedNvml
    exporter: Exporter
    registry: CollectorRegistry

    def value(self, metric: str, /, **labels: str) -> float | None:
        return self.registry.get_sample_value(metric, labels)

    def text(self) -> str:
        return encoding.text(self.registry).decode()

    def close(self) -> None:
        self.sim.release_hangs()
        self.exporter.close()


def scenario(yaml_or_name: str) -> Scenario:
    """A shipped scenario by name, or one written inline in a test."""
    if "\n" in yaml_or_name:
        return parse_scenario(yaml_or_name, "test-scenario")
    return load_scenario(yaml_or_name)


def build(source: str | Scenario, options: ExporterOptions = OPTIONS,
          clock: Callable[[], float] = lambda: T0, frozen_timer: bool = True) -> SimExporter:
    """An exporter over the simulated node; derive options from OPTIONS
    (`dataclasses.replace(OPTIONS, collection_timeout=0.3)`)."""
    s = scenario(source) if isinstance(source, str) else source
    sources = simulated_sources(s, clock)
    sim = sources.nvml_lib
    assert isinstance(sim, SimulatedNvml)
    kwargs = {"timer": lambda: 0.0} if frozen_timer else {}
    exporter = Exporter(Nvml(sim), build_collectors(options, sources),
                        timeout=options.collection_timeout, **kwargs)
    return SimExporter(sim, exporter, build_registry(exporter, options))
