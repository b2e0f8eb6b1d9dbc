"""One collection per scrape, shared, bounded in time, one worker per GPU.

The rules (Prometheus' "Writing exporters": read on scrape) with three guards:
- scrapes that arrive while a collection runs wait for it and share its result;
- a collection ends at its deadline, and every NVML call is under it: initialisation and
  the device count run in a worker of their own, each GPU is opened and read in its own
  worker. A GPU whose call hangs is reported down (``nvidia_gpu_up 0``, reason
  ``timeout``, then ``hung``) and is not asked again until that call returns; a hung
  initialisation is ``nvidia_gpu_nvml_up 0``. /metrics keeps answering either way;
- GPUs are read concurrently (ctypes releases the GIL inside NVML), so a scrape costs
  about the slowest GPU rather than the sum.
A GPU is up only when it answered this scrape: positive evidence, never the lack of news.
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

from gpuwatch import __version__
from gpuwatch.contract import metrics
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.nvml import GpuLost, Nvml, NVMLError, NvmlUnavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
"""Seconds a collection may take; well under Prometheus' default scrape timeout (10 s)."""

# Why a GPU is down (nvidia_gpu_down_info's reason label); docs/prometheus.md lists them.
LOST = "lost"
"""NVML says so when asked for its handle or UUID (NVML_ERROR_GPU_IS_LOST, _UNKNOWN)."""
TIMEOUT = "timeout"
"""Its reading did not finish within the collection timeout."""
HUNG = "hung"
"""A call from an earlier scrape has not returned: it is not asked again until it does."""
OPEN_FAILED = "open_failed"
"""Its handle or UUID could not be had, for another reason (no permission, say)."""
MISSING = "missing"
"""No longer in NVML's device count (it was before)."""
DOWN_REASONS = (LOST, TIMEOUT, HUNG, OPEN_FAILED, MISSING)


@dataclass
class _GpuResult:
    index: int
    device: Device | None
    down: str | None = None
    """Why it did not answer this scrape (one of DOWN_REASONS); None when it did."""
    why: str = ""
    uuid: str = ""
    """Its uuid when it has no device (a missing GPU)."""
    readings: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


class _NoAnswer(Exception):
    """NVML's initialisation or device count did not return within the deadline."""


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


@dataclass
class _Outcome:
    """Each collector's success, time and first error in one collection."""

    success: dict[str, bool]
    durations: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, collectors: Sequence[Collector]) -> _Outcome:
        return cls({c.name: True for c in collectors}, {c.name: 0.0 for c in collectors})

    def fail(self, name: str, message: str) -> None:
        self.success[name] = False
        self.errors.setdefault(name, message)


