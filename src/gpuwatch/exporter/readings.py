"""Plain data between NVML and the metric families, in base units.

Bytes, seconds, watts, degrees Celsius, hertz, joules, ratios 0..1. ``None`` means the device
does not support the field: it is left out of /metrics, never reported as 0 or NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuReading:
    """One reading of one GPU (collector ``gpu``)."""

    info: Mapping[str, str]
    """Descriptive attributes: the labels of nvidia_gpu_info (metrics.INFO_LABELS)."""
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_total_bytes: float | None = None
    memory_used_bytes: float | None = None
    memory_free_bytes: float | None = None
    memory_reserved_bytes: float | None = None
    temperature_celsius: float | None = None
    temperature_slowdown_celsius: float | None = None
    temperature_shutdown_celsius: float | None = None
    power_usage_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    fan_speed_ratio: float | None = None
    performance_state: float | None = None
    encoder_utilization_ratio: float | None = None
    decoder_utilization_ratio: float | None = None
    clocks_hertz: Mapping[str, float] = field(default_factory=dict)
    """clock name (graphics, sm, memory, video) -> current frequency."""
    max_clocks_hertz: Mapping[str, float] = field(default_factory=dict)
    clock_events: Mapping[str, bool] = field(default_factory=dict)
    """Supported clock event (throttle) reason -> whether it is active now."""
    ecc_errors: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """(type, scope) -> count, e.g. ("uncorrected", "volatile")."""
    pcie_link_generation: float | None = None
    pcie_link_generation_max: float | None = None
    pcie_link_width: float | None = None
    pcie_link_width_max: float | None = None
    health: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """The health signals served from their first non-zero value on: (metric name, label
    value or "") -> value, e.g. ("nvidia_gpu_remapped_rows_total", "uncorrectable") -> 1."""
    mig_pending: bool = False
    """A change of the MIG mode waits for a GPU reset."""
    mig: tuple[MigReading, ...] = ()
    """The MIG devices of a MIG-enabled GPU, as the last walk found them."""


@dataclass(frozen=True)
class MigReading:
    """One MIG device (collector ``gpu``): its identity and its memory, the GPU instance's."""

    gpu_instance_id: int
    compute_instance_id: int
    profile: str
    mig_uuid: str
    memory_total_bytes: float | None = None
    memory_used_bytes: float | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """What the host knows of a pid: who runs it and since when."""

    user: str
    command: str
    cmdline: str
    start_time_seconds: float
    container_id: str = ""
    slurm_job_id: str = ""


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a GPU (collector ``process``)."""

    pid: int
    used_memory_bytes: float | None
    """None where the driver cannot tell (e.g. without permission, or under MIG)."""
    info: ProcessInfo
    gpu_instance_id: int | None = None
    """The MIG slice (GPU instance) it runs on; None on a GPU without MIG."""


@dataclass(frozen=True)
class ProcessReading:
    """The processes of one GPU, after deduplication by pid."""

    processes: tuple[GpuProcess, ...]
    unresolved: int = 0
    """Pids NVML listed that the host could not look up: exited since, or in another pid
    namespace (an exporter in a container without the host's pids)."""
    unresolved_by_instance: Mapping[int, int] = field(default_factory=dict)
    """On a MIG GPU: GPU instance id -> of `unresolved`, those on that slice."""
