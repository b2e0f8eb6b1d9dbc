"""Device metrics: utilisation, memory, temperature, power, clocks, throttling, ECC, health
(row remapping, retired pages, PCIe link, NVLink), info."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client.core import Metric

from gpuwatch.contract import metrics
from gpuwatch.exporter.collectors import Collector, Device, family
from gpuwatch.exporter.mig import WALK_SECONDS, MigSlice, parse_mode, walk
from gpuwatch.exporter.nvml import (
    CLOCK_EVENT_REASONS,
    CLOCKS,
    COMPUTE_MODES,
    ECC_SCOPES,
    ECC_TYPES,
    FI_ECC_CURRENT,
    FI_ECC_TOTALS,
    FI_ENERGY,
    FI_NVLINK_ERRORS,
    FI_NVLINK_LINK_COUNT,
    FI_NVLINK_STATE,
    FI_PCIE_REPLAYS,
    FI_POWER_AVERAGE,
    FI_POWER_INSTANT,
    FI_POWER_LIMIT,
    FI_REMAPPED_COR,
    FI_REMAPPED_FAILURE,
    FI_REMAPPED_PENDING,
    FI_REMAPPED_UNC,
    FI_RETIRED_DBE,
    FI_RETIRED_PENDING,
    FI_RETIRED_SBE,
    MEMORY_V2,
    NVLINK_STATE_ACTIVE,
    PAGE_RETIREMENT_DBE,
    PAGE_RETIREMENT_SBE,
    TEMPERATURE_GPU,
    TEMPERATURE_THRESHOLD_SHUTDOWN,
    TEMPERATURE_THRESHOLD_SLOWDOWN,
    Field,
    FieldAnswers,
    Nvml,
    decode,
)
from gpuwatch.exporter.readings import GpuReading, MigReading

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


LINK_REFRESH_SECONDS = 60.0
"""How often the PCIe link's current generation and width are read again: a link trains
again rarely, and two calls a scrape would be two of the fifteen a GPU may cost."""


@dataclass(frozen=True)
class _Group:
    """Values of one reading that nvmlDeviceGetFieldValues returns together."""

    name: str
    fields: tuple[Field, ...]


_SCALAR_FIELDS = (
    # the average over a second where the GPU has it, as nvmlDeviceGetPowerUsage answers
    _Group("power", ((FI_POWER_AVERAGE, 0), (FI_POWER_INSTANT, 0))),
    _Group("power_limit", ((FI_POWER_LIMIT, 0),)),
    _Group("energy", ((FI_ENERGY, 0),)),
)
_ECC = _Group("ecc", tuple((f, 0) for f in FI_ECC_TOTALS.values()))
_HEALTH_FIELDS = (
    _Group("remapped_rows", ((FI_REMAPPED_COR, 0), (FI_REMAPPED_UNC, 0),
                             (FI_REMAPPED_PENDING, 0), (FI_REMAPPED_FAILURE, 0))),
    _Group("retired_pages", ((FI_RETIRED_SBE, 0), (FI_RETIRED_DBE, 0),
                             (FI_RETIRED_PENDING, 0))),
    _Group("pcie_replays", ((FI_PCIE_REPLAYS, 0),)),
)
_NVLINK_ERRORS = _Group("nvlink_errors", tuple((f, 0) for f in FI_NVLINK_ERRORS.values()))


@dataclass
class _Plan:
    """How a GPU is read, learnt on its first scrapes and kept while it stays open."""

    groups: list[_Group]
    """What is asked in the one nvmlDeviceGetFieldValues call of a scrape."""
    legacy: set[str] = field(default_factory=set)
    """Readings asked through their own functions: the driver lacks the fields."""
    batch: bool = True
    """False when the driver lacks nvmlDeviceGetFieldValues."""


class GpuCollector(Collector):
    proves_presence = True  # its field-values call, or the UUID where the driver has none
    name = "gpu"
    help = "device metrics: utilisation, memory, temperature, power, clocks, throttling, ECC, " \
           "health (row remapping, retired pages, PCIe link, NVLink)"

    def __init__(self, display_names: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._display_names = dict(display_names or {})
        self._clock = clock
        # uuid -> the clock event reasons seen active: a GPU supports nine, almost always 0,
        # a fifth of its series; a reason is served from its first activity on, so its
        # history and alerts work and the zeros of reasons that never happen cost nothing
        self._seen_events: dict[str, set[str]] = {}
        # uuid -> the health series seen non-zero, served from then on for the same reason
        self._seen_health: dict[str, set[tuple[str, str]]] = {}

    def read_gpu(self, nvml: Nvml, device: Device) -> GpuReading:
        """One GPU's reading: what never changes while it is open once (names, thresholds,
        maximum clocks and link, ECC mode, NVLink count), the PCIe link once a minute, and
        every scrape one nvmlDeviceGetFieldValues call (power, energy, ECC counts, remapped
        rows, retired pages, PCIe replays, NVLink errors and states) beside the values that
        have no field (utilisation, memory, temperature, fan, P-state, clocks, throttling,
        codecs). A value the device does not support is not asked again."""
        h = device.handle
        plan = device.cached("plan", lambda: self._plan(nvml, device))
        values = self._fields(nvml, device, plan)  # first: it proves the GPU is there
        info = device.static.get("info") or self._info(nvml, h)
        if info["name"]:  # kept while the driver is loaded; asked again after a failed call
            device.static["info"] = info
        ask = partial(_ask, nvml, device)
        once = partial(_once, nvml, device)
        utilization = ask("nvmlDeviceGetUtilizationRates")
        # v2 tells reserved memory apart and matches nvidia-smi's "used" since driver 510
        memory = ask("nvmlDeviceGetMemoryInfo", MEMORY_V2) or ask("nvmlDeviceGetMemoryInfo")
        encoder = ask("nvmlDeviceGetEncoderUtilization")
        decoder = ask("nvmlDeviceGetDecoderUtilization")
        generation, width = self._pcie_link(nvml, device)
        mig_pending, mig = self._mig(nvml, device)
        return GpuReading(
            info=info,
            utilization_ratio=_ratio(utilization.gpu) if utilization else None,
            memory_utilization_ratio=_ratio(utilization.memory) if utilization else None,
            memory_total_bytes=_scaled(getattr(memory, "total", None), 1),
            memory_used_bytes=_scaled(getattr(memory, "used", None), 1),
            memory_free_bytes=_scaled(getattr(memory, "free", None), 1),
            memory_reserved_bytes=_scaled(getattr(memory, "reserved", None), 1),
            temperature_celsius=_scaled(ask("nvmlDeviceGetTemperature", TEMPERATURE_GPU), 1),
            temperature_slowdown_celsius=_scaled(
                once("nvmlDeviceGetTemperatureThreshold", TEMPERATURE_THRESHOLD_SLOWDOWN), 1),
            temperature_shutdown_celsius=_scaled(
                once("nvmlDeviceGetTemperatureThreshold", TEMPERATURE_THRESHOLD_SHUTDOWN), 1),
            power_usage_watts=_scaled(values.get("power"), 1e-3),
            power_limit_watts=_scaled(values.get("power_limit"), 1e-3),
            energy_joules=_scaled(values.get("energy"), 1e-3),
            fan_speed_ratio=_ratio(ask("nvmlDeviceGetFanSpeed")),
            performance_state=_pstate(ask("nvmlDeviceGetPerformanceState")),
            encoder_utilization_ratio=_ratio(encoder[0]) if encoder else None,
            decoder_utilization_ratio=_ratio(decoder[0]) if decoder else None,
            clocks_hertz=self._clocks(ask, "nvmlDeviceGetClockInfo"),
            max_clocks_hertz=device.cached(
                "max_clocks", lambda: self._clocks(ask, "nvmlDeviceGetMaxClockInfo")),
            clock_events=self._clock_events(ask, once),
            ecc_errors=values.get("ecc") or {},
            pcie_link_generation=_scaled(generation, 1),
            pcie_link_generation_max=_scaled(once("nvmlDeviceGetMaxPcieLinkGeneration"), 1),
            pcie_link_width=_scaled(width, 1),
            pcie_link_width_max=_scaled(once("nvmlDeviceGetMaxPcieLinkWidth"), 1),
            health=values.get("health") or {},
            mig_pending=mig_pending,
            mig=mig,
        )

    # -- MIG: the slices walked at most once a minute, their memory every scrape -------------

    def _mig(self, nvml: Nvml, device: Device) -> tuple[bool, tuple[MigReading, ...]]:
        """(a MIG mode change pending, the MIG devices with their memory). The mode and the
        slices are asked again once a minute, and at once when a slice's handle fails (the
        GPU was reconfigured: a slice that went away leaves no series behind)."""
        now = self._clock()
        walked = device.static.get("mig_walk")
        if walked is None or now - walked[0] >= WALK_SECONDS:
            walked = self._walk(nvml, device, now)
        readings = self._slice_memory(nvml, walked[2])
        if readings is None:
            walked = self._walk(nvml, device, now)
            readings = self._slice_memory(nvml, walked[2]) or ()
        device.mig_instances = tuple(dict.fromkeys(r.gpu_instance_id for r in readings))
        return walked[1], readings

    @staticmethod
    def _walk(nvml: Nvml, device: Device, now: float
              ) -> tuple[float, bool, tuple[MigSlice, ...]]:
        mode = parse_mode(_ask(nvml, device, "nvmlDeviceGetMigMode"))  # once if no MIG
        slices: tuple[MigSlice, ...] | None = ()
        if mode is not None and mode.enabled:
            slices = walk(nvml, device.handle)
        # a walk that failed half way is tried again next scrape
        walked = (now if slices is not None else now - WALK_SECONDS,
                  mode is not None and mode.pending, slices or ())
        device.static["mig_walk"] = walked
        return walked

    @staticmethod
    def _slice_memory(nvml: Nvml, slices: Sequence[MigSlice]
                      ) -> tuple[MigReading, ...] | None:
        """The slices with their memory (one call per GPU instance); None when one fails."""
        memory: dict[int, Any] = {}
        readings = []
        for s in slices:
            if s.gpu_instance_id not in memory:
                answer = nvml.query("nvmlDeviceGetMemoryInfo", s.handle)
                if answer is None:
                    return None
                memory[s.gpu_instance_id] = answer
            m = memory[s.gpu_instance_id]
            readings.append(MigReading(s.gpu_instance_id, s.compute_instance_id, s.profile,
                                       s.mig_uuid, float(m.total), float(m.used)))
        return tuple(readings)

    # -- what never changes while the GPU is open ------------------------------------------

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
    def _plan(nvml: Nvml, device: Device) -> _Plan:
        """The fields to ask every scrape, from the ECC mode and the NVLink count (asked
        once, together)."""
        static = nvml.field_values(device.handle, [(FI_ECC_CURRENT, 0),
                                                   (FI_NVLINK_LINK_COUNT, 0)])
        groups = list(_SCALAR_FIELDS)
        if static is None:  # no field values in this driver: every reading by its function
            return _Plan(groups + [_ECC, *_HEALTH_FIELDS], {g.name for g in groups} |
                         {_ECC.name} | {g.name for g in _HEALTH_FIELDS}, batch=False)
        if static.values.get((FI_ECC_CURRENT, 0)) != 0:  # on, or the driver does not say
            groups.append(_ECC)
        groups.extend(_HEALTH_FIELDS)
        links = int(static.values.get((FI_NVLINK_LINK_COUNT, 0), 0))
        if links > 0:  # NVLink counters only come as fields (per link: too many calls)
            groups.append(_NVLINK_ERRORS)
            groups.append(_Group("nvlink_state",
                                 tuple((FI_NVLINK_STATE, link) for link in range(links))))
        return _Plan(groups)

    # -- every scrape: the field values, and their own functions where a driver lacks them --

    def _fields(self, nvml: Nvml, device: Device, plan: _Plan) -> dict[str, Any]:
        """The readings of the plan's groups: power, power_limit, energy (milli-units), ecc
        ({(type, scope): count}) and health ({(metric, label): value})."""
        got: dict[Field, float] = {}
        answers = None
        if plan.batch:
            asked = [f for g in plan.groups if g.name not in plan.legacy for f in g.fields]
            answers = nvml.field_values(device.handle, asked, prove=True)
            if answers is None:
                plan.batch = False
                plan.legacy.update(g.name for g in plan.groups)
            else:
                got = answers.values
                self._learn(plan, answers)
        if answers is None:
            nvml.uuid(device.handle)  # the proof the field values would have been
        values: dict[str, Any] = {}
        power = got.get((FI_POWER_AVERAGE, 0), got.get((FI_POWER_INSTANT, 0)))
        if (FI_POWER_AVERAGE, 0) in got:  # the instant value is not needed any more
            plan.groups = [_Group("power", ((FI_POWER_AVERAGE, 0),)) if g.name == "power"
                           else g for g in plan.groups]
        ask = partial(_ask, nvml, device)
        legacy = plan.legacy
        values["power"] = ask("nvmlDeviceGetPowerUsage") if "power" in legacy else power
        values["power_limit"] = ask("nvmlDeviceGetEnforcedPowerLimit") \
            if "power_limit" in legacy else got.get((FI_POWER_LIMIT, 0))
        values["energy"] = ask("nvmlDeviceGetTotalEnergyConsumption") \
            if "energy" in legacy else got.get((FI_ENERGY, 0))
        if "ecc" in legacy:
            values["ecc"] = _legacy_ecc(ask)
        else:
            values["ecc"] = {key: got[(f, 0)] for key, f in FI_ECC_TOTALS.items()
                             if (f, 0) in got}
        values["health"] = self._health(plan, got, ask)
        return values

    @staticmethod
    def _learn(plan: _Plan, answers: FieldAnswers) -> None:
        """Fields the device does not have are not asked again; a group none of whose fields
        it has is read through its own function from now on (if it has one)."""
        if not answers.absent:
            return
        kept = []
        for group in plan.groups:
            fields = tuple(f for f in group.fields if f not in answers.absent)
            if not fields:
                plan.legacy.add(group.name)
                fields = group.fields  # the legacy reading knows its group by name
            kept.append(_Group(group.name, fields))
        plan.groups = kept

    @staticmethod
    def _health(plan: _Plan, got: Mapping[Field, float], ask: Callable[..., Any]
                ) -> dict[tuple[str, str], float]:
        health: dict[tuple[str, str], float] = {}
        legacy = plan.legacy
        if "pcie_replays" in legacy:
            _put(health, metrics.PCIE_REPLAYS, "", ask("nvmlDeviceGetPcieReplayCounter"))
        else:
            _put(health, metrics.PCIE_REPLAYS, "", got.get((FI_PCIE_REPLAYS, 0)))
        if "remapped_rows" in legacy:
            rows = ask("nvmlDeviceGetRemappedRows")
            remapped = list(rows) if rows is not None else [None] * 4
        else:
            remapped = [got.get((f, 0)) for f in (FI_REMAPPED_COR, FI_REMAPPED_UNC,
                                                  FI_REMAPPED_PENDING, FI_REMAPPED_FAILURE)]
        _put(health, metrics.REMAPPED_ROWS, "correctable", remapped[0])
        _put(health, metrics.REMAPPED_ROWS, "uncorrectable", remapped[1])
        _put(health, metrics.ROW_REMAP_PENDING, "", remapped[2])
        _put(health, metrics.ROW_REMAP_FAILURE, "", remapped[3])
        if "retired_pages" in legacy:
            sbe = ask("nvmlDeviceGetRetiredPages", PAGE_RETIREMENT_SBE)
            dbe = ask("nvmlDeviceGetRetiredPages", PAGE_RETIREMENT_DBE) \
                if sbe is not None else None
            pending = ask("nvmlDeviceGetRetiredPagesPendingStatus") if sbe is not None \
                else None
            retired = [None if sbe is None else len(sbe), None if dbe is None else len(dbe),
                       pending]
        else:
            retired = [got.get((f, 0)) for f in (FI_RETIRED_SBE, FI_RETIRED_DBE,
                                                 FI_RETIRED_PENDING)]
        _put(health, metrics.RETIRED_PAGES, "single_bit_ecc", retired[0])
        _put(health, metrics.RETIRED_PAGES, "double_bit_ecc", retired[1])
        _put(health, metrics.RETIRED_PAGES_PENDING, "", retired[2])
        for kind, f in FI_NVLINK_ERRORS.items():
            _put(health, metrics.NVLINK_ERRORS, kind, got.get((f, 0)))
        states = [got[link] for g in plan.groups if g.name == "nvlink_state"
                  for link in g.fields if link in got]
        if states:
            _put(health, metrics.NVLINK_LINKS_INACTIVE, "",
                 sum(1 for state in states if state != NVLINK_STATE_ACTIVE))
        return health

    def _pcie_link(self, nvml: Nvml, device: Device) -> tuple[Any, Any]:
        """The link's current generation and width, read again once a minute."""
        now = self._clock()
        read = device.static.get("pcie_link")
        if read is None or now - read[0] >= LINK_REFRESH_SECONDS:
            ask = partial(_ask, nvml, device)
            read = (now, ask("nvmlDeviceGetCurrPcieLinkGeneration"),
                    ask("nvmlDeviceGetCurrPcieLinkWidth"))
            device.static["pcie_link"] = read
        return read[1], read[2]

    @staticmethod
    def _clocks(ask: Callable[..., Any], function: str) -> dict[str, float]:
        clocks = {}
        for clock, clock_type in CLOCKS.items():
            mhz = ask(function, clock_type)
            if mhz is not None:
                clocks[clock] = float(mhz) * 1e6
        return clocks

    @staticmethod
    def _clock_events(ask: Callable[..., Any], once: Callable[..., Any]) -> dict[str, bool]:
        # Renamed from "throttle reasons" in driver 535; older bindings only have the old
        # name. What a GPU supports never changes; what is active is asked every scrape.
        supported = once("nvmlDeviceGetSupportedClocksEventReasons")
        if supported is None:
            supported = once("nvmlDeviceGetSupportedClocksThrottleReasons")
        if supported is None:
            return {}
        active = ask("nvmlDeviceGetCurrentClocksEventReasons")
        if active is None:
            active = ask("nvmlDeviceGetCurrentClocksThrottleReasons")
        if active is None:
            return {}
        return {reason: bool(active & bit) for reason, bit in CLOCK_EVENT_REASONS.items()
                if supported & bit}

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
        yield from self._health_families(readings)
        yield from _mig_families(readings)

    def _health_families(self, readings: Sequence[tuple[Device, Any]]) -> Iterable[Metric]:
        """The health signals, each served from the first scrape it is non-zero on."""
        health = {m.name: family(m) for m in HEALTH}
        for device, reading in readings:
            seen = self._seen_health.setdefault(device.uuid, set())
            for key, value in reading.health.items():
                if value:
                    seen.add(key)
                if key in seen:
                    name, label = key
                    health[name].add_metric(device.labels + ([label] if label else []), value)
        yield from health.values()