class Exporter:
    """The prometheus_client collector that serves every gpuwatch metric."""

    def __init__(self, nvml: Nvml, collectors: Sequence[Collector],
                 timeout: float = DEFAULT_TIMEOUT,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self._nvml = nvml
        self._collectors = list(collectors)
        self._timeout = timeout
        self._timer = timer
        self._nvml_worker: _Worker | None = None
        self._nvml_busy: Future[tuple[int, int]] | None = None
        self._workers: dict[int, _Worker] = {}
        self._busy: dict[int, Future[_GpuResult]] = {}
        # index -> (NVML generation it was opened in, device); written by the GPU workers
        self._devices: dict[int, tuple[int, Device]] = {}
        self._devices_lock = threading.Lock()
        self._uuids: dict[int, str] = {}  # last known uuid, so a GPU that is down keeps it
        self._seen: dict[str, int] = {}  # every uuid opened -> its last index
        self._count = 0
        self._most = 0
        """The most GPUs NVML has counted: those beyond today's count are missing."""
        self._generation = -1
        self._flight_lock = threading.Lock()
        self._in_flight: Future[list[Metric]] | None = None
        self._last_errors: dict[str, str | None] = {}
        self._last_down: dict[int, str | None] = {}
        readers = [c for c in self._collectors if _reads_gpus(c)]
        self._proven_by_collector = bool(readers) and readers[0].proves_presence
        """The first collector's reading proves an opened GPU is there: no UUID call."""

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
        return flight.result()

    def close(self) -> None:
        for collector in self._collectors:
            collector.close()
        for worker in self._workers.values():
            worker.stop()
        if self._nvml_worker is not None:
            self._nvml_worker.stop()

    # -- one collection ---------------------------------------------------------------------

    def _collect(self) -> list[Metric]:
        """One collection, as node_exporter's execute(): NVML, then the GPUs (each in its
        worker), then every collector's turn; each collector's success and time reported."""
        deadline = self._timer() + self._timeout
        outcome = _Outcome.of(self._collectors)
        out: list[Metric] = []
        answered: list[tuple[Device, _GpuResult]] = []
        running = self._collectors
        if any(c.uses_nvml for c in self._collectors):  # else NVML is never loaded
            nvml_up, count = self._nvml_step(deadline, outcome)
            out.append(nvml_up)
            if count is None:
                running = [c for c in self._collectors if not c.uses_nvml]
            else:
                up, answered = self._gpus_step(count, deadline, outcome)
                out.extend(up)
        for collector in running:
            out.extend(self._execute(collector, answered, outcome))
        self._log_errors(outcome.errors)
        return out + self._health(outcome)

    def _nvml_step(self, deadline: float, outcome: _Outcome) -> tuple[Metric, int | None]:
        """nvidia_gpu_nvml_up and the number of GPUs; None, and every collector that reads
        GPUs failed, when NVML is not there or did not answer in time."""
        nvml_up = family(metrics.NVML_UP)
        try:
            count = self._open_nvml(deadline)
        except (NvmlUnavailable, _NoAnswer) as e:
            with self._devices_lock:
                self._devices.clear()
            nvml_up.add_metric([], 0)
            for c in self._collectors:
                if c.uses_nvml:
                    outcome.fail(c.name, str(e))
            return nvml_up, None
        nvml_up.add_metric([], 1)
        return nvml_up, count

    def _gpus_step(self, count: int, deadline: float, outcome: _Outcome
                   ) -> tuple[list[Metric], list[tuple[Device, _GpuResult]]]:
        """Every GPU read at once: nvidia_gpu_up and why, and the GPUs that answered. A
        collector failed where it failed on one GPU; its time is the slowest GPU's (they run
        concurrently)."""
        results = self._read_gpus(count, deadline)
        for result in results:
            for name, message in result.errors.items():
                outcome.fail(name, f"GPU {result.index}: {message}")
            for name, seconds in result.durations.items():
                outcome.durations[name] = max(outcome.durations[name], seconds)
        answered = [(r.device, r) for r in results if r.device is not None and r.down is None]
        return self._report_up(results), answered

    def _execute(self, collector: Collector, answered: Sequence[tuple[Device, _GpuResult]],
                 outcome: _Outcome) -> list[Metric]:
        """One collector's turn: what it reads once per node, then its families from that
        and the GPUs' readings; a failure costs this collector only."""
        name = collector.name
        out: list[Metric] = []
        readings = [(device, r.readings[name]) for device, r in answered if name in r.readings]
        began = self._timer()
        try:
            node = collector.read_node(self._nvml, [device for device, _ in answered])
            out.extend(collector.families(readings, node))
            problem = collector.problem()
            if problem is not None:
                outcome.fail(name, problem)
        except (NVMLError, GpuLost, NvmlUnavailable, OSError, ValueError) as e:
            outcome.fail(name, str(e))
        outcome.durations[name] += self._timer() - began
        return out

    # -- NVML itself: initialisation and the device count, under the deadline -----------------

    def _open_nvml(self, deadline: float) -> int:
        """The number of GPUs; NvmlUnavailable, or _NoAnswer when NVML did not answer in
        time (that call is waited for, not repeated, by the next scrapes)."""
        future = self._nvml_busy
        if future is None or future.done():
            if self._nvml_worker is None:
                self._nvml_worker = _Worker("nvml")
            future = self._nvml_busy = self._nvml_worker.submit(self._init_and_count)
        wait([future], timeout=max(0.0, deadline - self._timer()))
        if not future.done():
            raise _NoAnswer(f"NVML initialisation or device count did not return within "
                            f"{self._timeout:g} s")
        count, generation = future.result()
        if generation != self._generation or count < self._count:
            # NVML initialised anew (handles stale) or fewer GPUs than before (indices moved)
            with self._devices_lock:
                self._devices.clear()
            self._generation = generation
        self._count = count
        self._most = max(self._most, count)
        return count

    def _init_and_count(self) -> tuple[int, int]:
        self._nvml.ensure_initialized()
        return self._nvml.device_count(), self._nvml.generation

    # -- the GPUs, each in its own worker -----------------------------------------------------

    def _read_gpus(self, count: int, deadline: float) -> list[_GpuResult]:
        results: dict[int, _GpuResult] = {}
        pending: dict[int, Future[_GpuResult]] = {}
        for index in range(count):
            hung = self._busy.get(index)
            if hung is not None and not hung.done():
                results[index] = self._down(index, HUNG, "an NVML call from an earlier "
                                            "scrape has not returned")
                continue
            worker = self._workers.get(index)
            if worker is None:
                worker = self._workers[index] = _Worker(f"gpu{index}")
            pending[index] = self._busy[index] = worker.submit(
                partial(self._read_gpu, index, self._generation))
        wait(pending.values(), timeout=max(0.0, deadline - self._timer()))
        for index, future in pending.items():
            if future.done():
                results[index] = future.result()
            else:
                results[index] = self._down(index, TIMEOUT,
                                            f"no answer within {self._timeout:g} s")
        results.update(self._missing(count))
        return [results[i] for i in sorted(results)]

    def _missing(self, count: int) -> dict[int, _GpuResult]:
        """GPUs NVML no longer counts, after the ones it does, each with the uuid of a GPU
        opened before that is no longer there (lowest former index first)."""
        if count >= self._most:
            return {}
        with self._devices_lock:
            present = {device.uuid for _, device in self._devices.values()}
            seen = sorted(self._seen.items(), key=lambda item: item[1])
        gone = [u for u, _ in seen if u not in present]
        return {index: _GpuResult(index, None, MISSING, "no longer in NVML's device count",
                                  uuid=gone[slot] if slot < len(gone) else "")
                for slot, index in enumerate(range(count, self._most))}

    def _down(self, index: int, reason: str, why: str) -> _GpuResult:
        """A GPU that did not answer: every collector that reads GPUs failed on it."""
        failed = {c.name: why for c in self._collectors if _reads_gpus(c)}
        return _GpuResult(index, self._device(index), reason, why, errors=failed)

    def _device(self, index: int) -> Device | None:
        with self._devices_lock:
            opened = self._devices.get(index)
        return opened[1] if opened is not None and opened[0] == self._generation else None

    def _read_gpu(self, index: int, generation: int) -> _GpuResult:
        """Open the GPU if it is not (handle, UUID, memory size), prove it is there, read it.
        Runs in the GPU's worker."""
        with self._devices_lock:
            opened = self._devices.get(index)
        device = opened[1] if opened is not None and opened[0] == generation else None
        try:
            device = self._open_or_check(index, generation, device)
        except GpuLost as e:
            return _GpuResult(index, device, LOST, str(e))
        except (NVMLError, NvmlUnavailable) as e:
            return _GpuResult(index, device, OPEN_FAILED, str(e))
        return self._read_collectors(index, device)

    def _open_or_check(self, index: int, generation: int, device: Device | None) -> Device:
        """The GPU opened now, or the device opened before once its UUID still answers (or,
        where the first collector's reading proves it, once that reading answers)."""
        if device is None:
            device = self._open(index)
            with self._devices_lock:
                self._devices[index] = (generation, device)
        elif not self._proven_by_collector:
            self._nvml.uuid(device.handle)  # still there?
        return device

    def _read_collectors(self, index: int, device: Device) -> _GpuResult:
        """Every collector's reading of the GPU, each timed; one collector's failure costs
        only that collector, a lost GPU or NVML gone ends the reading."""
        result = _GpuResult(index, device)
        for collector in self._collectors:
            if not _reads_gpus(collector):
                continue
            began = self._timer()
            try:
                result.readings[collector.name] = collector.read_gpu(self._nvml, device)
            except GpuLost as e:
                result.down, result.why = LOST, str(e)
                return result
            except NvmlUnavailable as e:
                result.errors[collector.name] = str(e)
                return result
            except Exception as e:  # one collector's failure must not cost the others
                result.errors[collector.name] = f"{type(e).__name__}: {e}"
            finally:
                result.durations[collector.name] = self._timer() - began
        return result

    def _open(self, index: int) -> Device:
        handle = self._nvml.handle(index)
        uuid = self._nvml.uuid(handle)
        memory = self._nvml.query("nvmlDeviceGetMemoryInfo", handle)
        with self._devices_lock:  # a late answer from a hung open races the scrape thread
            self._uuids[index] = uuid
            self._seen[uuid] = index
        return Device(index, handle, uuid, float(memory.total) if memory is not None else None)

    # -- nvidia_gpu_up and why --------------------------------------------------------------

    def _report_up(self, results: Sequence[_GpuResult]) -> list[Metric]:
        up, down = family(metrics.UP), family(metrics.DOWN_INFO)
        for result in results:
            labels = [str(result.index), self._uuid(result)]
            up.add_metric(labels, 0 if result.down else 1)
            if result.down:
                down.add_metric(labels + [result.down], 1)
            if result.down != self._last_down.get(result.index):
                if result.down:
                    log.warning("GPU %d (%s) is down (%s): %s", result.index,
                                labels[1] or "uuid unknown", result.down, result.why)
                elif result.index in self._last_down:
                    log.info("GPU %d (%s) answers again", result.index, labels[1])
                self._last_down[result.index] = result.down
        return [up, down]

    def _uuid(self, result: _GpuResult) -> str:
        """The GPU's uuid: from its device, else the last one seen at its index, else the
        kernel driver's word for the GPU at that place in PCI order (NVML's order)."""
        if result.device is not None:
            return result.device.uuid
        if result.down == MISSING:
            return result.uuid
        known = self._uuids.get(result.index)
        if known is None:
            known = self._nvml.driver_uuid(result.index, self._count)
            if known:
                with self._devices_lock:
                    self._uuids[result.index] = known
        return known or ""

    def _health(self, outcome: _Outcome) -> list[Metric]:
        ok = family(metrics.COLLECTOR_SUCCESS)
        took = family(metrics.COLLECTOR_DURATION)
        for name, succeeded in outcome.success.items():
            ok.add_metric([name], 1 if succeeded else 0)
            took.add_metric([name], outcome.durations[name])
        build = GaugeMetricFamily(metrics.BUILD_INFO.name, metrics.BUILD_INFO.help,
                                  labels=metrics.BUILD_INFO.label_names)
        build.add_metric([__version__], 1)
        return [ok, took, build]

    def _log_errors(self, errors: dict[str, str]) -> None:
        """One line when collectors start or stop failing, not one per scrape: collectors
        that fail for the same reason (no driver) share it."""
        changed: dict[str | None, list[str]] = {}
        for c in self._collectors:
            message = errors.get(c.name)
            if message != self._last_errors.get(c.name):
                if message is not None or c.name in self._last_errors:
                    changed.setdefault(message, []).append(c.name)
                self._last_errors[c.name] = message
        for message, names in changed.items():
            which = f"collector{'s' if len(names) > 1 else ''} {', '.join(names)}"
            if message is None:
                log.info("%s recovered", which)
            else:
                log.error("%s failed: %s", which, message)


def _reads_gpus(collector: Collector) -> bool:
    return type(collector).read_gpu is not Collector.read_gpu
