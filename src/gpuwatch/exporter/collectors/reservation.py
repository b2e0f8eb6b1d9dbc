"""Reservations: what the reservations file holds, as Prometheus series.

Read on every scrape, so a reservation made with `gpuwatch reserve` is seen on the next one and
a reservation that has ended drops out by itself. The file is parsed again only when it changed
(its inode, size or modification time); between changes a scrape costs one stat().

It needs no GPU: on the monitoring host it runs in an exporter of its own with the GPU
collectors off, where NVML is never touched. A file that cannot be used (a bad hand edit)
fails the collector and is logged once; the reservations read before are served meanwhile, so
booked GPUs do not turn free because of a typo.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from gpuwatch.contract import metrics
from gpuwatch.contract.states import ALL_GPUS
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.reservations.errors import ReservationError
from gpuwatch.reservations.model import Reservation, parse
from gpuwatch.reservations.times import short

log = logging.getLogger(__name__)


class ReservationCollector(Collector):
    name = "reservation"
    help = ("GPU bookings from the reservations file (gpuwatch reserve), read on each scrape; "
            "on with --reservations.file")
    uses_nvml = False

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._seen: tuple[int, int, int, int] | None = None
        self._reservations: list[Reservation] = []
        self._problem: str | None = None

    def read_node(self, nvml: Nvml, devices: Sequence[Device]) -> list[Reservation]:
        now = dt.datetime.fromtimestamp(self._clock(), dt.timezone.utc)
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            if self._seen != (0, 0, 0, 0):
                log.info("%s does not exist (yet): no bookings; gpuwatch reserve creates it",
                         self._path)
            self._seen, self._reservations, self._problem = (0, 0, 0, 0), [], None
        except OSError as e:
            self._problem = f"{self._path}: cannot read: {e.strerror}"
        else:
            seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            if seen != self._seen:
                self._seen = seen
                self._load(now)
        return [b for b in self._reservations if b.active(now)]

    def _load(self, now: dt.datetime) -> None:
        try:
            text = self._path.read_text(encoding="utf-8")
            self._reservations = parse(text, self._path, now)
            self._problem = None
        except ReservationError as e:
            self._problem = f"{e}; serving the {len(self._reservations)} bookings read before"
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            self._problem = f"{self._path}: cannot read: {reason}"
            self._seen = None  # try again on the next scrape

    def problem(self) -> str | None:
        return self._problem

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        ends = family(metrics.RESERVATION_END)
        reservations: list[Reservation] = node
        for b in reservations:
            for gpu in (ALL_GPUS,) if b.gpus is None else map(str, b.gpus):
                ends.add_metric([b.host, gpu, b.user, short(b.until), b.comment],
                                b.until.timestamp())
        yield ends
