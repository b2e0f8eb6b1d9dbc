"""pynvml's functions over a SimulatedNode, with pynvml's names, return types and errors.

`gpuwatch.exporter.nvml` runs every line of its error mapping and version probing against it:
a scenario's faults raise pynvml's own NVMLError with the code a driver gives.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from gpuwatch.exporter import nvml as N
from gpuwatch.sim.node import SimulatedNode
from gpuwatch.sim.scenario import ERRORS, MIB, SimGpu

_DOUBLE = 0  # nvmlValueType_t
_UNSIGNED_LONG_LONG = 3
_ECC_FIELDS = {f: error_type for (error_type, _), f in N.FI_ECC_TOTALS.items()}
_REMAP_FIELDS = {N.FI_REMAPPED_COR: "correctable", N.FI_REMAPPED_UNC: "uncorrectable",
                 N.FI_REMAPPED_PENDING: "pending", N.FI_REMAPPED_FAILURE: "failure"}
_RETIRED_FIELDS = {N.FI_RETIRED_SBE: "single_bit_ecc", N.FI_RETIRED_DBE: "double_bit_ecc",
                   N.FI_RETIRED_PENDING: "pending"}
_NVLINK_FIELDS = {f: kind for kind, f in N.FI_NVLINK_ERRORS.items()}
_FIELD_SOURCES = {  # field id -> the function that reads it alone (whose errors it shares)
    N.FI_POWER_AVERAGE: "nvmlDeviceGetPowerUsage",
    N.FI_POWER_INSTANT: "nvmlDeviceGetPowerUsage",
    N.FI_POWER_LIMIT: "nvmlDeviceGetEnforcedPowerLimit",
    N.FI_ENERGY: "nvmlDeviceGetTotalEnergyConsumption",
    N.FI_ECC_CURRENT: "nvmlDeviceGetTotalEccErrors",
    **dict.fromkeys(_ECC_FIELDS, "nvmlDeviceGetTotalEccErrors"),
    **dict.fromkeys(_REMAP_FIELDS, "nvmlDeviceGetRemappedRows"),
    **dict.fromkeys(_RETIRED_FIELDS, "nvmlDeviceGetRetiredPages"),
    N.FI_PCIE_REPLAYS: "nvmlDeviceGetPcieReplayCounter",
    N.FI_NVLINK_LINK_COUNT: "nvmlDeviceGetFieldValues",
    N.FI_NVLINK_STATE: "nvmlDeviceGetFieldValues",
    **dict.fromkeys(_NVLINK_FIELDS, "nvmlDeviceGetFieldValues"),
}


@dataclass(frozen=True)
class _Handle:
    """A device handle: its own type, not the index, so that code which passes an index where
    pynvml wants a handle fails here as it would on a real driver."""

    index: int


@dataclass(frozen=True)
class _MigHandle:
    """A MIG device's handle: the parent's index and the slice's place in its scenario."""

    index: int
    slot: int


_MIG_FUNCTIONS = frozenset({"nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo",
                            "nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId",
                            "nvmlDeviceGetAttributes", "nvmlDeviceGetName"})
"""What a MIG device's handle answers; the rest (utilisation, temperature, power, clocks...)
is NOT_SUPPORTED, as on a driver, and stays on the parent GPU."""
_MIG_CAPABLE = ("A100", "A30", "H100", "H200")


