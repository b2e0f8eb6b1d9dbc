"""One collection per scrape, shared, bounded in time, one worker per GPU.

The rules (Prometheus' "Writing exporters": read on scrape) with three guards:
- scrapes that arrive while a collection runs wait for it and share its result;
- a collection ends at its deadline: a GPU whose NVML call hangs is reported as a failed
  collection, and is not read again until that call returns, so /metrics keeps answering;
- GPUs are read concurrently (ctypes releases the GIL inside NVML), so a scrape costs
  about the slowest GPU rather than the sum.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from . import __version__, metrics
from .collectors import Collector, Device, family
from .nvml import GpuLost, Nvml, NVMLError, NvmlUnavailable, decode

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
"""Seconds a collection may take; well under Prometheus' default scrape timeout (10 s)."""


@dataclass
class _GpuResult:
    device: Device | None
    index: int
    lost: bool = False
    readings: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


class _Worker:
    """One daemon thread per GPU: a call hung in the driver never blocks the exporter's exit
    (ThreadPoolExecutor joins its threads at exit), and never takes another GPU's thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = \
            queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, job))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as e:  # handed to the waiting scrape
                    future.set_exception(e)


@dataclass(frozen=True)
class Collection:
    families: list[Metric]


class Exporter:
    """The prometheus_client collector that serves every gpuwatch metric."""

    def __init__(self, nvml: Nvml, collectors: Sequence[Collector],
                 timeout: float = DEFAULT_TIMEOUT,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self._nvml = nvml
        self._collectors = list(collectors)
        self._timeout = timeout
        self._timer = timer
        self._workers: dict[int, _Worker] = {}
        self._devices: dict[int, Device] = {}
        self._uuids: dict[int, str] = {}  # last known uuid, so a lost GPU keeps its series
        self._count = 0
        self._generation = -1
        self._busy: dict[int, Future[_GpuResult]] = {}
        self._flight_lock = threading.Lock()
        self._in_flight: Future[Collection] | None = None
        self._last_errors: dict[str, str | None] = {}

    # -- prometheus_client's Collector protocol ---------------------------------------------

    def collect(self) -> Iterable[Metric]:
        with self._flight_lock:
            flight = self._in_flight
            leader = flight is None
            if leader:
                flight = self._in_flight = Future()
        assert flight is not None
        if leader:
            try:
                flight.set_result(self._collect())
            except BaseException as e:  # shared with the waiting scrapes, then raised
                flight.set_exception(e)
            finally:
                with self._flight_lock:
                    self._in_flight = None
        return flight.result().families

    def close(self) -> None:
        for collector in self._collectors:
            collector.close()
        for worker in self._workers.values():
            worker.stop()

    # -- one collection ---------------------------------------------------------------------

    def _collect(self) -> Collection:
        start = self._timer()
        success: dict[str, bool] = {c.name: True for c in self._collectors}
        durations: dict[str, float] = {c.name: 0.0 for c in self._collectors}
        errors: dict[str, str] = {}
        out: list[Metric] = []
        answered: list[_GpuResult] = []
        devices: list[Device] = []
        running = list(self._collectors)
        if any(c.uses_nvml for c in self._collectors):  # else NVML is never loaded
            nvml_up = family(metrics.NVML_UP)
            out.append(nvml_up)
            try:
                self._nvml.ensure_initialized()
                self._open_devices()
            except NvmlUnavailable as e:
                self._devices.clear()
                nvml_up.add_metric([], 0)
                for c in self._collectors:
                    if c.uses_nvml:
                        success[c.name] = False
                        errors[c.name] = str(e)
                running = [c for c in self._collectors if not c.uses_nvml]
            else:
                nvml_up.add_metric([], 1)
                results = self._read_gpus(deadline=start + self._timeout)
                up = family(metrics.UP)
                for result in results:
                    uuid = result.device.uuid if result.device else \
                        self._uuids.get(result.index, "")
                    up.add_metric([str(result.index), uuid], 0 if result.lost else 1)
                    for name, message in result.errors.items():
                        success[name] = False
                        errors.setdefault(name, f"GPU {result.index}: {message}")
                    for name, seconds in result.durations.items():
                        durations[name] = max(durations[name], seconds)
                out.append(up)
                answered = [r for r in results if r.device is not None and not r.lost]
                devices = [d for _, d in sorted(self._devices.items())]

        for collector in running:
            name = collector.name
            readings = [(r.device, r.readings[name]) for r in answered
                        if r.device is not None and name in r.readings]
            began = self._timer()
            try:
                node = collector.read_node(self._nvml, devices)
                out.extend(collector.families(readings, node))
                problem = collector.problem()
                if problem is not None:
                    success[name] = False
                    errors.setdefault(name, problem)
            except (NVMLError, GpuLost, NvmlUnavailable, OSError, ValueError) as e:
                success[name] = False
                errors.setdefault(name, str(e))
            durations[name] += self._timer() - began
        self._log_errors(errors)
        return Collection(out + self._health(success, durations))

    def _open_devices(self) -> None:
        count = self._nvml.device_count()
        if count < self._count or self._generation != self._nvml.generation:
            # fewer GPUs than before (indices moved) or NVML initialised anew (handles stale)
            self._devices.clear()
            self._generation = self._nvml.generation
        for index in range(count):
            if index in self._devices:
                continue
            try:
                handle = self._nvml.handle(index)
                uuid = decode(self._nvml.call("nvmlDeviceGetUUID", handle))
                memory = self._nvml.query("nvmlDeviceGetMemoryInfo", handle)
            except (GpuLost, NVMLError) as e:
                log.debug("GPU %d cannot be opened: %s", index, e)
                continue
            self._uuids[index] = uuid
            self._devices[index] = Device(index, handle, uuid,
                                          float(memory.total) if memory is not None else None)
        self._count = count

    def _read_gpus(self, deadline: float) -> list[_GpuResult]:
        results: dict[int, _GpuResult] = {}
        pending: dict[int, Future[_GpuResult]] = {}
        for index in range(self._count):
            device = self._devices.get(index)
            if device is None:  # could not be opened: lost
                results[index] = _GpuResult(None, index, lost=True)
                continue
            hung = self._busy.get(index)
            if hung is not None and not hung.done():
                results[index] = self._timed_out(device, "an NVML call from an earlier "
                                                 "scrape has not returned")
                continue
            worker = self._workers.get(index)
            if worker is None:
                worker = self._workers[index] = _Worker(f"gpu{index}")
            pending[index] = self._busy[index] = worker.submit(partial(self._read_gpu, device))
        wait(pending.values(), timeout=max(0.0, deadline - self._timer()))
        for index, future in pending.items():
            if future.done():
                results[index] = future.result()
            else:
                results[index] = self._timed_out(self._devices[index],
                                                 f"no answer within {self._timeout:g} s")
        return [results[i] for i in sorted(results)]

    def _timed_out(self, device: Device, why: str) -> _GpuResult:
        failed = {c.name: why for c in self._collectors if _reads_gpus(c)}
        return _GpuResult(device, device.index, errors=failed)

    def _read_gpu(self, device: Device) -> _GpuResult:
        result = _GpuResult(device, device.index)
        for collector in self._collectors:
            if not _reads_gpus(collector):
                continue
            began = self._timer()
            try:
                result.readings[collector.name] = collector.read_gpu(self._nvml, device)
            except GpuLost as e:
                log.debug("GPU %d lost: %s", device.index, e)
                result.lost = True
                return result
            except NvmlUnavailable as e:
                result.errors[collector.name] = str(e)
                return result
            except Exception as e:  # one collector's failure must not cost the others
                result.errors[collector.name] = f"{type(e).__name__}: {e}"
            finally:
                result.durations[collector.name] = self._timer() - began
        return result

    def _health(self, success: dict[str, bool], durations: dict[str, float]) -> list[Metric]:
        ok = family(metrics.COLLECTOR_SUCCESS)
        took = family(metrics.COLLECTOR_DURATION)
        for name in success:
            ok.add_metric([name], 1 if success[name] else 0)
            took.add_metric([name], durations[name])
        build = GaugeMetricFamily(metrics.BUILD_INFO.name, metrics.BUILD_INFO.help,
                                  labels=metrics.BUILD_INFO.label_names)
        build.add_metric([__version__], 1)
        return [ok, took, build]

    def _log_errors(self, errors: dict[str, str]) -> None:
        """One line when a collector starts or stops failing, not one per scrape."""
        for c in self._collectors:
            message = errors.get(c.name)
            if message != self._last_errors.get(c.name):
                if message is None:
                    log.info("collector %s recovered", c.name)
                else:
                    log.error("collector %s failed: %s", c.name, message)
                self._last_errors[c.name] = message


def _reads_gpus(collector: Collector) -> bool:
    return type(collector).read_gpu is not Collector.read_gpu
