"""The fast text writer writes the very bytes of prometheus_client's own."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from simnode import OPTIONS, build

from gpuwatch.exporter import encoding
from gpuwatch.exporter.collectors.process import ProcessOptions
from gpuwatch.exporter.main import build_registry
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.sim import Scenario, scenario_names


@pytest.mark.parametrize("name", scenario_names())
@pytest.mark.parametrize("options", [
    OPTIONS, replace(OPTIONS, process=ProcessOptions(command="cmdline", pid=False))])
def test_same_bytes_as_prometheus_client(name: str, options: ExporterOptions) -> None:
    node = build(name, options)
    families = list(node.registry.collect())
    node.close()
    registry = CollectorRegistry()
    registry.register(Frozen(families))
    assert encoding.text(registry) == generate_latest(registry)


def test_same_bytes_with_the_exporters_own_process_metrics() -> None:
    node = build(Scenario.synthetic(2, 3))
    registry = build_registry(node.exporter, replace(OPTIONS, own_process_metrics=True))
    families = list(registry.collect())
    node.close()
    frozen = CollectorRegistry()
    frozen.register(Frozen(families))
    assert encoding.text(frozen) == generate_latest(frozen)


def test_label_values_and_help_are_escaped() -> None:
    gauge = GaugeMetricFamily("x", 'help with \\ and\nnewline', labels=["command"])
    gauge.add_metric(['python -c "print(\\"hi\\")"\nx'], 1)
    counter = CounterMetricFamily("y", "a counter", labels=["a"])
    counter.add_metric(["plain"], float("inf"))
    registry = CollectorRegistry()
    registry.register(Frozen([gauge, counter]))
    assert encoding.text(registry) == generate_latest(registry)


def test_a_label_value_that_is_not_text_does_not_cost_the_page() -> None:
    gauge = GaugeMetricFamily("x", "x", labels=["command"])
    gauge.add_metric([b"\xff\xfeevil".decode("utf-8", "surrogateescape")], 1)
    gauge.add_metric(["fine"], 2)
    registry = CollectorRegistry()
    registry.register(Frozen([gauge]))
    page = encoding.text(registry).decode("utf-8")  # strict: valid UTF-8
    assert 'x{command="??evil"} 1.0' in page and 'x{command="fine"} 2.0' in page


def test_kinds_it_does_not_write_are_refused() -> None:
    histogram = HistogramMetricFamily("h", "h", buckets=[("1", 1), ("+Inf", 2)], sum_value=3)
    registry = CollectorRegistry()
    registry.register(Frozen([histogram]))
    assert encoding.text(registry) == generate_latest(registry)
    info = GaugeMetricFamily("i", "i")
    info.type = "info"
    registry = CollectorRegistry()
    registry.register(Frozen([info]))
    with pytest.raises(ValueError, match="does not handle info"):
        encoding.text(registry)


class Frozen:
    """A collector that returns the same families every time."""

    def __init__(self, families: list) -> None:  # type: ignore[type-arg]
        self.families = families

    def collect(self):  # type: ignore[no-untyped-def]
        return self.families
