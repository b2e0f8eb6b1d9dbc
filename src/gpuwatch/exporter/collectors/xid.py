"""Xid errors: the driver's reports of GPU faults, counted per GPU and Xid code.

Xid events are the one source not read on scrape: a background thread waits on an NVML
event set, so no event is missed between scrapes and a scrape never waits for one. The
thread makes every NVML call of its own (creating the set, registering the GPUs), so a GPU
that hangs there never holds up a scrape.

An event is counted first, under the uuid of the GPU whose handle it names, taken from the
GPUs the exporter opened: the GPU that reports Xid 79 has just fallen off the bus and
answers nothing, its UUID included. The set is rebuilt whenever the GPUs that answer
change, so a GPU that comes back is watched again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric

from gpuwatch.contract import metrics
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.nvml import GpuLost, Nvml, NVMLError, NvmlUnavailable, decode, handle_key

log = logging.getLogger(__name__)

WAIT_MS = 1000
Counts = dict[str, dict[int, tuple[int, float]]]
"""uuid -> Xid code -> (events, Unix time of the last one)."""


@dataclass(frozen=True)
class XidReading:
    counts: Counts
    devices: list[Device]


class XidCounts:
    """The counts of every watcher the collector had: counters survive a rebuilt set."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counts = {}

    def add(self, uuid: str, xid: int) -> None:
        with self._lock:
            per_gpu = self._counts.setdefault(uuid, {})
            count, _ = per_gpu.get(xid, (0, 0.0))
            per_gpu[xid] = (count + 1, self._clock())

    def snapshot(self) -> Counts:
        with self._lock:
            return {uuid: dict(per_gpu) for uuid, per_gpu in self._counts.items()}


class XidWatcher:
    """One NVML event set for the given GPUs, and the thread that waits on it."""

    def __init__(self, nvml: Nvml, devices: Sequence[Device], counts: XidCounts,
                 after: XidWatcher | None = None) -> None:
        self._nvml = nvml
        self._devices = list(devices)
        self._uuids = {handle_key(d.handle): d.uuid for d in devices}
        self._counts = counts
        self._after = after
        """The watcher this one replaces: it is waited for before this set is registered,
        so no event is counted by both."""
        self._event_set: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.unwatched: dict[str, str] = {}
        """uuid -> why the GPU could not be registered."""

    def open(self) -> None:
        """Create the set and register the GPUs (in the watcher's thread when it has one)."""
        if self._after is not None:
            self._after.join()
            self._after = None
        self._event_set = self._nvml.xid_event_set()
        for device in self._devices:
            why = self._nvml.register_xid(self._event_set, device.handle)
            if why is not None:
                self.unwatched[device.uuid] = why
                log.warning("GPU %d (%s): Xid events cannot be watched: %s", device.index,
                            device.uuid, why)

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to timeout_ms for one event and count it; False when none came."""
        event = self._nvml.wait_event(self._event_set, timeout_ms)
        if event is None:
            return False
        xid = int(event.eventData)
        uuid = self._uuids.get(handle_key(event.device))
        if uuid is None:  # not a GPU we opened: ask, but count it whatever the answer
            try:
                uuid = decode(self._nvml.query("nvmlDeviceGetUUID", event.device) or "")
            except NvmlUnavailable:
                uuid = ""
        self._counts.add(uuid, xid)
        log.warning("Xid %d on GPU %s", xid, uuid or "of unknown uuid")
        return True

    def drain(self) -> None:
        while self.poll(0):
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.open()
            while not self._stop.is_set():
                self.poll(WAIT_MS)
            self.drain()  # what came before the set is given up is counted still
        except (NVMLError, GpuLost, NvmlUnavailable) as e:
            self.error = f"waiting for Xid events failed: {e}"
            log.warning("%s; the watcher starts again on the next scrape", self.error)
        finally:
            self.free()

    def stop(self) -> None:
        """Ask the thread to end (after its current wait and a last drain); never blocks."""
        self._stop.set()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=WAIT_MS / 1000 * 3)

    def retire(self) -> None:
        """Without a thread: count what is pending, then give the set up."""
        try:
            if self._event_set is not None and self.error is None:
                self.drain()
        except (NVMLError, GpuLost, NvmlUnavailable) as e:
            log.warning("draining Xid events failed: %s", e)
        finally:
            self.free()

    def free(self) -> None:
        if self._event_set is not None:
            self._nvml.free_event_set(self._event_set)
            self._event_set = None

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())


class XidCollector(Collector):
    name = "xid"
    help = "Xid error counters from an NVML event set watched in the background"

    def __init__(self, background: bool = True, clock: Callable[[], float] = time.time) -> None:
        self._background = background
        self._counts = XidCounts(clock)
        self._watcher: XidWatcher | None = None
        self._watched: tuple[Any, ...] = ()
        self._seen: dict[str, Device] = {}
        """Every GPU opened, by uuid: a GPU's counts are served while it is down too (Xid 79
        is how a GPU says it fell off the bus)."""
        self._problem: str | None = None

    def read_node(self, nvml: Nvml, devices: Sequence[Device]) -> XidReading:
        """`devices`: the GPUs that answered this scrape; the set is rebuilt when they change."""
        for device in devices:
            if device.uuid:
                self._seen[device.uuid] = device
        watched = tuple((d.index, d.uuid, handle_key(d.handle)) for d in devices)
        previous = self._watcher
        if previous is not None and (not previous.alive or watched != self._watched):
            self._watcher = None
            if self._background:
                previous.stop()
            else:
                previous.retire()
        if self._watcher is None:
            self._watched = watched
            self._watcher = XidWatcher(nvml, devices, self._counts,
                                       after=previous if self._background else None)
            if self._background:
                self._watcher.start()
            else:
                try:
                    self._watcher.open()
                except (NVMLError, NvmlUnavailable):
                    self._watcher.free()
                    self._watcher = None
                    raise
        if not self._background:
            self._watcher.drain()
        died = previous.error if previous is not None and previous is not self._watcher \
            else None
        self._problem = died or self._why_not_watched(devices)
        return XidReading(self._counts.snapshot(),
                          sorted(self._seen.values(), key=lambda d: d.index))

    def _why_not_watched(self, devices: Sequence[Device]) -> str | None:
        watcher = self._watcher
        if watcher is None or watcher.error is not None:
            return watcher.error if watcher is not None else "no Xid watcher"
        unwatched = [f"GPU {d.index}: {watcher.unwatched[d.uuid]}" for d in devices
                     if d.uuid in watcher.unwatched]
        return "; ".join(unwatched) or None

    def problem(self) -> str | None:
        return self._problem

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        errors, last = family(metrics.XID_ERRORS), family(metrics.XID_LAST)
        reading: XidReading = node
        for device in reading.devices:
            for xid, (count, seen) in sorted(reading.counts.get(device.uuid, {}).items()):
                errors.add_metric(device.labels + [str(xid)], count)
                last.add_metric(device.labels + [str(xid)], seen)
        yield from (errors, last)

    def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        if self._background:
            watcher.stop()
            watcher.join()
        else:
            watcher.retire()