HEALTH = (metrics.PCIE_REPLAYS, metrics.REMAPPED_ROWS, metrics.ROW_REMAP_PENDING,
          metrics.ROW_REMAP_FAILURE, metrics.RETIRED_PAGES, metrics.RETIRED_PAGES_PENDING,
          metrics.NVLINK_ERRORS, metrics.NVLINK_LINKS_INACTIVE)
"""The health series served from their first non-zero value on, in the served order."""


def _mig_families(readings: Sequence[tuple[Device, Any]]) -> Iterable[Metric]:
    """The MIG slices: one info series per MIG device, memory per GPU instance."""
    info, pending = family(metrics.MIG_INFO), family(metrics.MIG_MODE_PENDING)
    total, used = family(metrics.MIG_MEMORY_TOTAL), family(metrics.MIG_MEMORY_USED)
    for device, reading in readings:
        if reading.mig_pending:
            pending.add_metric(device.labels, 1)
        instances: set[int] = set()
        for s in reading.mig:
            gi = str(s.gpu_instance_id)
            info.add_metric(device.labels + [gi, str(s.compute_instance_id), s.profile,
                                             s.mig_uuid], 1)
            if s.gpu_instance_id in instances:
                continue  # compute instances of one GPU instance share its memory
            instances.add(s.gpu_instance_id)
            if s.memory_total_bytes is not None:
                total.add_metric(device.labels + [gi], s.memory_total_bytes)
            if s.memory_used_bytes is not None:
                used.add_metric(device.labels + [gi], s.memory_used_bytes)
    # a node without MIG serves none of them, not even their HELP and TYPE lines
    yield from (f for f in (pending, info, total, used) if f.samples)


