"""What `gpuwatch serve` serves on /metrics: the bookings exactly as the exporter's
reservation collector serves them (its code), the claims, and the collectors' health, through
the exporter's Exporter (which never loads NVML when no collector reads a GPU)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.process_collector import ProcessCollector

from gpuwatch.contract import metrics
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.collectors.reservation import ReservationCollector
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.scrape import Exporter
from gpuwatch.serve.claims import Claim, ClaimBook


class ClaimCollector(Collector):
    name = "claim"
    help = "GPUs held by claims (gpuwatch run), one series per claimed GPU or MIG slice (gpu " \
        "\"0/7\")"
    uses_nvml = False

    def __init__(self, claims: ClaimBook, clock: Callable[[], float] = time.time) -> None:
        self._claims, self._clock = claims, clock

    def read_node(self, nvml: Nvml, devices: Sequence[Device]) -> list[Claim]:
        return self._claims.active(self._clock())

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        ends = family(metrics.CLAIM_END)
        claims: list[Claim] = node
        for claim in claims:
            for gpu in claim.gpus:
                ends.add_metric([claim.host, str(gpu), claim.user, claim.id], claim.until)
        yield ends


def build_registry(reservations_file: Path, claims: ClaimBook,
                   clock: Callable[[], float] = time.time,
                   own_process_metrics: bool = True) -> tuple[CollectorRegistry, Exporter]:
    """The registry of /metrics, and the Exporter in it (close it at the end)."""
    exporter = Exporter(Nvml(), [ReservationCollector(reservations_file, clock=clock),
                                 ClaimCollector(claims, clock)])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    if own_process_metrics:
        ProcessCollector(registry=registry)
    return registry, exporter
