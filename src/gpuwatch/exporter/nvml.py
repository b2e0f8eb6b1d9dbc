"""The one door to NVML: the only module that imports pynvml.

Everything else asks through `Nvml`, which maps NVML's errors onto three outcomes:
a value, ``None`` (the field is not there this time: leave it out), or an exception
that means more than one field is gone: `GpuLost` (this GPU) or `NvmlUnavailable` (the
library or driver; re-initialised on a later scrape).

Only the calls that prove a GPU is there (`handle`, `uuid`, and the one field-values call of a
scrape as a whole) say it is lost: a field query
that fails, with NVML_ERROR_UNKNOWN or even NVML_ERROR_GPU_IS_LOST, costs that field and
nothing else (one flaky sensor must not blank a GPU that answers), and the next presence
call tells whether the GPU is still there.

The NVML library is injected (``lib``), so the simulated GPUs of `gpuwatch.sim` run
every line of this module: same function names, same return types, pynvml's own errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

log = logging.getLogger(__name__)

NVMLError = pynvml.NVMLError

# NVML's constants, re-exported for the simulator and the collectors.
ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
ERROR_NO_DATA = pynvml.NVML_ERROR_NO_DATA
ERROR_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
ERROR_LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
ERROR_ARGUMENT_VERSION_MISMATCH = pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH

TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
TEMPERATURE_THRESHOLD_SHUTDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
TEMPERATURE_THRESHOLD_SLOWDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
MEMORY_V2 = pynvml.nvmlMemory_v2
EVENT_TYPE_XID = pynvml.nvmlEventTypeXidCriticalError

CLOCKS = {  # label value -> nvmlClockType_t
    "graphics": pynvml.NVML_CLOCK_GRAPHICS,
    "sm": pynvml.NVML_CLOCK_SM,
    "memory": pynvml.NVML_CLOCK_MEM,
    "video": pynvml.NVML_CLOCK_VIDEO,
}
CLOCK_EVENT_REASONS = {  # label value -> bit of nvmlClocksEventReasons
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
ECC_TYPES = {"corrected": pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
             "uncorrected": pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED}
ECC_SCOPES = {"volatile": pynvml.NVML_VOLATILE_ECC, "aggregate": pynvml.NVML_AGGREGATE_ECC}
COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}

# Field ids of nvmlDeviceGetFieldValues (nvml.h's NVML_FI_DEV_*): many values in one call.
FI_ECC_CURRENT = pynvml.NVML_FI_DEV_ECC_CURRENT
FI_ECC_TOTALS = {  # (type, scope) of nvidia_gpu_ecc_errors_total -> field, in the served order
    ("corrected", "volatile"): pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
    ("corrected", "aggregate"): pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
    ("uncorrected", "volatile"): pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
    ("uncorrected", "aggregate"): pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
}
FI_RETIRED_SBE = pynvml.NVML_FI_DEV_RETIRED_SBE
FI_RETIRED_DBE = pynvml.NVML_FI_DEV_RETIRED_DBE
FI_RETIRED_PENDING = pynvml.NVML_FI_DEV_RETIRED_PENDING
FI_NVLINK_ERRORS = {  # type label of nvidia_gpu_nvlink_errors_total -> total over the links
    "crc_flit": pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    "crc_data": pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
    "replay": pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    "recovery": pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
}
FI_ENERGY = pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION
FI_NVLINK_LINK_COUNT = pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT
FI_PCIE_REPLAYS = pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER
FI_REMAPPED_COR = pynvml.NVML_FI_DEV_REMAPPED_COR
FI_REMAPPED_UNC = pynvml.NVML_FI_DEV_REMAPPED_UNC
FI_REMAPPED_PENDING = pynvml.NVML_FI_DEV_REMAPPED_PENDING
FI_REMAPPED_FAILURE = pynvml.NVML_FI_DEV_REMAPPED_FAILURE
FI_NVLINK_STATE = pynvml.NVML_FI_DEV_NVLINK_GET_STATE
"""Scoped: the scope id is the link."""
FI_POWER_AVERAGE = pynvml.NVML_FI_DEV_POWER_AVERAGE
FI_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT
FI_POWER_LIMIT = pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT
NVLINK_STATE_ACTIVE = pynvml.NVML_NVLINK_STATE_ACTIVE
PAGE_RETIREMENT_SBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
PAGE_RETIREMENT_DBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
_VALUE_MEMBERS = {  # nvmlValueType_t -> the member of nvmlValue_t that holds it
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}

# The field is simply not there on this device, or not for us: leave it out.
_ABSENT = frozenset({ERROR_NOT_SUPPORTED, ERROR_NO_PERMISSION, ERROR_NOT_FOUND, ERROR_NO_DATA,
                     ERROR_FUNCTION_NOT_FOUND, ERROR_ARGUMENT_VERSION_MISMATCH})
# Of those, the answers that do not change while the driver is loaded: not asked again.
_NEVER = frozenset({ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND,
                    ERROR_ARGUMENT_VERSION_MISMATCH})
# From a presence call (handle, UUID): the GPU stopped answering.
_LOST = frozenset({ERROR_GPU_IS_LOST, ERROR_UNKNOWN})
# The library or driver went away (driver upgrade, unload): initialise again later.
_UNAVAILABLE = frozenset({ERROR_UNINITIALIZED, ERROR_DRIVER_NOT_LOADED, ERROR_LIBRARY_NOT_FOUND,
                          ERROR_LIB_RM_VERSION_MISMATCH})

# The largest pid Linux hands out (pid_max can be at most 2**22); anything above it, or a
# process holding more memory than the GPU has, is a struct read with the wrong layout.
_PID_MAX = 1 << 22


class GpuLost(Exception):
    """This GPU no longer answers: NVML_ERROR_GPU_IS_LOST or NVML_ERROR_UNKNOWN from a call
    that proves the GPU is there (its handle or its UUID)."""


class NvmlUnavailable(Exception):
    """NVML cannot be used: no driver, no libnvidia-ml, or a library/driver mismatch."""


Field = tuple[int, int]
"""(field id, scope id) of nvmlDeviceGetFieldValues; the scope is 0 unless the field has one
(an NVLink field's is the link)."""


@dataclass(frozen=True)
class FieldAnswers:
    """What one nvmlDeviceGetFieldValues call answered."""

    values: dict[Field, float]
    """The fields that answered."""
    absent: frozenset[Field]
    """Fields the device does not have (their nvmlReturn is NOT_SUPPORTED or like it): not
    asked again, and read through their own function where there is one."""


@dataclass(frozen=True)
class RunningProcess:
    pid: int
    used_memory_bytes: int | None
    gpu_instance_id: int | None = None
    """The MIG slice (GPU instance) it runs on; None on a GPU without MIG (and in v1
    structs, which do not say)."""


PROC_GPUS = Path("/proc/driver/nvidia/gpus")
"""One folder per GPU the kernel driver knows, named by PCI bus id, each with an
``information`` file that names its UUID even when NVML cannot reach the GPU."""
_UUID_LINE = re.compile(r"^GPU UUID:\s*(GPU-[0-9a-fA-F-]+)\s*$", re.MULTILINE)


class Nvml:
    """NVML as the exporter uses it: initialise lazily, query with errors as values."""

    def __init__(self, lib: Any = pynvml, proc_gpus: Path | None = None) -> None:
        self._lib = lib
        # the host's driver folders describe the host's GPUs, not a simulated node's
        self._proc_gpus = proc_gpus if proc_gpus is not None or lib is not pynvml \
            else PROC_GPUS
        self._lock = threading.RLock()
        self._initialized = False
        self.generation = 0
        """Counts successful initialisations: device handles of an older one are stale."""
        self._reported: set[tuple[str, int]] = set()
        self._process_query: dict[str, str] = {}
        self.driver_version = ""
        self.cuda_version = ""
        self._announced: tuple[str, str] | None = None

    # -- library lifetime -------------------------------------------------------------------

    def ensure_initialized(self) -> None:
        """Initialise NVML if it is not; raise NvmlUnavailable with the reason if it cannot be."""
        with self._lock:
            if self._initialized:
                return
            try:
                self._lib.nvmlInit()
            except NVMLError as e:
                raise NvmlUnavailable(_describe_init_error(e)) from e
            except OSError as e:  # pynvml wraps most loader failures, not all of them
                raise NvmlUnavailable(f"cannot load libnvidia-ml: {e}") from e
            self._initialized = True
            self.generation += 1
            self.driver_version = str(self.query("nvmlSystemGetDriverVersion") or "")
            cuda = self.query("nvmlSystemGetCudaDriverVersion")
            self.cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else ""
            # once per driver: a driver that fails its calls after a good init is initialised
            # again on every scrape, and that is not news
            announced = (self.driver_version, self.cuda_version)
            log.log(logging.INFO if announced != self._announced else logging.DEBUG,
                    "NVML initialised: driver %s, CUDA %s", self.driver_version or "unknown",
                    self.cuda_version or "unknown")
            self._announced = announced

    def invalidate(self) -> None:
        """Forget the initialisation so the next scrape initialises NVML again."""
        with self._lock:
            if self._initialized:
                with contextlib.suppress(NVMLError):
                    self._lib.nvmlShutdown()
            self._initialized = False

    def device_count(self) -> int:
        return int(self.call("nvmlDeviceGetCount"))

    # -- presence: the calls that prove a GPU is there --------------------------------------

    def handle(self, index: int) -> Any:
        """The device handle; GpuLost when the GPU does not answer."""
        return self._proof("nvmlDeviceGetHandleByIndex", index)

    def uuid(self, handle: Any) -> str:
        """The GPU's UUID (nvidia-smi uuid); GpuLost when the GPU does not answer. Asked on
        every scrape: it is how a GPU shows it is still there."""
        return decode(self._proof("nvmlDeviceGetUUID", handle))

    def driver_uuid(self, index: int, count: int) -> str | None:
        """The UUID the kernel driver gives the index-th GPU in PCI bus order (NVML's order),
        for a GPU that does not answer NVML; None when unknown, or when the driver lists
        another number of GPUs than NVML counts (then the order cannot be trusted)."""
        if self._proc_gpus is None:
            return None
        try:
            folders = sorted(p for p in self._proc_gpus.iterdir() if p.is_dir())
            if len(folders) != count or not 0 <= index < count:
                return None
            text = (folders[index] / "information").read_text(errors="replace")
        except OSError:
            return None
        found = _UUID_LINE.search(text)
        return found.group(1) if found else None

    def _proof(self, function: str, *args: Any) -> Any:
        try:
            return self.call(function, *args)
        except NVMLError as e:
            if _code(e) in _LOST:
                raise GpuLost(f"{function}: {e}") from e
            raise

    # -- queries ----------------------------------------------------------------------------

    def call(self, function: str, *args: Any) -> Any:
        """Call an NVML function; its errors propagate as NVMLError, but NvmlUnavailable when
        the library or driver went away. A string that is not UTF-8 is decoded with
        replacement (pynvml's own decoding raises), never an error."""
        fn = getattr(self._lib, function, None)
        if fn is None:
            raise NVMLError(ERROR_FUNCTION_NOT_FOUND)
        try:
            return fn(*args)
        except UnicodeDecodeError as e:
            return decode(bytes(e.object))
        except NVMLError as e:
            if _code(e) in _UNAVAILABLE:
                self.invalidate()
                raise NvmlUnavailable(f"{function}: {e}") from e
            raise

    def query(self, function: str, *args: Any) -> Any:
        """The value of an NVML query, or None when it has none this time: the device does not
        offer it, or the call failed (logged once per function and error). Raises only
        NvmlUnavailable, which means every field is gone.
        """
        try:
            return self.call(function, *args)
        except NVMLError as e:
            code = _code(e)
            if code not in _ABSENT or code == ERROR_FUNCTION_NOT_FOUND:
                self._report_once(function, code, e)
            return None

    def supported(self, function: str, *args: Any) -> tuple[bool, Any]:
        """query(), telling apart a value the device never has (NOT_SUPPORTED, a function
        the driver lacks, a struct version it does not know): (False, None), so it is not
        asked again, from (True, value or None this time)."""
        try:
            return True, self.call(function, *args)
        except NVMLError as e:
            code = _code(e)
            if code not in _ABSENT or code == ERROR_FUNCTION_NOT_FOUND:
                self._report_once(function, code, e)
            return code not in _NEVER, None

    def field_values(self, handle: Any, fields: list[Field], prove: bool = False
                     ) -> FieldAnswers | None:
        """Many values of the GPU in one round trip (nvmlDeviceGetFieldValues), each with its
        own nvmlReturn; None when the driver lacks the call or refuses it as a whole (read
        the fields one by one instead). A failure of the whole call otherwise leaves every
        field out this time, as a failed query does, except where the call is to `prove`
        the GPU is there: then NVML_ERROR_GPU_IS_LOST or _UNKNOWN of the call (not of one
        field: one flaky sensor) raise GpuLost, as the UUID does."""
        if not fields:
            if prove:
                self.uuid(handle)
            return FieldAnswers({}, frozenset())
        function = "nvmlDeviceGetFieldValues"
        try:
            answers = self.call(function, handle, list(fields))
        except NVMLError as e:
            code = _code(e)
            if prove and code in _LOST:
                raise GpuLost(f"{function}: {e}") from e
            self._report_once(function, code, e)
            if code in _ABSENT:
                return None
            return FieldAnswers({}, frozenset())
        values: dict[Field, float] = {}
        absent: set[Field] = set()
        for asked, answer in zip(fields, answers, strict=False):
            code = int(getattr(answer, "nvmlReturn", ERROR_UNKNOWN))
            member = _VALUE_MEMBERS.get(int(getattr(answer, "valueType", -1)))
            if code == 0 and member is not None:
                values[asked] = float(getattr(answer.value, member))
            elif code in _ABSENT:
                absent.add(asked)
            else:
                self._report_once(f"{function} field {asked[0]}", code, NVMLError(code))
        return FieldAnswers(values, frozenset(absent))

    def _report_once(self, function: str, code: int, error: Exception) -> None:
        if (function, code) in self._reported:
            return
        self._reported.add((function, code))
        if code == ERROR_FUNCTION_NOT_FOUND:
            log.warning("%s is not in this driver's NVML; an older variant or nothing is used",
                        function)
        elif code == -2:
            log.warning("%s: %s (logged once)", function, error)
        else:
            log.warning("%s failed: %s; the field is skipped while it fails", function, error)

    # -- running processes: the v3/v2/v1 probe ----------------------------------------------

    def running_processes(self, handle: Any, kind: str, memory_total: float | None
                          ) -> list[RunningProcess] | None:
        """Compute or graphics processes of the GPU; None when no query variant works.

        Drivers and bindings disagree on the process struct (driver 535 with older
        nvidia-ml-py returned garbage through the v3 name): try v3, v2, then v1, keep the
        first whose layout fits, and remember it. A layout fits when most of its entries are
        plausible (a pid Linux can hand out, no more memory than the GPU has): a wrong layout
        makes nearly every entry garbage, while one odd entry in a right one (a driver's
        glitch, a pid from another namespace's view) is dropped alone, counted in the log,
        and the other processes are kept.
        """
        base = f"nvmlDeviceGet{kind.capitalize()}RunningProcesses"
        variants = [f"{base}_v3", f"{base}_v2", base]
        chosen = self._process_query.get(kind)
        if chosen is not None:
            variants.remove(chosen)
            variants.insert(0, chosen)
        for name in variants:
            try:
                raw = self.call(name, handle)
            except NVMLError as e:
                if _code(e) in (ERROR_FUNCTION_NOT_FOUND, ERROR_ARGUMENT_VERSION_MISMATCH):
                    self._report_once(name, _code(e), e)
                    continue
                if _code(e) in _ABSENT:
                    return None
                raise
            processes = [_running_process(p) for p in raw]
            plausible = [p for p in processes if _plausible(p, memory_total)]
            if processes and 2 * len(plausible) <= len(processes):
                self._report_once(name, -1, ValueError("implausible pid or memory values "
                                                       "(struct layout mismatch)"))
                continue
            if len(plausible) < len(processes):
                self._report_once(name, -2, ValueError(
                    f"{len(processes) - len(plausible)} of {len(processes)} entries with an "
                    "implausible pid or memory value, left out"))
                processes = plausible
            if self._process_query.get(kind) != name:
                self._process_query[kind] = name
                log.debug("using %s for %s processes", name, kind)
            return processes
        return None

    # -- Xid events ---------------------------------------------------------------------------

    def xid_event_set(self) -> Any:
        """An empty NVML event set, for register_xid."""
        return self.call("nvmlEventSetCreate")

    def register_xid(self, event_set: Any, handle: Any) -> str | None:
        """Register the GPU for Xid events; None when done or when the GPU has no Xid events
        (not supported: nothing to watch), else why it cannot be watched."""
        try:
            self.call("nvmlDeviceRegisterEvents", handle, EVENT_TYPE_XID, event_set)
        except NVMLError as e:
            if _code(e) in _ABSENT:
                self._report_once("nvmlDeviceRegisterEvents", _code(e), e)
                return None
            return f"nvmlDeviceRegisterEvents: {e}"
        return None

    def wait_event(self, event_set: Any, timeout_ms: int) -> Any | None:
        """The next event of the set, or None when the wait timed out."""
        try:
            return self.call("nvmlEventSetWait_v2", event_set, timeout_ms)
        except NVMLError as e:
            if _code(e) == ERROR_TIMEOUT:
                return None
            raise

    def free_event_set(self, event_set: Any) -> None:
        with contextlib.suppress(NVMLError, NvmlUnavailable):
            self.call("nvmlEventSetFree", event_set)


def handle_key(handle: Any) -> Any:
    """What identifies a device handle: the address behind a ctypes pointer (the handle in an
    NVML event is a new pointer object to the same device), else the handle itself."""
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


_NO_INSTANCE = 0xFFFFFFFF
"""The instance id a driver gives a process of a GPU without MIG."""


def _code(error: Exception) -> int:
    return int(getattr(error, "value", ERROR_UNKNOWN))


def _running_process(p: Any) -> RunningProcess:
    used = getattr(p, "usedGpuMemory", None)
    instance = getattr(p, "gpuInstanceId", None)
    return RunningProcess(int(p.pid), None if used is None else int(used),
                          None if instance is None or int(instance) == _NO_INSTANCE
                          else int(instance))


def _plausible(p: RunningProcess, memory_total: float | None) -> bool:
    if not 0 < p.pid < _PID_MAX:
        return False
    return p.used_memory_bytes is None or memory_total is None or \
        p.used_memory_bytes <= memory_total


def _describe_init_error(error: Exception) -> str:
    code = _code(error)
    if code == ERROR_LIBRARY_NOT_FOUND:
        return "libnvidia-ml.so not found: is the NVIDIA driver installed?"
    if code == ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA kernel driver is not loaded (is the module loaded? see dmesg)"
    if code == ERROR_LIB_RM_VERSION_MISMATCH:
        return "libnvidia-ml and the loaded kernel driver differ in version: reboot or " \
               "reload the driver after an upgrade"
    if code == ERROR_NO_PERMISSION:
        return "no permission to open the NVIDIA device files (/dev/nvidia*)"
    return f"NVML initialisation failed: {error}"


def decode(value: Any) -> str:
    """NVML strings: pynvml returns str, old bindings bytes; bytes that are not UTF-8 become
    U+FFFD rather than an error."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

