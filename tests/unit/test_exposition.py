"""The fast writers write the very bytes of prometheus_client's own, text and OpenMetrics, and
hand what they do not know to the library, family by family."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.samples import Exemplar
from simnode import OPTIONS, build

from gpuwatch.exporter import encoding
from gpuwatch.exporter.collectors.process import ProcessOptions
from gpuwatch.exporter.main import build_registry
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.sim import Scenario, scenario_names


class Frozen:
    """A collector that returns the same families every time."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def registry_of(families: Iterable[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(Frozen(families))
    return registry


def assert_same_bytes(registry: CollectorRegistry) -> None:
    assert encoding.text(registry) == generate_latest(registry)
    assert encoding.openmetrics_text(registry) == openmetrics_latest(registry)


@pytest.mark.parametrize("name", scenario_names())
@pytest.mark.parametrize("options", [
    OPTIONS, replace(OPTIONS, process=ProcessOptions(command="cmdline", pid=False))])
def test_same_bytes_as_prometheus_client(name: str, options: ExporterOptions) -> None:
    node = build(name, options)
    families = list(node.registry.collect())
    node.close()
    assert_same_bytes(registry_of(families))


def test_same_bytes_with_the_exporters_own_process_metrics() -> None:
    node = build(Scenario.synthetic(2, 3))
    registry = build_registry(node.exporter, replace(OPTIONS, own_process_metrics=True))
    families = list(registry.collect())
    node.close()
    assert_same_bytes(registry_of(families))


def test_label_values_and_help_are_escaped() -> None:
    gauge = GaugeMetricFamily("x", 'help with \\ and\nnewline and "quotes"', labels=["command"])
    gauge.add_metric(['python -c "print(\\"hi\\")"\nx'], 1)
    counter = CounterMetricFamily("y", "a counter", labels=["a"])
    counter.add_metric(["plain"], float("inf"))
    assert_same_bytes(registry_of([gauge, counter]))


def test_a_label_value_that_is_not_text_does_not_cost_the_page() -> None:
    gauge = GaugeMetricFamily("x", "x", labels=["command"])
    gauge.add_metric([b"\xff\xfeevil".decode("utf-8", "surrogateescape")], 1)
    gauge.add_metric(["fine"], 2)
    page = encoding.text(registry_of([gauge])).decode("utf-8")  # strict: valid UTF-8
    assert 'x{command="??evil"} 1.0' in page and 'x{command="fine"} 2.0' in page


def families_the_fast_writer_does_not_know() -> list[Metric]:
    """Every kind and sample the fast writers leave to the library, between plain gauges."""
    def plain(name: str) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, f"plain {name}", labels=["gpu"])
        gauge.add_metric(["0"], 1)
        return gauge

    histogram = HistogramMetricFamily("h", "a histogram", labels=["gpu"])
    histogram.add_metric(["0"], [("0.5", 1), ("+Inf", 2)], 3.5)
    summary = SummaryMetricFamily("s", "a summary", count_value=4, sum_value=2.5)
    info = InfoMetricFamily("i", "an info", labels=["gpu"])
    info.add_metric(["0"], {"driver": "550.54"})
    stateset = StateSetMetricFamily("st", "a stateset", labels=["gpu"])
    stateset.add_metric(["0"], {"free": True, "busy": False})
    gauge_histogram = GaugeHistogramMetricFamily("gh", "a gauge histogram",
                                                 buckets=[("+Inf", 3)], gsum_value=7)
    timestamped = GaugeMetricFamily("t", "a sample with a timestamp")
    timestamped.add_metric([], 1, timestamp=1_800_000_000.5)
    created = CounterMetricFamily("c", "a counter with _created", created=1_700_000_000)
    created.add_metric([], 5, created=1_700_000_000)
    exemplar = CounterMetricFamily("e", "a counter with an exemplar", labels=["gpu"])
    exemplar.add_metric(["0"], 3)
    exemplar.samples[0] = exemplar.samples[0]._replace(
        exemplar=Exemplar({"trace_id": "abc"}, 1.0, 1_800_000_000))
    unit = GaugeMetricFamily("u_bytes", "a gauge with a unit", unit="bytes")
    unit.add_metric([], 10)
    reserved = GaugeMetricFamily("r", "a reserved label name", labels=["__gpu"])
    reserved.add_metric(["0"], 1)
    colon = GaugeMetricFamily("job:gpu:sum", "a recording-rule name")
    colon.add_metric([], 2)
    unknown = Metric("un", "an untyped metric", "unknown")
    unknown.add_sample("un", {}, 1)
    return [plain("a"), histogram, summary, plain("b"), info, stateset, gauge_histogram,
            timestamped, created, exemplar, unit, reserved, colon, unknown, plain("z")]


def test_what_the_fast_writer_does_not_know_is_the_librarys_byte_for_byte() -> None:
    registry = registry_of(families_the_fast_writer_does_not_know())
    assert_same_bytes(registry)
    assert encoding.openmetrics_text(registry).endswith(b"\n# EOF\n")
    assert encoding.openmetrics_text(registry).count(b"# EOF") == 1


def test_a_family_even_the_library_cannot_write_is_left_out_not_the_page(
        caplog: pytest.LogCaptureFixture) -> None:
    broken = Metric("broken", "a label value that is not a string", "histogram")
    broken.add_sample("broken_sum", {"gpu": 0}, 1)  # type: ignore[dict-item]
    gauge = GaugeMetricFamily("fine", "fine")
    gauge.add_metric([], 1)
    registry = registry_of([broken, gauge])
    with pytest.raises(AttributeError):  # the library's own writer fails the whole page
        generate_latest(registry)
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            assert encoding.text(registry) == b"# HELP fine fine\n# TYPE fine gauge\nfine 1.0\n"
            assert encoding.openmetrics_text(registry) == \
                b"# HELP fine fine\n# TYPE fine gauge\nfine 1.0\n# EOF\n"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["family broken left out of /metrics: prometheus_client cannot write it: "
                     "AttributeError: 'int' object has no attribute 'replace'"]  # once


@pytest.mark.parametrize(("accept", "writer", "content_type"), [
    ("", encoding.text, encoding.CONTENT_TYPE),
    ("text/plain;version=0.0.4", encoding.text, encoding.CONTENT_TYPE),
    ("application/openmetrics-text", encoding.openmetrics_text,
     encoding.OPENMETRICS_CONTENT_TYPE),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
     encoding.openmetrics_text, encoding.OPENMETRICS_CONTENT_TYPE + "; escaping=underscores"),
])
def test_negotiation_picks_the_fast_writer_where_the_library_picks_its_format(
        accept: str, writer: encoding.Writer, content_type: str) -> None:
    assert encoding.negotiate(accept) == (writer, content_type)


def test_a_format_the_fast_writers_do_not_write_is_the_librarys() -> None:
    write, content_type = encoding.negotiate(
        "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8")
    assert write not in (encoding.text, encoding.openmetrics_text)
    assert content_type.endswith("escaping=allow-utf-8")
    gauge = GaugeMetricFamily("fine", "fine")
    gauge.add_metric([], 1)
    assert write(registry_of([gauge])).endswith(b"# EOF\n")
