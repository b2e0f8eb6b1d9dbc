"""Simulated GPUs at the pynvml boundary, for the demo, the tests and the benchmarks.

`SimulatedNvml` has the pynvml functions the exporter calls, with the same names and
return types, and raises pynvml's own NVMLError classes, so `gpuwatch.exporter.nvml` runs every
line of its error mapping and version probing against it. `SimulatedPsutil` does the same
for psutil. Scenarios are YAML files (see scenarios/): GPUs, their processes and faults.
Load follows the processes and a slow wave, so graphs look alive; a frozen clock makes
every reading reproducible (the golden files).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

from gpuwatch.exporter import nvml as N
from gpuwatch.exporter.webconfig import parse_yaml, reject_unknown_keys

GIB = 1 << 30
MIB = 1 << 20

ERRORS = {
    "NotSupported": N.ERROR_NOT_SUPPORTED,
    "NoPermission": N.ERROR_NO_PERMISSION,
    "GPUIsLost": N.ERROR_GPU_IS_LOST,
    "Unknown": N.ERROR_UNKNOWN,
    "FunctionNotFound": N.ERROR_FUNCTION_NOT_FOUND,
    "Timeout": N.ERROR_TIMEOUT,
    "LibraryNotFound": N.ERROR_LIBRARY_NOT_FOUND,
    "DriverNotLoaded": N.ERROR_DRIVER_NOT_LOADED,
}
PROCESS_APIS = ("v3", "v2", "v1", "broken_v3")


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


# -- scenarios ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimProcess:
    pid: int
    user: str
    command: str
    memory_bytes: float
    cmdline: str = ""
    age_seconds: float = 3600.0
    kind: str = "compute"
    container_id: str = ""
    slurm_job_id: str = ""
    vanished: bool = False
    """NVML lists it but it has exited by the time the host is asked."""
    period_seconds: float = 0.0
    """With active_seconds: runs active_seconds of every period, with a new pid each time."""
    active_seconds: float = 0.0
    offset_seconds: float = 0.0


@dataclass(frozen=True)
class SimGpu:
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_bytes: float = 80 * GIB
    power_limit_watts: float = 400.0
    idle_power_watts: float = 60.0
    load: float = 0.85
    """Mean utilisation while a process runs (0 for a GPU held but idle)."""
    idle_temperature: float = 32.0
    load_temperature: float = 72.0
    slowdown_temperature: float = 87.0
    shutdown_temperature: float = 92.0
    max_clocks_mhz: Mapping[str, float] = field(default_factory=lambda: {
        "graphics": 1410, "sm": 1410, "memory": 1593, "video": 1275})
    fan: bool = False
    ecc: bool = True
    ecc_errors: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)
    """NVML function -> error name (see ERRORS) it raises on this GPU."""
    hang: tuple[str, ...] = ()
    """NVML functions that never return (until SimulatedNvml.release_hangs())."""
    lost_after_seconds: float | None = None
    back_after_seconds: float | None = None
    """With lost_after_seconds: answers again from then on (a GPU reset)."""
    missing_after_seconds: float | None = None
    """From then on the GPU is not in the device count (the GPUs after it move up)."""
    xid: tuple[tuple[int, float], ...] = ()
    """(Xid code, seconds after start) events."""
    processes: tuple[SimProcess, ...] = ()
    uuid: str = ""
    pci_bus_id: str = ""
    latency_seconds: float | None = None
    """Added to every NVML call on this GPU; None: the scenario's latency_seconds."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    driver_version: str = "550.54.15"
    cuda_version: int = 12040
    driver: bool = True
    """False: no driver, nvmlInit fails with NVML_ERROR_LIBRARY_NOT_FOUND."""
    process_api: str = "v3"
    """Which process query the driver has: v3, v2, v1, or broken_v3 (the 535 mismatch)."""
    latency_seconds: float = 0.0
    """Added to every NVML call on a GPU that sets no latency of its own (benchmarks)."""
    hang: tuple[str, ...] = ()
    """Library calls (nvmlInit, nvmlDeviceGetCount) that never return, until
    SimulatedNvml.release_hangs()."""
    gpus: tuple[SimGpu, ...] = ()

    @classmethod
    def synthetic(cls, gpus: int, processes: int, latency_seconds: float = 0.0,
                  slow_gpu_latency_seconds: float | None = None) -> Scenario:
        """A node of identical busy GPUs, `processes` each (benchmarks, fleet simulator).

        With slow_gpu_latency_seconds, the last GPU answers every call that slowly instead.
        """
        devices = []
        for i in range(gpus):
            procs = tuple(SimProcess(pid=10_000 + i * 1000 + j, user=f"user{j % 8}",
                                     command="python", cmdline=f"python job{j}.py",
                                     memory_bytes=256 * MIB) for j in range(processes))
            slow = slow_gpu_latency_seconds is not None and i == gpus - 1
            devices.append(SimGpu(processes=procs,
                                  latency_seconds=slow_gpu_latency_seconds if slow else None))
        return cls(name=f"synthetic-{gpus}x{processes}", gpus=tuple(devices),
                   latency_seconds=latency_seconds)


