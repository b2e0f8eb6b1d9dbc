"""Scenarios: the simulated GPUs, their processes and faults, as data and as YAML files.

A scenario file (scenarios/*.yaml, or any path) is read into frozen dataclasses with errors
that name the file and the field; `SimulatedNode` runs a scenario on a clock.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from gpuwatch.exporter import nvml as N
from gpuwatch.yamlfile import parse_yaml, reject_unknown_keys

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
"""The error names a scenario uses -> the NVML error code SimulatedNvml raises."""
PROCESS_APIS = ("v3", "v2", "v1", "broken_v3")
LIBRARY_HANGS = ("nvmlInit", "nvmlDeviceGetCount")
"""The library calls (not a GPU's) a scenario may hang."""
_SCENARIOS = resources.files("gpuwatch.sim") / "scenarios"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


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
    gpu_instance_id: int | None = None
    """On a MIG GPU: the slice (GPU instance) it runs on; None elsewhere."""
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class SimMig:
    """One MIG device (a GPU instance with one compute instance) of a MIG-enabled GPU."""

    profile: str
    """As nvidia-smi names it: 1g.10gb, 3g.40gb (compute slices, memory)."""
    gpu_instance_id: int
    compute_instance_id: int = 0
    memory_bytes: float = 0.0
    gpu_slices: int = 1
    """Of the GPU's seven compute slices, how many the profile takes."""
    gone_after_seconds: float | None = None
    """From then on the slice no longer exists (MIG reconfigured); its handle fails."""
    created_after_seconds: float = 0.0
    """Until then the slice does not exist yet (made by a reconfiguration)."""


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
    pcie_generation: int = 4
    """The highest PCIe generation of the GPU and its slot."""
    pcie_width: int = 16
    """The most PCIe lanes of the GPU and its slot."""
    pcie_link: Mapping[str, int] = field(default_factory=dict)
    """The link as it runs (generation, width) where below the maxima: a degraded link."""
    pcie_replays: int = 0
    pcie_replays_per_hour: float = 0.0
    """Replays added per hour from the start: a link that keeps replaying."""
    remapped_rows: Mapping[str, int] = field(default_factory=dict)
    """correctable, uncorrectable (rows), pending, failure (0/1); where the GPU remaps rows
    (A100, H100 and later: see remaps_rows)."""
    retired_pages: Mapping[str, int] = field(default_factory=dict)
    """single_bit_ecc, double_bit_ecc (pages), pending (0/1); ECC GPUs before row
    remapping."""
    nvlink_links: int = 0
    nvlink_inactive: int = 0
    """Of the links, how many are down."""
    nvlink_errors: Mapping[str, int] = field(default_factory=dict)
    """crc_flit, crc_data, replay, recovery: errors summed over the links at the start."""
    nvlink_errors_per_hour: Mapping[str, float] = field(default_factory=dict)
    unsupported_fields: tuple[int, ...] = ()
    """nvmlDeviceGetFieldValues field ids this GPU's driver does not answer (NOT_SUPPORTED),
    though the functions that read them alone do: the exporter falls back to those."""
    mig: tuple[SimMig, ...] = ()
    """With slices: MIG is on; their processes are in `processes` with their instance ids."""
    mig_pending: bool = False
    """A MIG mode change waits for a GPU reset: the pending mode is the other one."""

    @property
    def remaps_rows(self) -> bool:
        """Row remapping replaced page retirement with the A100."""
        return any(model in self.name for model in _ROW_REMAPPING_MODELS)


_ROW_REMAPPING_MODELS = ("A100", "A30", "A800", "H100", "H200", "H800", "B200")


@dataclass(frozen=True)
class Scenario:
    name: str
    driver_version: str = "550.54.15"
    cuda_version: int = 12040
    driver: bool = True
    """False: no driver, nvmlInit fails with NVML_ERROR_LIBRARY_NOT_FOUND."""
    process_api: str = "v3"
    """Which process query the driver has: v3, v2, v1, or broken_v3 (the 535 mismatch)."""
    field_values: bool = True
    """False: the driver lacks nvmlDeviceGetFieldValues (older than 384), every value is
    asked through its own function."""
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
    return sorted(p.name.removesuffix(".yaml") for p in _SCENARIOS.iterdir()
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
    text = (_SCENARIOS / f"{name_or_path}.yaml").read_text()
    return parse_scenario(text, name_or_path)


def parse_scenario(text: str, source: str) -> Scenario:
    data = parse_yaml(text, source, ScenarioError)
    r = _Reader(source)
    top = r.mapping(data, "")
    defaults = r.mapping(top.get("gpu_defaults") or {}, "gpu_defaults")
    gpus = [{**defaults, **r.mapping(g, f"gpus[{i}]")}
            for i, g in enumerate(r.items(top, "gpus", required=True))]
    name = Path(source).stem if source.endswith((".yaml", ".yml")) else source
    r.get(top, "description", str, "")  # checked, for whoever reads the file; the code does not
    scenario = Scenario(
        name=name,
        driver_version=r.get(top, "driver_version", str, Scenario.driver_version),
        cuda_version=r.get(top, "cuda_version", int, Scenario.cuda_version),
        driver=r.get(top, "driver", bool, True),
        process_api=r.choice(top, "process_api", PROCESS_APIS, "v3"),
        field_values=r.get(top, "field_values", bool, True),
        latency_seconds=r.get(top, "latency_seconds", float, 0.0),
        hang=tuple(str(f) for f in r.get(top, "hang", list, [])),
        gpus=tuple(_gpu(r, g, f"gpus[{i}]", i) for i, g in enumerate(gpus)),
    )
    r.no_other_keys(top, "", {"description", "driver_version", "cuda_version", "driver",
                              "process_api", "field_values", "latency_seconds", "hang",
                              "gpu_defaults", "gpus"})
    for f in scenario.hang:
        if f not in LIBRARY_HANGS:
            raise ScenarioError(f"{source}: hang: {f!r} is not one of {', '.join(LIBRARY_HANGS)} "
                                f"(a GPU's own calls hang under gpus[N].hang)")
    if scenario.latency_seconds < 0:
        raise ScenarioError(f"{source}: latency_seconds: must not be negative, got "
                            f"{scenario.latency_seconds}")
    from gpuwatch.sim.nvml import SimulatedNvml  # here: nvml.py runs what this module reads

    for gpu in scenario.gpus:
        for f in (*gpu.errors, *gpu.hang):
            if not hasattr(SimulatedNvml, f):
                raise ScenarioError(f"{source}: {f!r} is not an NVML function the simulator "
                                    f"has (see gpuwatch/sim/nvml.py)")
    return scenario


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
        pcie_generation=r.get(g, "pcie_generation", int, default.pcie_generation),
        pcie_width=r.get(g, "pcie_width", int, default.pcie_width),
        pcie_link=_counts(r, g, where, "pcie_link", ("generation", "width")),
        pcie_replays=r.get(g, "pcie_replays", int, 0),
        pcie_replays_per_hour=r.get(g, "pcie_replays_per_hour", float, 0.0),
        remapped_rows=_counts(r, g, where, "remapped_rows",
                              ("correctable", "uncorrectable", "pending", "failure")),
        retired_pages=_counts(r, g, where, "retired_pages",
                              ("single_bit_ecc", "double_bit_ecc", "pending")),
        nvlink_links=r.get(g, "nvlink_links", int, 0),
        nvlink_inactive=r.get(g, "nvlink_inactive", int, 0),
        nvlink_errors=_counts(r, g, where, "nvlink_errors", NVLINK_ERROR_TYPES),
        nvlink_errors_per_hour=_counts(r, g, where, "nvlink_errors_per_hour",
                                       NVLINK_ERROR_TYPES, float),
        unsupported_fields=tuple(r.get({"field": f}, "field", int, 0, f"{where}.unsupported_fields")
                                 for f in r.get(g, "unsupported_fields", list, [])),
    )
    gpu = _with_mig(r, g, where, gpu)
    if not 0 <= gpu.nvlink_inactive <= gpu.nvlink_links:
        raise ScenarioError(f"{r.source}: {where}.nvlink_inactive: must be between 0 and "
                            f"nvlink_links ({gpu.nvlink_links}), got {gpu.nvlink_inactive}")
    if not 0 <= gpu.load <= 1:
        raise ScenarioError(f"{r.source}: {where}.load: must be between 0 and 1, got {gpu.load}")
    if gpu.latency_seconds is not None and gpu.latency_seconds < 0:
        raise ScenarioError(f"{r.source}: {where}.latency_seconds: must not be negative, got "
                            f"{gpu.latency_seconds}")
    r.no_other_keys(g, where, _GPU_KEYS)
    return gpu


_PROFILE = re.compile(r"^([1-7])g\.([0-9]+)gb$")
_MIG_KEYS = {"profile", "gpu_instance_id", "compute_instance_id", "memory_gib",
             "gone_after_seconds", "created_after_seconds", "processes"}


def _with_mig(r: _Reader, g: dict[str, Any], where: str, gpu: SimGpu) -> SimGpu:
    """The GPU with its MIG slices (mig: a list) and their processes added to its own."""
    slices = []
    processes = list(gpu.processes)
    seen: set[tuple[int, int]] = set()
    for i, data in enumerate(r.items(g, "mig")):
        at = f"{where}.mig[{i}]"
        m = r.mapping(data, at)
        r.no_other_keys(m, at, _MIG_KEYS)
        profile = r.get(m, "profile", str, "", at, required=True)
        match = _PROFILE.match(profile)
        if match is None:
            raise ScenarioError(f"{r.source}: {at}.profile: {profile!r} is not a MIG profile "
                                f"such as 1g.10gb or 3g.40gb")
        gi = r.get(m, "gpu_instance_id", int, 0, at, required=True)
        ci = r.get(m, "compute_instance_id", int, 0, at)
        if (gi, ci) in seen:
            raise ScenarioError(f"{r.source}: {at}: gpu_instance_id {gi} and "
                                f"compute_instance_id {ci} are another slice's already")
        seen.add((gi, ci))
        slices.append(SimMig(
            profile=profile, gpu_instance_id=gi, compute_instance_id=ci,
            memory_bytes=r.get(m, "memory_gib", float, float(match.group(2)), at) * GIB,
            gpu_slices=int(match.group(1)),
            gone_after_seconds=r.get(m, "gone_after_seconds", float, None, at),
            created_after_seconds=r.get(m, "created_after_seconds", float, 0.0, at)))
        for n, p in enumerate(r.items(m, "processes")):
            process = _process(r, p, f"{at}.processes[{n}]")
            processes.append(replace(process, gpu_instance_id=gi, compute_instance_id=ci))
    for moment in {0.0, *(s.created_after_seconds for s in slices)}:
        present = [s for s in slices if s.created_after_seconds <= moment
                   and (s.gone_after_seconds is None or moment < s.gone_after_seconds)]
        if sum(s.gpu_slices for s in present) > 7:
            raise ScenarioError(f"{r.source}: {where}.mig: the slices take more than the 7 "
                                f"compute slices of a GPU")
    if slices and gpu.processes:
        raise ScenarioError(f"{r.source}: {where}.processes: on a MIG GPU processes run on "
                            f"a slice: put them under mig[N].processes")
    return replace(gpu, mig=tuple(slices), processes=tuple(processes),
                   mig_pending=r.get(g, "mig_pending", bool, False))


def _counts(r: _Reader, g: dict[str, Any], where: str, key: str, names: tuple[str, ...],
            kind: type = int) -> dict[str, Any]:
    """A mapping of some of `names` to non-negative numbers of `kind`."""
    given = r.mapping(r.get(g, key, dict, {}), f"{where}.{key}")
    r.no_other_keys(given, f"{where}.{key}", set(names))
    counts = {}
    for name in given:
        value = r.get(given, name, kind, 0, f"{where}.{key}")
        if value < 0:
            raise ScenarioError(f"{r.source}: {where}.{key}.{name}: must not be negative, got "
                                f"{value}")
        counts[name] = kind(value)
    return counts


NVLINK_ERROR_TYPES = ("crc_flit", "crc_data", "replay", "recovery")

_GPU_KEYS = {"name", "memory_gib", "power_limit_watts", "idle_power_watts", "load",
             "idle_temperature", "load_temperature", "slowdown_temperature",
             "shutdown_temperature", "max_clocks_mhz", "fan", "ecc", "ecc_errors", "errors",
             "unsupported", "lost", "hang", "lost_after_seconds", "back_after_seconds",
             "missing_after_seconds", "xid", "processes", "uuid", "pci_bus_id",
             "latency_seconds", "pcie_generation", "pcie_width", "pcie_link", "pcie_replays",
             "pcie_replays_per_hour", "remapped_rows", "retired_pages", "nvlink_links",
             "nvlink_inactive", "nvlink_errors", "nvlink_errors_per_hour",
             "unsupported_fields", "mig", "mig_pending"}
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
