"""Xid errors: the driver's reports of GPU faults, counted per GPU and Xid code.

Xid events are the one source not read on scrape: a background thread waits on an NVML
event set, so no event is missed between scrapes and a scrape never waits for one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric

from .. import metrics
from ..nvml import GpuLost, Nvml, NVMLError, NvmlUnavailable, decode
from . import Collector, Device, family

log = logging.getLogger(__name__)

WAIT_MS = 1000
Counts = dict[str, dict[int, tuple[int, float]]]
"""uuid -> Xid code -> (events, Unix time of the last one)."""


@dataclass(frozen=True)
class XidReading:
    counts: Counts
    devices: list[Device]


class XidWatcher:
    """Counts Xid events of an NVML event set: uuid -> xid -> (count, last seen)."""

    def __init__(self, nvml: Nvml, handles: list[Any], clock: Callable[[], float] = time.time
                 ) -> None:
        self._nvml = nvml
        self._clock = clock
        self._event_set = nvml.xid_event_set(handles)
        self._lock = threading.Lock()
        self._counts: Counts = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to timeout_ms for one event and count it; False when none came."""
        event = self._nvml.wait_event(self._event_set, timeout_ms)
        if event is None:
            return False
        uuid = decode(self._nvml.query("nvmlDeviceGetUUID", event.device) or "")
        xid = int(event.eventData)
        with self._lock:
            per_gpu = self._counts.setdefault(uuid, {})
            count, _ = per_gpu.get(xid, (0, 0.0))
            per_gpu[xid] = (count + 1, self._clock())
        log.warning("Xid %d on GPU %s", xid, uuid)
        return True

    def drain(self) -> None:
        while self.poll(0):
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(WAIT_MS)
            except (NVMLError, GpuLost, NvmlUnavailable) as e:
                self.error = f"waiting for Xid events failed: {e}"
                log.warning("%s; restarting the watcher on the next scrape", self.error)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAIT_MS / 1000 * 2)
        self._nvml.free_event_set(self._event_set)

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())

    def counts(self) -> Counts:
        with self._lock:
            return {uuid: dict(per_gpu) for uuid, per_gpu in self._counts.items()}


class XidCollector(Collector):
    name = "xid"
    help = "Xid error counters from an NVML event set watched in the background"

    def __init__(self, background: bool = True, clock: Callable[[], float] = time.time) -> None:
        self._background = background
        self._clock = clock
        self._watcher: XidWatcher | None = None
        self._handles: list[Any] = []
        # counts survive a watcher restart (driver reload), as counters must
        self._history: Counts = {}

    def read_node(self, nvml: Nvml, devices: Sequence[Device]) -> XidReading:
        handles = [d.handle for d in devices]
        if self._watcher is not None and (not self._watcher.alive or handles != self._handles):
            self._retire()
        if self._watcher is None:
            self._handles = handles
            self._watcher = XidWatcher(nvml, handles, self._clock)
            if self._background:
                self._watcher.start()
        if not self._background:
            self._watcher.drain()
        # every opened GPU, lost ones too: Xid 79 is how a GPU says it fell off the bus
        return XidReading(_merge(self._history, self._watcher.counts()), list(devices))

    def _retire(self) -> None:
        assert self._watcher is not None
        self._history = _merge(self._history, self._watcher.counts())
        self._watcher.stop()
        self._watcher = None

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        errors, last = family(metrics.XID_ERRORS), family(metrics.XID_LAST)
        reading: XidReading = node
        for device in reading.devices:
            for xid, (count, seen) in sorted(reading.counts.get(device.uuid, {}).items()):
                errors.add_metric(device.labels + [str(xid)], count)
                last.add_metric(device.labels + [str(xid)], seen)
        yield from (errors, last)

    def close(self) -> None:
        if self._watcher is not None:
            self._retire()


def _merge(a: Counts, b: Counts
           ) -> Counts:
    merged = {uuid: dict(per_gpu) for uuid, per_gpu in a.items()}
    for uuid, per_gpu in b.items():
        target = merged.setdefault(uuid, {})
        for xid, (count, seen) in per_gpu.items():
            old_count, old_seen = target.get(xid, (0, 0.0))
            target[xid] = (old_count + count, max(old_seen, seen))
    return merged