def scenario_names() -> list[str]:
    folder = resources.files(__name__) / "scenarios"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a scenario file by path."""
    path = Path(name_or_path)
    # os.path.exists, not Path.exists: a name that cannot be looked up (a working directory
    # the user may not enter) is a shipped scenario's name, not an error.
    if path.suffix in (".yaml", ".yml") or os.path.exists(path):
        try:
            text = path.read_text()
        except OSError as e:
            raise ScenarioError(f"{path}: cannot read the scenario file: {e.strerror}") from e
        return parse_scenario(text, str(path))
    if name_or_path not in scenario_names():
        raise ScenarioError(f"unknown scenario {name_or_path!r}: use one of "
                            f"{', '.join(scenario_names())} or the path of a scenario file")
    text = (resources.files(__name__) / "scenarios" / f"{name_or_path}.yaml").read_text()
    return parse_scenario(text, name_or_path)


def parse_scenario(text: str, source: str) -> Scenario:
    data = parse_yaml(text, source, ScenarioError)
    r = _Reader(source)
    top = r.mapping(data, "")
    defaults = r.mapping(top.get("gpu_defaults") or {}, "gpu_defaults")
    gpus = [{**defaults, **r.mapping(g, f"gpus[{i}]")}
            for i, g in enumerate(r.items(top, "gpus", required=True))]
    name = Path(source).stem if source.endswith((".yaml", ".yml")) else source
    scenario = Scenario(
        name=name,
        description=r.get(top, "description", str, ""),
        driver_version=r.get(top, "driver_version", str, Scenario.driver_version),
        cuda_version=r.get(top, "cuda_version", int, Scenario.cuda_version),
        driver=r.get(top, "driver", bool, True),
        process_api=r.choice(top, "process_api", PROCESS_APIS, "v3"),
        latency_seconds=r.get(top, "latency_seconds", float, 0.0),
        hang=tuple(str(f) for f in r.get(top, "hang", list, [])),
        gpus=tuple(_gpu(r, g, f"gpus[{i}]", i) for i, g in enumerate(gpus)),
    )
    r.no_other_keys(top, "", {"description", "driver_version", "cuda_version", "driver",
                              "process_api", "latency_seconds", "hang", "gpu_defaults", "gpus"})
    for f in scenario.hang:
        if f not in _LIBRARY_HANGS:
            raise ScenarioError(f"{source}: hang: {f!r} is not one of {', '.join(_LIBRARY_HANGS)} "
                                f"(a GPU's own calls hang under gpus[N].hang)")
    if scenario.latency_seconds < 0:
        raise ScenarioError(f"{source}: latency_seconds: must not be negative, got "
                            f"{scenario.latency_seconds}")
    for gpu in scenario.gpus:
        for f in (*gpu.errors, *gpu.hang):
            if not hasattr(SimulatedNvml, f):
                raise ScenarioError(f"{source}: {f!r} is not an NVML function the simulator "
                                    f"has (see gpuwatch/simulate.py)")
    return scenario


_LIBRARY_HANGS = ("nvmlInit", "nvmlDeviceGetCount")


def _gpu(r: _Reader, data: Any, where: str, index: int) -> SimGpu:
    g = r.mapping(data, where)
    default = SimGpu()
    errors = dict(r.get(g, "errors", dict, {}))
    for function, error in errors.items():
        if error not in ERRORS:
            raise ScenarioError(f"{r.source}: {where}.errors.{function}: unknown error "
                                f"{error!r}; use one of {', '.join(ERRORS)}")
    for function in r.get(g, "unsupported", list, []):
        errors[str(function)] = "NotSupported"
    if r.get(g, "lost", bool, False):
        errors["nvmlDeviceGetHandleByIndex"] = "GPUIsLost"
    xid = tuple((r.get(r.mapping(e, f"{where}.xid[{i}]"), "code", int, 0, f"{where}.xid[{i}]",
                       required=True),
                 r.get(e, "after_seconds", float, 0.0, f"{where}.xid[{i}]"))
                for i, e in enumerate(r.items(g, "xid")))
    gpu = SimGpu(
        name=r.get(g, "name", str, default.name),
        memory_bytes=r.get(g, "memory_gib", float, default.memory_bytes / GIB) * GIB,
        power_limit_watts=r.get(g, "power_limit_watts", float, default.power_limit_watts),
        idle_power_watts=r.get(g, "idle_power_watts", float, default.idle_power_watts),
        load=r.get(g, "load", float, default.load),
        idle_temperature=r.get(g, "idle_temperature", float, default.idle_temperature),
        load_temperature=r.get(g, "load_temperature", float, default.load_temperature),
        slowdown_temperature=r.get(g, "slowdown_temperature", float,
                                   default.slowdown_temperature),
        shutdown_temperature=r.get(g, "shutdown_temperature", float,
                                   default.shutdown_temperature),
        max_clocks_mhz=r.get(g, "max_clocks_mhz", dict, dict(default.max_clocks_mhz)),
        fan=r.get(g, "fan", bool, default.fan),
        ecc=r.get(g, "ecc", bool, default.ecc),
        ecc_errors=r.get(g, "ecc_errors", dict, {}),
        errors=errors,
        hang=tuple(str(f) for f in r.get(g, "hang", list, [])),
        lost_after_seconds=r.get(g, "lost_after_seconds", float, None),
        back_after_seconds=r.get(g, "back_after_seconds", float, None),
        missing_after_seconds=r.get(g, "missing_after_seconds", float, None),
        xid=xid,
        processes=tuple(_process(r, p, f"{where}.processes[{i}]")
                        for i, p in enumerate(r.items(g, "processes"))),
        uuid=r.get(g, "uuid", str, ""),
        pci_bus_id=r.get(g, "pci_bus_id", str, f"00000000:{0x17 + index * 0x10:02X}:00.0"),
        latency_seconds=r.get(g, "latency_seconds", float, None),
    )
    if not 0 <= gpu.load <= 1:
        raise ScenarioError(f"{r.source}: {where}.load: must be between 0 and 1, got {gpu.load}")
    if gpu.latency_seconds is not None and gpu.latency_seconds < 0:
        raise ScenarioError(f"{r.source}: {where}.latency_seconds: must not be negative, got "
                            f"{gpu.latency_seconds}")
    r.no_other_keys(g, where, {f for f in _GPU_KEYS})
    return gpu


_GPU_KEYS = {"name", "memory_gib", "power_limit_watts", "idle_power_watts", "load",
             "idle_temperature", "load_temperature", "slowdown_temperature",
             "shutdown_temperature", "max_clocks_mhz", "fan", "ecc", "ecc_errors", "errors",
             "unsupported", "lost", "hang", "lost_after_seconds", "back_after_seconds",
             "missing_after_seconds", "xid", "processes", "uuid", "pci_bus_id",
             "latency_seconds"}
_PROCESS_KEYS = {"pid", "user", "command", "cmdline", "memory_gib", "age_seconds", "kind",
                 "container_id", "slurm_job_id", "vanished", "period_seconds",
                 "active_seconds", "offset_seconds"}


def _process(r: _Reader, data: Any, where: str) -> SimProcess:
    p = r.mapping(data, where)
    r.no_other_keys(p, where, _PROCESS_KEYS)
    command = r.get(p, "command", str, "python")
    process = SimProcess(
        pid=r.get(p, "pid", int, 0, required=True),
        user=r.get(p, "user", str, "", required=True),
        command=command,
        cmdline=r.get(p, "cmdline", str, command),
        memory_bytes=r.get(p, "memory_gib", float, 1.0) * GIB,
        age_seconds=r.get(p, "age_seconds", float, 3600.0),
        kind=r.choice(p, "kind", ("compute", "graphics", "both"), "compute"),
        container_id=r.get(p, "container_id", str, ""),
        slurm_job_id=str(r.get(p, "slurm_job_id", int, 0) or ""),
        vanished=r.get(p, "vanished", bool, False),
        period_seconds=r.get(p, "period_seconds", float, 0.0),
        active_seconds=r.get(p, "active_seconds", float, 0.0),
        offset_seconds=r.get(p, "offset_seconds", float, 0.0),
    )
    if process.pid <= 0:
        raise ScenarioError(f"{r.source}: {where}.pid: must be a positive number")
    return process


@dataclass
class _Reader:
    """Reads scenario YAML with errors that name the file and the field."""

    source: str

    def mapping(self, data: Any, where: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ScenarioError(f"{self.source}: {where or 'the file'}: expected a mapping, "
                                f"got {type(data).__name__}")
        return data

    def items(self, data: dict[str, Any], key: str, required: bool = False) -> list[Any]:
        value = data.get(key)
        if value is None:
            if required:
                raise ScenarioError(f"{self.source}: missing key {key!r}")
            return []
        if not isinstance(value, list):
            raise ScenarioError(f"{self.source}: {key}: expected a list")
        return value

    def get(self, data: Any, key: str, kind: type, default: Any, where: str = "",
            required: bool = False) -> Any:
        if key not in data or data[key] is None:
            if required:
                raise ScenarioError(f"{self.source}: {where}: missing key {key!r}")
            return default
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ScenarioError(f"{self.source}: {where + '.' if where else ''}{key}: expected "
                                f"{kind.__name__}, got {value!r}")
        return value

    def choice(self, data: dict[str, Any], key: str, choices: tuple[str, ...], default: str
               ) -> str:
        value = data.get(key, default)
        if value not in choices:
            raise ScenarioError(f"{self.source}: {key}: {value!r} is not one of "
                                f"{', '.join(choices)}")
        return str(value)

    def no_other_keys(self, data: dict[str, Any], where: str, known: set[str]) -> None:
        reject_unknown_keys(self.source, f"{where}: " if where else "", data, known,
                            ScenarioError)


# -- the simulated node ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Handle:
    index: int


@dataclass(frozen=True)
class LiveProcess:
    pid: int
    process: SimProcess
    started: float


class SimulatedNode:
    """The state of the simulated GPUs at the clock's current time."""

    def __init__(self, scenario: Scenario, clock: Callable[[], float] = time.time,
                 start: float | None = None) -> None:
        self.scenario = scenario
        self.clock = clock
        self.start = clock() if start is None else start
        # find() answers from these rather than scanning every GPU (a pid look-up per
        # process per scrape would make the simulator, not the exporter, what benchmarks
        # measure): the first place of each steady pid, and every periodic process, in
        # the order processes() lists them
        self._steady: dict[int, tuple[tuple[int, int], SimProcess]] = {}
        self._periodic: list[tuple[tuple[int, int], SimProcess]] = []
        for index, gpu in enumerate(scenario.gpus):
            for n, p in enumerate(gpu.processes):
                if _periodic(p):
                    self._periodic.append(((index, n), p))
                else:
                    self._steady.setdefault(p.pid, ((index, n), p))

    def elapsed(self) -> float:
        return self.clock() - self.start

    def _live(self, p: SimProcess, now: float) -> LiveProcess | None:
        """The process as it runs at `now`; None while a periodic process is off."""
        if not _periodic(p):
            return LiveProcess(p.pid, p, self.start - p.age_seconds)
        cycle, phase = divmod(now - self.start + p.offset_seconds, p.period_seconds)
        if phase >= p.active_seconds:
            return None
        return LiveProcess(p.pid + 7 * int(cycle), p, now - phase)

    def processes(self, index: int) -> list[LiveProcess]:
        now = self.clock()
        return [live for p in self.scenario.gpus[index].processes
                if (live := self._live(p, now)) is not None]

    def busy(self, index: int) -> bool:
        """Whether a process runs on the GPU now."""
        now = self.clock()
        return any(self._live(p, now) is not None for p in self.scenario.gpus[index].processes)

    def utilization(self, index: int) -> float:
        gpu = self.scenario.gpus[index]
        if not self.busy(index) or gpu.load == 0:
            return 0.0
        wave = 0.08 * math.sin(2 * math.pi * self.elapsed() / 240 + index)
        return min(1.0, max(0.0, gpu.load + wave))

    def find(self, pid: int) -> LiveProcess | None:
        """The first live process with this pid, scanning the GPUs in order."""
        now = self.clock()
        steady = self._steady.get(pid)
        candidates = self._periodic if steady is None else sorted(
            [steady, *self._periodic], key=lambda candidate: candidate[0])
        for _, p in candidates:
            live = self._live(p, now)
            if live is not None and live.pid == pid:
                return live
        return None


