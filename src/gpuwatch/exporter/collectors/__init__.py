"""The collectors: one per source, listed in one table, each toggled by a flag.

A collector reads per GPU (in that GPU's worker thread, so GPUs are read concurrently)
and/or once per node, and turns what it read into metric families. It never keeps
long-lived metric objects: every scrape builds fresh families from a fresh reading.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpuwatch.contract import metrics
from gpuwatch.exporter.nvml import Nvml

T = TypeVar("T")


@dataclass
class Device:
    """An opened GPU: what stays the same between scrapes."""

    index: int
    handle: Any
    uuid: str
    memory_total_bytes: float | None = None
    static: dict[str, Any] = field(default_factory=dict)
    """Per-collector cache of values that never change while the driver is loaded."""
    mig_instances: tuple[int, ...] = ()
    """The GPU instance ids of its MIG slices, as collector gpu last walked them (empty
    without MIG): the process collector gives each slice its roll-ups, free ones too."""

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        if key not in self.static:
            self.static[key] = compute()
        return cast(T, self.static[key])

    @property
    def labels(self) -> list[str]:
        return [str(self.index), self.uuid]


class Collector(ABC):
    name: ClassVar[str]
    help: ClassVar[str]
    uses_nvml: ClassVar[bool] = True
    """False for a collector that reads no GPU: an exporter with only such collectors never
    loads NVML (and reports no nvidia_gpu_nvml_up)."""
    proves_presence: ClassVar[bool] = False
    """True when read_gpu starts with a call that proves the GPU is there (GpuLost when it
    is not): as the first collector to read GPUs, it saves the scrape its UUID call."""

    def read_gpu(self, nvml: Nvml, device: Device) -> Any:
        """Read one GPU; runs in the GPU's worker thread. May raise GpuLost."""
        return None

    def read_node(self, nvml: Nvml, devices: Sequence[Device]) -> Any:
        """Read what is not per GPU; runs once per collection after the GPUs are read."""
        return None

    @abstractmethod
    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        """Turn the readings of the GPUs that answered into metric families."""

    def problem(self) -> str | None:
        """Why the families just built are not current (stale data served on purpose), or
        None; the collection then counts as failed though it served something."""
        return None

    def close(self) -> None:  # noqa: B027 (optional hook: most collectors hold nothing)
        """Release background resources."""


def family(metric: metrics.MetricDef) -> GaugeMetricFamily | CounterMetricFamily:
    """An empty family for a metric of the contract, with its label names."""
    if metric.kind == "counter":
        return CounterMetricFamily(metric.family_name, metric.help, labels=metric.label_names)
    return GaugeMetricFamily(metric.family_name, metric.help, labels=metric.label_names)
