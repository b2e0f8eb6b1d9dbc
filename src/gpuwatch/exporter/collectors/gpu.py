"""Device metrics: utilisation, memory, temperature, power, clocks, throttling, ECC, info."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import Metric

from gpuwatch.contract import metrics
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.nvml import (
    CLOCK_EVENT_REASONS,
    CLOCKS,
    COMPUTE_MODES,
    ECC_SCOPES,
    ECC_TYPES,
    MEMORY_V2,
    TEMPERATURE_GPU,
    TEMPERATURE_THRESHOLD_SHUTDOWN,
    TEMPERATURE_THRESHOLD_SLOWDOWN,
    Nvml,
    decode,
)
from gpuwatch.exporter.readings import GpuReading

_VENDOR_WORDS = ("NVIDIA", "GeForce", "Tesla", "Quadro")


def display_name(name: str, names: Mapping[str, str]) -> str:
    """The short name of a model: from the configured map, else without vendor words.

    "NVIDIA GeForce RTX 3090" -> "RTX 3090", "NVIDIA H100 80GB HBM3" -> "H100 80GB HBM3".
    """
    if name in names:
        return names[name]
    short = " ".join(w for w in name.split() if w not in _VENDOR_WORDS)
    return short or name


def _ratio(percent: Any) -> float | None:
    return None if percent is None else float(percent) / 100.0


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else float(value) * factor


class GpuCollector(Collector):
    name = "gpu"
    help = "device metrics: utilisation, memory, temperature, power, clocks, throttling, ECC"

    def __init__(self, display_names: Mapping[str, str] | None = None) -> None:
        self._display_names = dict(display_names or {})
        # uuid -> the clock event reasons seen active: a GPU supports nine, almost always 0,
        # a fifth of its series; a reason is served from its first activity on, so its
        # history and alerts work and the zeros of reasons that never happen cost nothing
        self._seen_events: dict[str, set[str]] = {}

    def read_gpu(self, nvml: Nvml, device: Device) -> GpuReading:
        h = device.handle
        q = nvml.query
        info = device.static.get("info") or self._info(nvml, h)
        if info["name"]:  # kept while the driver is loaded; asked again after a failed call
            device.static["info"] = info
        utilization = q("nvmlDeviceGetUtilizationRates", h)
        # v2 tells reserved memory apart and matches nvidia-smi's "used" since driver 510
        memory = q("nvmlDeviceGetMemoryInfo", h, MEMORY_V2) or q("nvmlDeviceGetMemoryInfo", h)
        encoder = q("nvmlDeviceGetEncoderUtilization", h)
        decoder = q("nvmlDeviceGetDecoderUtilization", h)
        return GpuReading(
            info=info,
            utilization_ratio=_ratio(utilization.gpu) if utilization else None,
            memory_utilization_ratio=_ratio(utilization.memory) if utilization else None,
            memory_total_bytes=_scaled(getattr(memory, "total", None), 1),
            memory_used_bytes=_scaled(getattr(memory, "used", None), 1),
            memory_free_bytes=_scaled(getattr(memory, "free", None), 1),
            memory_reserved_bytes=_scaled(getattr(memory, "reserved", None), 1),
            temperature_celsius=_scaled(q("nvmlDeviceGetTemperature", h, TEMPERATURE_GPU), 1),
            temperature_slowdown_celsius=_scaled(
                q("nvmlDeviceGetTemperatureThreshold", h, TEMPERATURE_THRESHOLD_SLOWDOWN), 1),
            temperature_shutdown_celsius=_scaled(
                q("nvmlDeviceGetTemperatureThreshold", h, TEMPERATURE_THRESHOLD_SHUTDOWN), 1),
            power_usage_watts=_scaled(q("nvmlDeviceGetPowerUsage", h), 1e-3),
            power_limit_watts=_scaled(q("nvmlDeviceGetEnforcedPowerLimit", h), 1e-3),
            energy_joules=_scaled(q("nvmlDeviceGetTotalEnergyConsumption", h), 1e-3),
            fan_speed_ratio=_ratio(q("nvmlDeviceGetFanSpeed", h)),
            performance_state=_pstate(q("nvmlDeviceGetPerformanceState", h)),
            encoder_utilization_ratio=_ratio(encoder[0]) if encoder else None,
            decoder_utilization_ratio=_ratio(decoder[0]) if decoder else None,
            clocks_hertz=self._clocks(nvml, h, "nvmlDeviceGetClockInfo"),
            max_clocks_hertz=device.cached(
                "max_clocks", lambda: self._clocks(nvml, h, "nvmlDeviceGetMaxClockInfo")),
            clock_events=self._clock_events(nvml, h),
            ecc_errors=self._ecc(nvml, h),
        )

    def _info(self, nvml: Nvml, h: Any) -> dict[str, str]:
        q = nvml.query
        name = decode(q("nvmlDeviceGetName", h) or "")
        pci = q("nvmlDeviceGetPciInfo", h)
        mig = q("nvmlDeviceGetMigMode", h)
        compute_mode = q("nvmlDeviceGetComputeMode", h)
        return {
            "name": name,
            "display_name": display_name(name, self._display_names),
            "pci_bus_id": decode(pci.busId) if pci is not None else "",
            "driver_version": nvml.driver_version,
            "cuda_version": nvml.cuda_version,
            "vbios_version": decode(q("nvmlDeviceGetVbiosVersion", h) or ""),
            "mig_mode": ("enabled" if mig[0] else "disabled") if mig else "",
            "compute_mode": COMPUTE_MODES.get(compute_mode, "") if compute_mode is not None
            else "",
        }

    @staticmethod
    def _clocks(nvml: Nvml, h: Any, function: str) -> dict[str, float]:
        clocks = {}
        for clock, clock_type in CLOCKS.items():
            mhz = nvml.query(function, h, clock_type)
            if mhz is not None:
                clocks[clock] = float(mhz) * 1e6
        return clocks

    @staticmethod
    def _clock_events(nvml: Nvml, h: Any) -> dict[str, bool]:
        # Renamed from "throttle reasons" in driver 535; older bindings only have the old name
        supported = nvml.query("nvmlDeviceGetSupportedClocksEventReasons", h)
        if supported is None:
            supported = nvml.query("nvmlDeviceGetSupportedClocksThrottleReasons", h)
        active = nvml.query("nvmlDeviceGetCurrentClocksEventReasons", h)
        if active is None:
            active = nvml.query("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        if supported is None or active is None:
            return {}
        return {reason: bool(active & bit) for reason, bit in CLOCK_EVENT_REASONS.items()
                if supported & bit}

    @staticmethod
    def _ecc(nvml: Nvml, h: Any) -> dict[tuple[str, str], float]:
        errors: dict[tuple[str, str], float] = {}
        for type_name, error_type in ECC_TYPES.items():
            for scope, counter_type in ECC_SCOPES.items():
                count = nvml.query("nvmlDeviceGetTotalEccErrors", h, error_type, counter_type)
                if count is None:
                    if not errors:
                        return {}  # ECC off or not supported: one question is enough
                    continue
                errors[(type_name, scope)] = float(count)
        return errors

    def families(self, readings: Sequence[tuple[Device, Any]], node: Any) -> Iterable[Metric]:
        info = family(metrics.INFO)
        for device, reading in readings:
            info.add_metric(device.labels + [reading.info[k] for k in metrics.INFO_LABELS], 1)
        yield info
        for metric in metrics.SCALARS:
            f = family(metric)
            for device, reading in readings:
                value = getattr(reading, metric.field or "")
                if value is not None:
                    f.add_metric(device.labels, value)
            yield f
        clock, clock_max = family(metrics.CLOCK), family(metrics.CLOCK_MAX)
        events, ecc = family(metrics.CLOCK_EVENT), family(metrics.ECC_ERRORS)
        for device, reading in readings:
            for name, hz in reading.clocks_hertz.items():
                clock.add_metric(device.labels + [name], hz)
            for name, hz in reading.max_clocks_hertz.items():
                clock_max.add_metric(device.labels + [name], hz)
            seen = self._seen_events.setdefault(device.uuid, set())
            for reason, active in reading.clock_events.items():
                if active:
                    seen.add(reason)
                if reason in seen:
                    events.add_metric(device.labels + [reason], float(active))
            for (error_type, scope), count in reading.ecc_errors.items():
                ecc.add_metric(device.labels + [error_type, scope], count)
        yield from (clock, clock_max, events, ecc)


def _pstate(value: Any) -> float | None:
    # NVML_PSTATE_UNKNOWN (32) is not a state
    return float(value) if value is not None and 0 <= value <= 15 else None