def _periodic(p: SimProcess) -> bool:
    return bool(p.period_seconds and p.active_seconds)


class SimulatedNvml:
    """pynvml's functions over a SimulatedNode."""

    def __init__(self, node: SimulatedNode) -> None:
        self.node = node
        self.scenario = node.scenario
        self.driver_loaded = node.scenario.driver
        self._released = threading.Event()
        self._energy = {i: (node.clock(), 1e9) for i in range(len(node.scenario.gpus))}
        self._xid_delivered: set[tuple[int, int]] = set()
        self.calls: Counter[str] = Counter()
        """NVML function -> times called."""
        self._in_flight = 0
        self.peak_in_flight = 0
        """Most GPU calls that were under way at once (with latency_seconds)."""
        self.latency_spent: dict[int, float] = dict.fromkeys(range(len(node.scenario.gpus)), 0.0)
        """GPU index -> seconds of simulated latency its calls have taken so far."""
        self.last_answer = 0.0
        """time.perf_counter() when the latest GPU call with latency returned."""
        self._count_lock = threading.Lock()

    def release_hangs(self) -> None:
        self._released.set()

    # -- plumbing ----------------------------------------------------------------------------

    def _gpu(self, handle: _Handle, function: str) -> SimGpu:
        gpu = self.scenario.gpus[handle.index]
        with self._count_lock:
            self.calls[function] += 1
        latency = self.scenario.latency_seconds if gpu.latency_seconds is None \
            else gpu.latency_seconds
        if latency:
            with self._count_lock:
                self._in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            time.sleep(latency)
            with self._count_lock:
                self._in_flight -= 1
                self.latency_spent[handle.index] += latency
                self.last_answer = time.perf_counter()
        if function in gpu.hang:
            self._released.wait()
        if self._lost(gpu):
            raise N.NVMLError(N.ERROR_GPU_IS_LOST)
        error = gpu.errors.get(function)
        if error is not None:
            raise N.NVMLError(ERRORS[error])
        return gpu

    def _lost(self, gpu: SimGpu) -> bool:
        elapsed = self.node.elapsed()
        return gpu.lost_after_seconds is not None and elapsed >= gpu.lost_after_seconds and \
            (gpu.back_after_seconds is None or elapsed < gpu.back_after_seconds)

    def _visible(self) -> list[int]:
        """The scenario's GPU indices NVML counts now, in order."""
        elapsed = self.node.elapsed()
        return [i for i, g in enumerate(self.scenario.gpus)
                if g.missing_after_seconds is None or elapsed < g.missing_after_seconds]

    def _library_call(self, function: str) -> None:
        with self._count_lock:
            self.calls[function] += 1
        if function in self.scenario.hang:
            self._released.wait()

    def _check_driver(self) -> None:
        if not self.driver_loaded:
            raise N.NVMLError(N.ERROR_UNINITIALIZED)

    # -- library -----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._library_call("nvmlInit")
        if not self.driver_loaded:
            raise N.NVMLError(N.ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_driver()
        return self.scenario.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_driver()
        return self.scenario.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_driver()
        self._library_call("nvmlDeviceGetCount")
        return len(self._visible())

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check_driver()
        visible = self._visible()
        if not 0 <= index < len(visible):
            raise N.NVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        handle = _Handle(visible[index])
        self._gpu(handle, "nvmlDeviceGetHandleByIndex")
        return handle

    # -- identity ----------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, h: _Handle) -> str:
        gpu = self._gpu(h, "nvmlDeviceGetUUID")
        return gpu.uuid or _uuid(self.scenario.name, h.index)

    def nvmlDeviceGetName(self, h: _Handle) -> str:
        return self._gpu(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=gpu.pci_bus_id.encode())

    def nvmlDeviceGetVbiosVersion(self, h: _Handle) -> str:
        self._gpu(h, "nvmlDeviceGetVbiosVersion")
        return "92.00.45.00.06"

    def nvmlDeviceGetMigMode(self, h: _Handle) -> list[int]:
        gpu = self._gpu(h, "nvmlDeviceGetMigMode")
        if "A100" not in gpu.name and "H100" not in gpu.name and "H200" not in gpu.name:
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        return [0, 0]

    def nvmlDeviceGetComputeMode(self, h: _Handle) -> int:
        self._gpu(h, "nvmlDeviceGetComputeMode")
        return 0

    # -- load --------------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> SimpleNamespace:
        self._gpu(h, "nvmlDeviceGetUtilizationRates")
        util = self.node.utilization(h.index)
        return SimpleNamespace(gpu=round(util * 100), memory=round(util * 60))

    def _used(self, index: int) -> int:
        held = sum(p.process.memory_bytes for p in self.node.processes(index))
        return int(held + (2 * MIB if held == 0 else 300 * MIB))

    def nvmlDeviceGetMemoryInfo(self, h: _Handle, version: int | None = None
                                ) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetMemoryInfo")
        total = int(gpu.memory_bytes)
        used = min(self._used(h.index), total)
        if version is None:
            return SimpleNamespace(total=total, used=used, free=total - used)
        reserved = int(total * 0.006)
        return SimpleNamespace(version=version, total=total, reserved=reserved, used=used,
                               free=total - used - reserved)

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetTemperature")
        util = self.node.utilization(h.index)
        return round(gpu.idle_temperature + (gpu.load_temperature - gpu.idle_temperature) * util)

    def nvmlDeviceGetTemperatureThreshold(self, h: _Handle, threshold: int) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetTemperatureThreshold")
        if threshold == N.TEMPERATURE_THRESHOLD_SLOWDOWN:
            return round(gpu.slowdown_temperature)
        return round(gpu.shutdown_temperature)

    def _power_mw(self, index: int) -> float:
        gpu = self.scenario.gpus[index]
        util = self.node.utilization(index)
        return 1000 * (gpu.idle_power_watts + (gpu.power_limit_watts - gpu.idle_power_watts)
                       * 0.9 * util)

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:
        self._gpu(h, "nvmlDeviceGetPowerUsage")
        return round(self._power_mw(h.index))

    def nvmlDeviceGetEnforcedPowerLimit(self, h: _Handle) -> int:
        return round(self._gpu(h, "nvmlDeviceGetEnforcedPowerLimit").power_limit_watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: _Handle) -> int:
        self._gpu(h, "nvmlDeviceGetTotalEnergyConsumption")
        last, energy = self._energy[h.index]
        now = self.node.clock()
        energy += max(0.0, now - last) * self._power_mw(h.index)
        self._energy[h.index] = (now, energy)
        return round(energy)

    def nvmlDeviceGetFanSpeed(self, h: _Handle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetFanSpeed")
        if not gpu.fan:
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        return round(30 + 50 * self.node.utilization(h.index))

    def nvmlDeviceGetPerformanceState(self, h: _Handle) -> int:
        self._gpu(h, "nvmlDeviceGetPerformanceState")
        return 0 if self.node.busy(h.index) else 8

    def nvmlDeviceGetEncoderUtilization(self, h: _Handle) -> list[int]:
        self._gpu(h, "nvmlDeviceGetEncoderUtilization")
        return [0, 167000]

    def nvmlDeviceGetDecoderUtilization(self, h: _Handle) -> list[int]:
        self._gpu(h, "nvmlDeviceGetDecoderUtilization")
        return [0, 167000]

    def nvmlDeviceGetClockInfo(self, h: _Handle, clock_type: int) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetClockInfo")
        name = next(k for k, v in N.CLOCKS.items() if v == clock_type)
        util = self.node.utilization(h.index)
        return round(gpu.max_clocks_mhz.get(name, 1000) * (0.3 + 0.7 * util))

    def nvmlDeviceGetMaxClockInfo(self, h: _Handle, clock_type: int) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetMaxClockInfo")
        name = next(k for k, v in N.CLOCKS.items() if v == clock_type)
        return round(gpu.max_clocks_mhz.get(name, 1000))

    def nvmlDeviceGetSupportedClocksEventReasons(self, h: _Handle) -> int:
        self._gpu(h, "nvmlDeviceGetSupportedClocksEventReasons")
        return sum(N.CLOCK_EVENT_REASONS.values())

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: _Handle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetCurrentClocksEventReasons")
        reasons = N.CLOCK_EVENT_REASONS
        active = 0
        if self.node.utilization(h.index) == 0:
            active |= reasons["gpu_idle"]
        if self._power_mw(h.index) >= 0.95 * gpu.power_limit_watts * 1000:
            active |= reasons["sw_power_cap"]
        if self.nvmlDeviceGetTemperature(h, N.TEMPERATURE_GPU) >= gpu.slowdown_temperature:
            active |= reasons["hw_thermal_slowdown"] | reasons["sw_thermal_slowdown"]
        return active

    def nvmlDeviceGetTotalEccErrors(self, h: _Handle, error_type: int, counter_type: int
                                    ) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetTotalEccErrors")
        if not gpu.ecc:
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        name = next(k for k, v in N.ECC_TYPES.items() if v == error_type)
        return int(gpu.ecc_errors.get(name, 0))

    # -- processes: v3, v2 and v1 as drivers differ ------------------------------------------

    def _running(self, h: _Handle, function: str, kind: str, version: str) -> list[Any]:
        self._gpu(h, function)
        api = self.scenario.process_api
        order = {"v1": 1, "v2": 2, "v3": 3, "broken_v3": 3}
        if order[version] > order[api]:
            raise N.NVMLError(N.ERROR_FUNCTION_NOT_FOUND)
        procs = [p for p in self.node.processes(h.index) if p.process.kind in (kind, "both")]
        if api == "broken_v3" and version == "v3":
            # what a v2 driver's array looks like through the v3 struct: shifted fields
            return [SimpleNamespace(pid=p.pid << 32, usedGpuMemory=p.pid * (1 << 40))
                    for p in procs]
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=int(p.process.memory_bytes),
                                gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for p in procs]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, h: _Handle) -> list[Any]:
        return self._running(h, "nvmlDeviceGetComputeRunningProcesses_v3", "compute", "v3")

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h: _Handle) -> list[Any]:
        return self._running(h, "nvmlDeviceGetComputeRunningProcesses_v2", "compute", "v2")

    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list[Any]:
        return self._running(h, "nvmlDeviceGetComputeRunningProcesses", "compute", "v1")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, h: _Handle) -> list[Any]:
        return self._running(h, "nvmlDeviceGetGraphicsRunningProcesses_v3", "graphics", "v3")

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, h: _Handle) -> list[Any]:
        return self._running(h, "nvmlDeviceGetGraphicsRunningProcesses_v2", "graphics", "v2")

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: _Handle) -> list[Any]:
        return self._running(h, "nvmlDeviceGetGraphicsRunningProcesses", "graphics", "v1")

    # -- Xid events --------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> SimpleNamespace:
        self._check_driver()
        return SimpleNamespace(handles=[])

    def nvmlDeviceRegisterEvents(self, h: _Handle, event_types: int, event_set: Any) -> None:
        self._gpu(h, "nvmlDeviceRegisterEvents")
        event_set.handles.append(h)

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> SimpleNamespace:
        self._check_driver()
        elapsed = self.node.elapsed()
        for h in event_set.handles:
            for n, (code, after) in enumerate(self.scenario.gpus[h.index].xid):
                if after <= elapsed and (h.index, n) not in self._xid_delivered:
                    self._xid_delivered.add((h.index, n))
                    return SimpleNamespace(device=h, eventType=N.EVENT_TYPE_XID,
                                           eventData=code, gpuInstanceId=0xFFFFFFFF,
                                           computeInstanceId=0xFFFFFFFF)
        if timeout_ms:
            self._released.wait(min(timeout_ms, 200) / 1000)
        raise N.NVMLError(N.ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set: Any) -> None:
        pass


