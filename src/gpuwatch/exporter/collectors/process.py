"""Who holds each GPU: per-process series, per-user roll-ups and the users of each GPU."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

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
        instances: dict[int, int] = {}  # pid -> the MIG slice it runs on (MIG GPUs only)
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
                if p.gpu_instance_id is not None:
                    instances[p.pid] = p.gpu_instance_id
        if not answered:
            raise ProcessQueryUnavailable("no variant of the running-processes query answered")
        processes = []
        unresolved: dict[int, int] = {}
        for pid, used in sorted(running.items()):
            info = self._inspector.inspect(pid)
            if info is not None:  # else exited since NVML's list, or not in our pid namespace
                processes.append(GpuProcess(pid, used, info, instances.get(pid)))
            elif pid in instances:
                unresolved[instances[pid]] = unresolved.get(instances[pid], 0) + 1
        return ProcessReading(tuple(processes), unresolved=len(running) - len(processes),
                              unresolved_by_instance=unresolved)

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        count, users_info = family(metrics.PROCESSES), family(metrics.USERS_INFO)
        unresolved = family(metrics.PROCESSES_UNRESOLVED)
        user_memory, user_processes = family(metrics.USER_MEMORY), family(metrics.USER_PROCESSES)
        memory = _labelled(metrics.PROCESS_MEMORY, self._labels)
        start = _labelled(metrics.PROCESS_START, self._labels)
        dropped = family(metrics.PROCESS_DROPPED)
        slice_count, slice_users = family(metrics.MIG_PROCESSES), family(metrics.MIG_USERS_INFO)
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
            slices = _slices(device, reading)
            for (instance, user), own in _by_user(processes, bool(slices)).items():
                series = _with_instance(metrics.USER_PROCESSES.label_names, labels + [user],
                                        instance)
                _add(user_processes, series, len(own))
                held = [p.used_memory_bytes for p in own if p.used_memory_bytes is not None]
                if held:
                    _add(user_memory, series, sum(held))
            for instance in slices:
                on = [p for p in processes if p.gpu_instance_id == instance]
                gi = [str(instance)]
                slice_count.add_metric(labels + gi, len(on) + reading.unresolved_by_instance
                                       .get(instance, 0))
                slice_users.add_metric(labels + gi + [",".join(sorted({p.info.user
                                                                      for p in on}))], 1)
            kept = sorted(processes, key=lambda p: -(p.used_memory_bytes or 0))
            kept = kept[: self._options.max_per_gpu]
            with self._lock:
                self._dropped[device.uuid] += len(processes) - len(kept)
                dropped.add_metric(labels, self._dropped[device.uuid])
            names = metrics.DEVICE_LABELS + self._labels
            for (instance, values), (used, started) in self._series(kept).items():
                series = _with_instance(names, labels + list(values), instance)
                if used is not None:
                    _add(memory, series, used)
                _add(start, series, started)
        self._inspector.forget_others(p.pid for _, r in readings for p in r.processes)
        yield from (count, unresolved, users_info, user_memory, user_processes, memory, start,
                    dropped)
        # a node without MIG serves none of them, not even their HELP and TYPE lines
        yield from (f for f in (slice_count, slice_users) if f.samples)

    def _series(self, processes: Iterable[GpuProcess]
                ) -> dict[tuple[int | None, tuple[str, ...]], tuple[float | None, float]]:
        """(MIG slice, label values) -> (memory, start time); processes that share labels
        (no pid label) are summed, with the earliest start."""
        series: dict[tuple[int | None, tuple[str, ...]], tuple[float | None, float]] = {}
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
            key = (p.gpu_instance_id, tuple(values[label] for label in self._labels))
            if key in series:
                used, started = series[key]
                if p.used_memory_bytes is not None:
                    used = (used or 0) + p.used_memory_bytes
                series[key] = (used, min(started, info.start_time_seconds))
            else:
                series[key] = (p.used_memory_bytes, info.start_time_seconds)
        return series


def _slices(device: Device, reading: ProcessReading) -> list[int]:
    """The GPU instance ids of the GPU's MIG slices, free ones included: as collector gpu
    walked them, and any a process runs on (with collector gpu off, or a slice new since)."""
    found = dict.fromkeys(device.mig_instances)
    found.update(dict.fromkeys(p.gpu_instance_id for p in reading.processes
                               if p.gpu_instance_id is not None))
    found.update(dict.fromkeys(reading.unresolved_by_instance))
    return sorted(found)


def _by_user(processes: Iterable[GpuProcess], mig: bool
             ) -> dict[tuple[int | None, str], list[GpuProcess]]:
    """(MIG slice or None, user) -> their processes, sorted; per slice on a MIG GPU."""
    grouped: dict[tuple[int | None, str], list[GpuProcess]] = {}
    for p in processes:
        grouped.setdefault((p.gpu_instance_id if mig else None, p.info.user), []).append(p)
    return dict(sorted(grouped.items(), key=lambda item: (item[0][1], item[0][0] or 0)))


_Series = tuple[list[str], dict[str, str] | None]


def _with_instance(names: Sequence[str], values: list[str], instance: int | None) -> _Series:
    """A series' label values, and on a MIG slice its labels with gpu_instance_id added:
    the label a GPU without MIG does not carry (its series stay as they were)."""
    if instance is None:
        return values, None
    labels = dict(zip(names, values, strict=True))
    labels[metrics.MIG_PROCESS_LABEL] = str(instance)
    return values, labels


def _add(f: GaugeMetricFamily | CounterMetricFamily, series: _Series, value: float) -> None:
    values, labels = series
    if labels is None:
        f.add_metric(values, value)
    else:  # one more label than the family's: a sample of its own
        f.samples.append(Sample(f.name, labels, float(value), None))


def _labelled(metric: metrics.MetricDef, labels: tuple[str, ...]) -> GaugeMetricFamily:
    """The family with the process labels the options leave in."""
    return GaugeMetricFamily(metric.name, metric.help, labels=metrics.DEVICE_LABELS + labels)