def gpu_uuid(scenario: str, index: int) -> str:
    """The stable, well-formed UUID of a simulated GPU that sets none in its scenario."""
    digest = hashlib.sha256(f"{scenario}/{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def mig_uuid(seed: str) -> str:
    """The stable, well-formed UUID of a simulated MIG device."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return f"MIG-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


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
        """NVML function -> times the exporter called it (at the pynvml boundary: the
        simulator's own use of its answers is not counted)."""
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

    def _gpu(self, handle: _Handle | _MigHandle, function: str) -> SimGpu:
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
        if isinstance(handle, _MigHandle):
            if not self._slice_exists(gpu, handle.slot):
                raise N.NVMLError(N.ERROR_NOT_FOUND)  # reconfigured: the instance is gone
            if function not in _MIG_FUNCTIONS:
                raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        return gpu

    def _slice_exists(self, gpu: SimGpu, slot: int) -> bool:
        m, elapsed = gpu.mig[slot], self.node.elapsed()
        return m.created_after_seconds <= elapsed and \
            (m.gone_after_seconds is None or elapsed < m.gone_after_seconds)

    def _live_slices(self, gpu: SimGpu) -> list[int]:
        return [slot for slot in range(len(gpu.mig)) if self._slice_exists(gpu, slot)]

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

    def nvmlDeviceGetUUID(self, h: _Handle | _MigHandle) -> str:
        gpu = self._gpu(h, "nvmlDeviceGetUUID")
        if isinstance(h, _MigHandle):
            m = gpu.mig[h.slot]
            digest = gpu_uuid(self.scenario.name, h.index).removeprefix("GPU-")
            return mig_uuid(f"{digest}/{m.gpu_instance_id}/{m.compute_instance_id}")
        return gpu.uuid or gpu_uuid(self.scenario.name, h.index)

    def nvmlDeviceGetName(self, h: _Handle | _MigHandle) -> str:
        gpu = self._gpu(h, "nvmlDeviceGetName")
        if isinstance(h, _MigHandle):  # as a driver names a MIG device
            return f"{gpu.name} MIG {gpu.mig[h.slot].profile}"
        return gpu.name

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=gpu.pci_bus_id.encode())

    def nvmlDeviceGetVbiosVersion(self, h: _Handle) -> str:
        self._gpu(h, "nvmlDeviceGetVbiosVersion")
        return "92.00.45.00.06"

    def nvmlDeviceGetMigMode(self, h: _Handle) -> list[int]:
        gpu = self._gpu(h, "nvmlDeviceGetMigMode")
        if not any(model in gpu.name for model in _MIG_CAPABLE):
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        current = 1 if gpu.mig else 0
        return [current, 1 - current if gpu.mig_pending else current]

    # -- MIG devices -------------------------------------------------------------------------

    def nvmlDeviceGetMaxMigDeviceCount(self, h: _Handle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetMaxMigDeviceCount")
        if not any(model in gpu.name for model in _MIG_CAPABLE):
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: _Handle, index: int) -> _MigHandle:
        gpu = self._gpu(h, "nvmlDeviceGetMigDeviceHandleByIndex")
        if not gpu.mig:
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED if not any(
                model in gpu.name for model in _MIG_CAPABLE) else 2)  # INVALID_ARGUMENT
        live = self._live_slices(gpu)
        if not 0 <= index < 7:
            raise N.NVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        if index >= len(live):
            raise N.NVMLError(N.ERROR_NOT_FOUND)  # no MIG device in that place
        return _MigHandle(h.index, live[index])

    def nvmlDeviceIsMigDeviceHandle(self, h: _Handle | _MigHandle) -> int:
        return 1 if isinstance(h, _MigHandle) else 0

    def nvmlDeviceGetGpuInstanceId(self, h: _Handle | _MigHandle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetGpuInstanceId")
        if not isinstance(h, _MigHandle):
            raise N.NVMLError(2)  # INVALID_ARGUMENT: a parent's handle
        return gpu.mig[h.slot].gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, h: _Handle | _MigHandle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetComputeInstanceId")
        if not isinstance(h, _MigHandle):
            raise N.NVMLError(2)
        return gpu.mig[h.slot].compute_instance_id

    def nvmlDeviceGetAttributes(self, h: _Handle | _MigHandle) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetAttributes")
        slices = gpu.mig[h.slot].gpu_slices if isinstance(h, _MigHandle) else 7
        memory = gpu.mig[h.slot].memory_bytes if isinstance(h, _MigHandle) else gpu.memory_bytes
        return SimpleNamespace(multiprocessorCount=14 * slices, sharedCopyEngineCount=slices,
                               sharedDecoderCount=slices // 2, sharedEncoderCount=0,
                               sharedJpegCount=0, sharedOfaCount=0,
                               gpuInstanceSliceCount=slices, computeInstanceSliceCount=slices,
                               memorySizeMB=int(memory // MIB))

    def nvmlDeviceGetComputeMode(self, h: _Handle) -> int:
        self._gpu(h, "nvmlDeviceGetComputeMode")
        return 0

    # -- load --------------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> SimpleNamespace:
        self._gpu(h, "nvmlDeviceGetUtilizationRates")
        util = self.node.utilization(h.index)
        return SimpleNamespace(gpu=round(util * 100), memory=round(util * 60))

    def _used(self, index: int, gpu_instance_id: int | None = None) -> int:
        held = sum(p.process.memory_bytes for p in self.node.processes(index)
                   if gpu_instance_id is None or p.process.gpu_instance_id == gpu_instance_id)
        return int(held + (2 * MIB if held == 0 else 300 * MIB))

    def nvmlDeviceGetMemoryInfo(self, h: _Handle | _MigHandle, version: int | None = None
                                ) -> SimpleNamespace:
        gpu = self._gpu(h, "nvmlDeviceGetMemoryInfo")
        if isinstance(h, _MigHandle):
            m = gpu.mig[h.slot]
            total = int(m.memory_bytes)
            used = min(self._used(h.index, m.gpu_instance_id), total)
        else:
            total = int(gpu.memory_bytes)
            used = min(self._used(h.index), total)
        if version is None:
            return SimpleNamespace(total=total, used=used, free=total - used)
        reserved = int(total * 0.006)
        return SimpleNamespace(version=version, total=total, reserved=reserved, used=used,
                               free=total - used - reserved)

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        self._gpu(h, "nvmlDeviceGetTemperature")
        return self._temperature(h.index)

    def _temperature(self, index: int) -> int:
        gpu = self.scenario.gpus[index]
        util = self.node.utilization(index)
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
        return self._energy_mj(h.index)

    def _energy_mj(self, index: int) -> int:
        last, energy = self._energy[index]
        now = self.node.clock()
        energy += max(0.0, now - last) * self._power_mw(index)
        self._energy[index] = (now, energy)
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
        if self._temperature(h.index) >= gpu.slowdown_temperature:
            active |= reasons["hw_thermal_slowdown"] | reasons["sw_thermal_slowdown"]
        return active

    def nvmlDeviceGetTotalEccErrors(self, h: _Handle, error_type: int, counter_type: int
                                    ) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetTotalEccErrors")
        if not gpu.ecc:
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        name = next(k for k, v in N.ECC_TYPES.items() if v == error_type)
        return int(gpu.ecc_errors.get(name, 0))

    # -- health: memory, PCIe link, NVLink ----------------------------------------------------

    def _rising(self, start: float, per_hour: float) -> int:
        return int(start + per_hour * max(0.0, self.node.elapsed()) / 3600)

    def _replays(self, gpu: SimGpu) -> int:
        return self._rising(gpu.pcie_replays, gpu.pcie_replays_per_hour)

    def _nvlink_errors(self, gpu: SimGpu, kind: str) -> int:
        return self._rising(gpu.nvlink_errors.get(kind, 0),
                            gpu.nvlink_errors_per_hour.get(kind, 0.0))

    def nvmlDeviceGetRemappedRows(self, h: _Handle) -> tuple[int, int, int, int]:
        gpu = self._gpu(h, "nvmlDeviceGetRemappedRows")
        if not gpu.remaps_rows:
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        rows = gpu.remapped_rows
        return (rows.get("correctable", 0), rows.get("uncorrectable", 0),
                rows.get("pending", 0), rows.get("failure", 0))

    def _retires_pages(self, gpu: SimGpu) -> bool:
        return gpu.ecc and not gpu.remaps_rows

    def nvmlDeviceGetRetiredPages(self, h: _Handle, cause: int) -> list[int]:
        gpu = self._gpu(h, "nvmlDeviceGetRetiredPages")
        if not self._retires_pages(gpu):
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        name = "single_bit_ecc" if cause == N.PAGE_RETIREMENT_SBE else "double_bit_ecc"
        return [0x1000 * (n + 1) for n in range(gpu.retired_pages.get(name, 0))]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: _Handle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetRetiredPagesPendingStatus")
        if not self._retires_pages(gpu):
            raise N.NVMLError(N.ERROR_NOT_SUPPORTED)
        return gpu.retired_pages.get("pending", 0)

    def nvmlDeviceGetPcieReplayCounter(self, h: _Handle) -> int:
        return self._replays(self._gpu(h, "nvmlDeviceGetPcieReplayCounter"))

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: _Handle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetCurrPcieLinkGeneration")
        return gpu.pcie_link.get("generation", gpu.pcie_generation)

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: _Handle) -> int:
        gpu = self._gpu(h, "nvmlDeviceGetCurrPcieLinkWidth")
        return gpu.pcie_link.get("width", gpu.pcie_width)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: _Handle) -> int:
        return self._gpu(h, "nvmlDeviceGetMaxPcieLinkGeneration").pcie_generation

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: _Handle) -> int:
        return self._gpu(h, "nvmlDeviceGetMaxPcieLinkWidth").pcie_width

    # -- many values in one call ---------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, h: _Handle, field_ids: list[Any]) -> list[Any]:
        """Each field with its own nvmlReturn, as pynvml returns c_nvmlFieldValue_t: a field
        follows the errors and hangs the scenario sets on the function that reads it alone."""
        if not self.scenario.field_values:
            with self._count_lock:
                self.calls["nvmlDeviceGetFieldValues"] += 1
            raise N.NVMLError(N.ERROR_FUNCTION_NOT_FOUND)
        gpu = self._gpu(h, "nvmlDeviceGetFieldValues")
        fields = [asked if isinstance(asked, tuple) else (asked, 0) for asked in field_ids]
        if any(_FIELD_SOURCES.get(f) in gpu.hang for f, _ in fields):
            self._released.wait()  # one hung value hangs the call
        answers = []
        for field_id, scope in fields:
            code, value = self._field(h.index, gpu, field_id, scope)
            kind = _DOUBLE if isinstance(value, float) else _UNSIGNED_LONG_LONG
            answers.append(SimpleNamespace(
                fieldId=field_id, scopeId=scope, timestamp=int(self.node.clock() * 1e6),
                latencyUsec=0, valueType=kind, nvmlReturn=code,
                value=SimpleNamespace(dVal=float(value), ullVal=int(value))))
        return answers

    def _field(self, index: int, gpu: SimGpu, field_id: int, scope: int
               ) -> tuple[int, float | int]:
        """(nvmlReturn, value) of one field."""
        source = _FIELD_SOURCES.get(field_id)
        if source is None or field_id in gpu.unsupported_fields:
            return N.ERROR_NOT_SUPPORTED, 0
        error = gpu.errors.get(source)
        if error is not None:
            return ERRORS[error], 0
        try:
            value = self._field_value(index, gpu, field_id, scope)
        except N.NVMLError as e:
            return int(e.value), 0
        return 0, value

    def _field_value(self, index: int, gpu: SimGpu, field_id: int, scope: int) -> float | int:
        unsupported = N.NVMLError(N.ERROR_NOT_SUPPORTED)
        if field_id == N.FI_POWER_AVERAGE and "A100" in gpu.name:
            raise unsupported  # GA100 reports the instant value only, as the driver does
        if field_id in (N.FI_POWER_AVERAGE, N.FI_POWER_INSTANT):
            return round(self._power_mw(index))
        if field_id == N.FI_POWER_LIMIT:
            return round(gpu.power_limit_watts * 1000)
        if field_id == N.FI_ENERGY:
            return self._energy_mj(index)
        if field_id == N.FI_ECC_CURRENT:
            if not gpu.ecc:
                raise unsupported
            return 1
        if field_id in _ECC_FIELDS:
            if not gpu.ecc:
                raise unsupported
            return int(gpu.ecc_errors.get(_ECC_FIELDS[field_id], 0))
        if field_id in _REMAP_FIELDS:
            if not gpu.remaps_rows:
                raise unsupported
            return gpu.remapped_rows.get(_REMAP_FIELDS[field_id], 0)
        if field_id in _RETIRED_FIELDS:
            if not self._retires_pages(gpu):
                raise unsupported
            return gpu.retired_pages.get(_RETIRED_FIELDS[field_id], 0)
        if field_id == N.FI_PCIE_REPLAYS:
            return self._replays(gpu)
        if gpu.nvlink_links == 0:
            raise unsupported
        if field_id == N.FI_NVLINK_LINK_COUNT:
            return gpu.nvlink_links
        if field_id == N.FI_NVLINK_STATE:
            if not 0 <= scope < gpu.nvlink_links:
                raise N.NVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
            down = scope >= gpu.nvlink_links - gpu.nvlink_inactive  # the last links
            return 0 if down else N.NVLINK_STATE_ACTIVE
        return self._nvlink_errors(gpu, _NVLINK_FIELDS[field_id])

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
        none = 0xFFFFFFFF  # what a driver puts there for a GPU without MIG
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=int(p.process.memory_bytes),
                                gpuInstanceId=none if p.process.gpu_instance_id is None
                                else p.process.gpu_instance_id,
                                computeInstanceId=none if p.process.compute_instance_id is None
                                else p.process.compute_instance_id)
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