class SimulatedPsutil:
    """psutil's Process and errors over a SimulatedNode."""

    NoSuchProcess = psutil.NoSuchProcess
    AccessDenied = psutil.AccessDenied
    ZombieProcess = psutil.ZombieProcess

    def __init__(self, node: SimulatedNode) -> None:
        self.node = node

    def Process(self, pid: int) -> _SimProcessHandle:
        live = self.node.find(pid)
        if live is None or live.process.vanished:
            raise psutil.NoSuchProcess(pid)
        return _SimProcessHandle(pid, live)

    def read_cgroup(self, pid: int) -> str:
        live = self.node.find(pid)
        if live is None:
            return ""
        if live.process.container_id:
            return f"0::/system.slice/docker-{live.process.container_id}.scope\n"
        if live.process.slurm_job_id:
            return f"0::/slurm/uid_1000/job_{live.process.slurm_job_id}/step_0/task_0\n"
        return "0::/user.slice/user-1000.slice/session-1.scope\n"


@dataclass(frozen=True)
class _SimProcessHandle:
    pid: int
    live: LiveProcess

    def create_time(self) -> float:
        return self.live.started

    def username(self) -> str:
        return self.live.process.user

    def name(self) -> str:
        return self.live.process.command

    def cmdline(self) -> list[str]:
        return self.live.process.cmdline.split()

    @contextlib.contextmanager
    def oneshot(self) -> Iterator[None]:
        yield


def _uuid(scenario: str, index: int) -> str:
    """A stable, well-formed GPU UUID for a simulated device."""
    import hashlib

    digest = hashlib.sha256(f"{scenario}/{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
