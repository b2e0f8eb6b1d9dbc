"""Who holds each GPU: per-process series, per-user roll-ups and the users of each GPU."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import GaugeMetricFamily, Metric

from gpuwatch.contract import metrics
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.processes import ProcessInspector
from gpuwatch.exporter.readings import GpuProcess, ProcessReading

CommandMode = Literal["name", "cmdline", "none"]


class ProcessQueryUnavailable(Exception):
    """Neither the compute nor the graphics process query works with this driver."""


@dataclass(frozen=True)
class ProcessOptions:
    command: CommandMode = "name"
    """name: the process name; cmdline: the truncated command line (opt-in, may hold
    secrets); none: no command label."""
    pid: bool = True
    max_per_gpu: int = 64
    """Per-process series kept per GPU, largest memory first; the rest are counted."""


class GpuProcessCollector(Collector):
    name = "process"
    help = "processes on each GPU with user, command, memory and start time; per-user roll-ups"

    def __init__(self, inspector: ProcessInspector | None = None,
                 options: ProcessOptions | None = None) -> None:
        self._inspector = inspector or ProcessInspector()
        self._options = options or ProcessOptions()
        self._dropped: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._labels = tuple(label for label in metrics.PROCESS_LABELS
                             if not (label == "pid" and not self._options.pid)
                             and not (label == "command" and self._options.command == "none"))

    def read_gpu(self, nvml: Nvml, device: Device) -> ProcessReading:
        running: dict[int, float | None] = {}
        answered = False
        for kind in ("compute", "graphics"):
            found = nvml.running_processes(device.handle, kind, device.memory_total_bytes)
            if found is None:
                continue
            answered = True
            for p in found:
                # a pid in both lists (CUDA and graphics contexts) holds one allocation
                known = running.get(p.pid)
                used: float | None = p.used_memory_bytes
                running[p.pid] = used if known is None else max(known, used or 0)
        if not answered:
            raise ProcessQueryUnavailable("no variant of the running-processes query answered")
        processes = []
        for pid, used in sorted(running.items()):
            info = self._inspector.inspect(pid)
            if info is not None:  # else exited since NVML's list, or not in our pid namespace
                processes.append(GpuProcess(pid, used, info))
        return ProcessReading(tuple(processes), unresolved=len(running) - len(processes))

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        count, users_info = family(metrics.PROCESSES), family(metrics.USERS_INFO)
        unresolved = family(metrics.PROCESSES_UNRESOLVED)
        user_memory, user_processes = family(metrics.USER_MEMORY), family(metrics.USER_PROCESSES)
        memory = _labelled(metrics.PROCESS_MEMORY, self._labels)
        start = _labelled(metrics.PROCESS_START, self._labels)
        dropped = family(metrics.PROCESS_DROPPED)
        for device, reading in readings:
            labels = device.labels
            processes: tuple[GpuProcess, ...] = reading.processes
            # the GPU is held by every pid NVML lists, whether or not we can name its owner
            count.add_metric(labels, len(processes) + reading.unresolved)
            unresolved.add_metric(labels, reading.unresolved)
            by_user: dict[str, list[GpuProcess]] = {}
            for p in processes:
                by_user.setdefault(p.info.user, []).append(p)
            users = sorted(by_user)
            users_info.add_metric(labels + [",".join(users)], 1)
            for user in users:
                own = by_user[user]
                user_processes.add_metric(labels + [user], len(own))
                held = [p.used_memory_bytes for p in own if p.used_memory_bytes is not None]
                if held:
                    user_memory.add_metric(labels + [user], sum(held))
            kept = sorted(processes, key=lambda p: -(p.used_memory_bytes or 0))
            kept = kept[: self._options.max_per_gpu]
            with self._lock:
                self._dropped[device.uuid] += len(processes) - len(kept)
                dropped.add_metric(labels, self._dropped[device.uuid])
            for values, (used, started) in self._series(kept).items():
                series = labels + list(values)  # add_metric copies it
                if used is not None:
                    memory.add_metric(series, used)
                start.add_metric(series, started)
        self._inspector.forget_others(p.pid for _, r in readings for p in r.processes)
        yield from (count, unresolved, users_info, user_memory, user_processes, memory, start,
                    dropped)

    def _series(self, processes: Iterable[GpuProcess]
                ) -> dict[tuple[str, ...], tuple[float | None, float]]:
        """Label values -> (memory, start time); processes that share labels (no pid
        label) are summed, with the earliest start."""
        series: dict[tuple[str, ...], tuple[float | None, float]] = {}
        cmdline = self._options.command == "cmdline"
        for p in processes:
            info = p.info
            values = {
                "pid": str(p.pid),
                "user": info.user,
                "command": info.cmdline if cmdline else info.command,
                "container_id": info.container_id,
                "slurm_job_id": info.slurm_job_id,
            }
            key = tuple(values[label] for label in self._labels)
            if key in series:
                used, started = series[key]
                if p.used_memory_bytes is not None:
                    used = (used or 0) + p.used_memory_bytes
                series[key] = (used, min(started, info.start_time_seconds))
            else:
                series[key] = (p.used_memory_bytes, info.start_time_seconds)
        return series


def _labelled(metric: metrics.MetricDef, labels: tuple[str, ...]) -> GaugeMetricFamily:
    """The family with the process labels the options leave in."""
    return GaugeMetricFamily(metric.name, metric.help, labels=metrics.DEVICE_LABELS + labels)