def _put(health: dict[tuple[str, str], float], metric: metrics.MetricDef, label: str,
         value: Any) -> None:
    if value is not None:
        health[(metric.name, label)] = float(value)


def _ask(nvml: Nvml, device: Device, function: str, *args: Any) -> Any:
    """An NVML query of the device's (nvml.query), not asked again once the device says it
    does not have it."""
    unsupported: set[tuple[str, tuple[Any, ...]]] = device.static.setdefault("unsupported",
                                                                             set())
    if (function, args) in unsupported:
        return None
    supported, value = nvml.supported(function, device.handle, *args)
    if not supported:
        unsupported.add((function, args))
    return value


def _once(nvml: Nvml, device: Device, function: str, *args: Any) -> Any:
    """A value that does not change while the GPU is open: asked until it answers (or says
    it never will), then kept."""
    answers: dict[tuple[str, tuple[Any, ...]], Any] = device.static.setdefault("once", {})
    key = (function, args)
    if key not in answers:
        supported, value = nvml.supported(function, device.handle, *args)
        if value is None and supported:
            return None  # failed this time: asked again next scrape
        answers[key] = value
    return answers[key]


def _legacy_ecc(ask: Callable[..., Any]) -> dict[tuple[str, str], float]:
    """ECC counts through nvmlDeviceGetTotalEccErrors, for a driver without the fields."""
    errors: dict[tuple[str, str], float] = {}
    for type_name, error_type in ECC_TYPES.items():
        for scope, counter_type in ECC_SCOPES.items():
            count = ask("nvmlDeviceGetTotalEccErrors", error_type, counter_type)
            if count is None:
                if not errors:
                    return {}  # ECC off or not supported: one question is enough
                continue
            errors[(type_name, scope)] = float(count)
    return errors


def _pstate(value: Any) -> float | None:
    # NVML_PSTATE_UNKNOWN (32) is not a state
    return float(value) if value is not None and 0 <= value <= 15 else None
