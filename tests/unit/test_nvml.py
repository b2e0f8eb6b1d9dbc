"""The NVML door: error mapping, re-initialisation and the process-query probe."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from simnode import T0, scenario

from gpuwatch.exporter import nvml as N
from gpuwatch.exporter.nvml import GpuLost, Nvml, NvmlUnavailable
from gpuwatch.sim import SimulatedNode, SimulatedNvml

ONE_GPU = """
gpus:
  - processes:
      - {pid: 100, user: alice, memory_gib: 2}
"""


class FakeLib:
    """Answers with a value or raises the pynvml error given for each function."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        answer = self.answers.get("nvmlInit")
        if isinstance(answer, Exception):
            raise answer

    def nvmlShutdown(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name not in self.answers:
            raise AttributeError(name)
        answer = self.answers[name]

        def call(*args: Any) -> Any:
            if isinstance(answer, Exception):
                raise answer
            return answer
        return call


def error(code: int) -> Exception:
    return N.NVMLError(code)


def test_pynvml_errors_are_its_own_subclasses() -> None:
    assert type(error(N.ERROR_GPU_IS_LOST)).__name__ == "NVMLError_GpuIsLost"


@pytest.mark.parametrize("code", [N.ERROR_NOT_SUPPORTED, N.ERROR_NO_PERMISSION,
                                  N.ERROR_NOT_FOUND, N.ERROR_FUNCTION_NOT_FOUND])
def test_a_field_the_device_lacks_is_none(code: int) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetFanSpeed=error(code)))
    assert nvml.query("nvmlDeviceGetFanSpeed", "h") is None


def test_a_function_missing_from_the_binding_is_none() -> None:
    assert Nvml(FakeLib()).query("nvmlDeviceGetSomethingNew", "h") is None


@pytest.mark.parametrize("code", [N.ERROR_GPU_IS_LOST, N.ERROR_UNKNOWN])
def test_a_lost_gpu_raises_gpu_lost_from_the_calls_that_prove_it_is_there(code: int) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetHandleByIndex=error(code), nvmlDeviceGetUUID=error(code)))
    with pytest.raises(GpuLost):
        nvml.handle(0)
    with pytest.raises(GpuLost):
        nvml.uuid("h")


@pytest.mark.parametrize("code", [N.ERROR_GPU_IS_LOST, N.ERROR_UNKNOWN, N.ERROR_TIMEOUT])
def test_any_error_of_a_field_costs_that_field_only_logged_once(
        code: int, caplog: pytest.LogCaptureFixture) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetPowerUsage=error(code)))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert nvml.query("nvmlDeviceGetPowerUsage", "h") is None
    assert len([r for r in caplog.records if "nvmlDeviceGetPowerUsage" in r.message]) == 1


def not_utf8(*args: Any) -> str:
    """What pynvml's convertStrBytes does with a string that is not UTF-8."""
    return b"NVIDIA \xff A100".decode()


def test_a_string_that_is_not_utf8_is_decoded_with_replacement() -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetName=None, nvmlDeviceGetUUID=None))
    nvml._lib.nvmlDeviceGetName = not_utf8
    nvml._lib.nvmlDeviceGetUUID = not_utf8
    assert nvml.query("nvmlDeviceGetName", "h") == "NVIDIA \ufffd A100"
    assert nvml.uuid("h") == "NVIDIA \ufffd A100"
    assert N.decode(b"GPU-\xfe") == "GPU-\ufffd"


def test_the_host_drivers_gpus_are_not_read_for_a_simulated_node() -> None:
    assert Nvml(FakeLib())._proc_gpus is None
    assert Nvml()._proc_gpus == N.PROC_GPUS


def test_function_not_found_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetPowerUsage=error(N.ERROR_FUNCTION_NOT_FOUND)))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            nvml.query("nvmlDeviceGetPowerUsage", "h")
    assert len([r for r in caplog.records if "nvmlDeviceGetPowerUsage" in r.message]) == 1


@pytest.mark.parametrize(("code", "hint"), [
    (N.ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so not found"),
    (N.ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
    (N.ERROR_LIB_RM_VERSION_MISMATCH, "differ in version"),
])
def test_no_driver_is_unavailable_with_a_reason(code: int, hint: str) -> None:
    with pytest.raises(NvmlUnavailable, match=hint):
        Nvml(FakeLib(nvmlInit=error(code))).ensure_initialized()


def test_losing_the_driver_mid_run_reinitialises_on_the_next_call() -> None:
    lib = FakeLib(nvmlSystemGetDriverVersion="550.54.15", nvmlSystemGetCudaDriverVersion=12040,
                  nvmlDeviceGetCount=error(N.ERROR_UNINITIALIZED))
    nvml = Nvml(lib)
    nvml.ensure_initialized()
    assert (nvml.driver_version, nvml.cuda_version, nvml.generation) == ("550.54.15", "12.4", 1)
    with pytest.raises(NvmlUnavailable):
        nvml.device_count()
    lib.answers["nvmlDeviceGetCount"] = 2
    nvml.ensure_initialized()
    assert (lib.inits, nvml.generation, nvml.device_count()) == (2, 2, 2)


def sim(api: str) -> tuple[Nvml, Any]:
    s = scenario(f"process_api: {api}\n{ONE_GPU}")
    nvml = Nvml(SimulatedNvml(SimulatedNode(s, clock=lambda: T0)))
    nvml.ensure_initialized()
    return nvml, nvml.handle(0)


@pytest.mark.parametrize("api", ["v3", "v2", "v1", "broken_v3"])
def test_process_query_finds_the_variant_the_driver_has(api: str) -> None:
    nvml, handle = sim(api)
    processes = nvml.running_processes(handle, "compute", 80 * 2**30)
    assert processes == [N.RunningProcess(100, 2 * 2**30)]


def test_the_working_variant_is_remembered(caplog: pytest.LogCaptureFixture) -> None:
    nvml, handle = sim("broken_v3")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            nvml.running_processes(handle, "compute", 80 * 2**30)
    assert nvml._process_query["compute"] == "nvmlDeviceGetComputeRunningProcesses_v2"
    assert sum("struct layout" in r.message for r in caplog.records) == 1


def test_no_variant_at_all_is_none() -> None:
    missing = error(N.ERROR_FUNCTION_NOT_FOUND)
    nvml = Nvml(FakeLib(nvmlDeviceGetComputeRunningProcesses_v3=missing,
                        nvmlDeviceGetComputeRunningProcesses_v2=missing,
                        nvmlDeviceGetComputeRunningProcesses=missing))
    assert nvml.running_processes("h", "compute", None) is None


def processes(*pids: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=2**30) for pid in pids]


def test_one_implausible_entry_is_dropped_and_the_others_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetComputeRunningProcesses_v3=processes(7, 1 << 40, 9)))
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert nvml.running_processes("h", "compute", 80 * 2**30) == [
                N.RunningProcess(7, 2**30), N.RunningProcess(9, 2**30)]
    assert sum("implausible" in r.message for r in caplog.records) == 1


def test_a_layout_that_is_mostly_garbage_is_the_wrong_one() -> None:
    # the first entry reads right through any layout (pid and memory come first): the rest
    # are shifted garbage
    nvml = Nvml(FakeLib(nvmlDeviceGetComputeRunningProcesses_v3=processes(7, 1 << 40, 0),
                        nvmlDeviceGetComputeRunningProcesses_v2=processes(7, 8, 9)))
    assert nvml.running_processes("h", "compute", None) == [
        N.RunningProcess(p, 2**30) for p in (7, 8, 9)]


def test_memory_unavailable_to_the_driver_stays_unknown() -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetComputeRunningProcesses_v3=[
        SimpleNamespace(pid=7, usedGpuMemory=None)]))
    assert nvml.running_processes("h", "compute", 1e9) == [N.RunningProcess(7, None)]


def test_nvml_initialised_is_logged_once_per_driver(caplog: pytest.LogCaptureFixture) -> None:
    lib = FakeLib(nvmlSystemGetDriverVersion="550.54.15", nvmlSystemGetCudaDriverVersion=12040)
    nvml = Nvml(lib)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            nvml.ensure_initialized()
            nvml.invalidate()  # a call failed: NVML is initialised again on the next scrape
        lib.answers["nvmlSystemGetDriverVersion"] = "560.28.03"  # upgraded: news again
        nvml.ensure_initialized()
    announced = [r.message for r in caplog.records
                 if "NVML initialised" in r.message and r.levelno >= logging.INFO]
    assert announced == ["NVML initialised: driver 550.54.15, CUDA 12.4",
                         "NVML initialised: driver 560.28.03, CUDA 12.4"]


def test_xid_wait_timeout_is_no_event() -> None:
    nvml = Nvml(FakeLib(nvmlEventSetWait_v2=error(N.ERROR_TIMEOUT)))
    assert nvml.wait_event("set", 0) is None


# -- many values in one call: nvmlDeviceGetFieldValues ---------------------------------------

def field(field_id: int, code: int, kind: int = 3, **value: float) -> SimpleNamespace:
    return SimpleNamespace(fieldId=field_id, scopeId=0, nvmlReturn=code, valueType=kind,
                           value=SimpleNamespace(**value))


def test_field_values_are_read_by_their_type_each_with_its_own_return(caplog) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetFieldValues=[
        field(1, 0, kind=0, dVal=1.5), field(2, 0, kind=1, uiVal=7), field(3, 0, ullVal=2**40),
        field(4, N.ERROR_NOT_SUPPORTED), field(5, N.ERROR_UNKNOWN)]))
    for _ in range(2):
        with caplog.at_level(logging.WARNING):
            answers = nvml.field_values("h", [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)])
    assert answers is not None
    assert answers.values == {(1, 0): 1.5, (2, 0): 7, (3, 0): 2**40}
    assert answers.absent == {(4, 0)}  # not there; field 5 failed this time only
    assert len([r for r in caplog.records if "field 5" in r.message]) == 1


def test_field_values_without_the_call_or_refused_whole_are_none() -> None:
    assert Nvml(FakeLib()).field_values("h", [(1, 0)]) is None
    refused = Nvml(FakeLib(nvmlDeviceGetFieldValues=error(N.ERROR_NOT_SUPPORTED)))
    assert refused.field_values("h", [(1, 0)]) is None


def test_a_failed_field_values_call_costs_its_values_this_time() -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetFieldValues=error(N.ERROR_GPU_IS_LOST)))
    assert nvml.field_values("h", [(1, 0)]) == N.FieldAnswers({}, frozenset())


@pytest.mark.parametrize(("code", "never"), [(N.ERROR_NOT_SUPPORTED, True),
                                             (N.ERROR_FUNCTION_NOT_FOUND, True),
                                             (N.ERROR_NO_DATA, False), (N.ERROR_UNKNOWN, False)])
def test_supported_tells_a_value_never_there_from_one_missing_now(code: int, never: bool
                                                                 ) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetFanSpeed=error(code)))
    assert nvml.supported("nvmlDeviceGetFanSpeed", "h") == (not never, None)
    assert Nvml(FakeLib(nvmlDeviceGetFanSpeed=30)).supported("nvmlDeviceGetFanSpeed", "h") == \
        (True, 30)


# -- the simulator's MIG devices, answered as a driver answers --------------------------------

MIG_GPU = """
gpus:
  - name: NVIDIA A100-SXM4-80GB
    mig:
      - profile: 3g.40gb
        gpu_instance_id: 1
        processes:
          - {pid: 300, user: alice, memory_gib: 5}
      - {profile: 1g.10gb, gpu_instance_id: 9, gone_after_seconds: 60}
"""


def _sim(text: str, elapsed: list[float]) -> SimulatedNvml:
    return SimulatedNvml(SimulatedNode(scenario(text), clock=lambda: T0 + elapsed[0], start=T0))


def test_the_simulator_answers_mig_devices_and_fails_a_vanished_ones_handle() -> None:
    elapsed = [0.0]
    sim = _sim(MIG_GPU, elapsed)
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetMigMode(parent) == [1, 1]
    assert sim.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    first = sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    second = sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
    with pytest.raises(N.NVMLError) as absent:
        sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 2)
    assert absent.value.value == N.ERROR_NOT_FOUND
    assert (sim.nvmlDeviceGetGpuInstanceId(first), sim.nvmlDeviceGetComputeInstanceId(first)
            ) == (1, 0)
    assert sim.nvmlDeviceGetUUID(first).startswith("MIG-")
    assert sim.nvmlDeviceGetUUID(first) != sim.nvmlDeviceGetUUID(second)
    assert sim.nvmlDeviceGetMemoryInfo(first).total == 40 * (1 << 30)
    assert sim.nvmlDeviceGetAttributes(second).gpuInstanceSliceCount == 1
    used = sim.nvmlDeviceGetMemoryInfo(first).used
    assert 5 * (1 << 30) <= used < sim.nvmlDeviceGetMemoryInfo(parent).total
    assert sim.nvmlDeviceGetMemoryInfo(second).used < (1 << 30)  # no process on it
    with pytest.raises(N.NVMLError) as unsupported:
        sim.nvmlDeviceGetUtilizationRates(first)  # per-slice utilisation: not on drivers
    assert unsupported.value.value == N.ERROR_NOT_SUPPORTED
    assert sim.nvmlDeviceGetUtilizationRates(parent).gpu > 0  # the parent still answers
    [p] = sim.nvmlDeviceGetComputeRunningProcesses_v3(parent)
    assert (p.pid, p.gpuInstanceId, p.computeInstanceId) == (300, 1, 0)
    elapsed[0] = 61.0  # reconfigured: the 1g.10gb slice is gone
    with pytest.raises(N.NVMLError) as gone:
        sim.nvmlDeviceGetUUID(second)
    assert gone.value.value == N.ERROR_NOT_FOUND
    with pytest.raises(N.NVMLError):
        sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)


def test_the_simulator_tells_mig_pending_and_a_gpu_without_mig() -> None:
    sim = _sim("""
gpus:
  - {name: NVIDIA H100 80GB HBM3, mig_pending: true}
  - {name: NVIDIA GeForce RTX 3090}
""", [0.0])
    pending, consumer = sim.nvmlDeviceGetHandleByIndex(0), sim.nvmlDeviceGetHandleByIndex(1)
    assert sim.nvmlDeviceGetMigMode(pending) == [0, 1]
    for call in (sim.nvmlDeviceGetMigMode, sim.nvmlDeviceGetMaxMigDeviceCount):
        with pytest.raises(N.NVMLError) as e:
            call(consumer)
        assert e.value.value == N.ERROR_NOT_SUPPORTED


@pytest.mark.parametrize(("slices", "message"), [
    ("[{profile: 1g.10, gpu_instance_id: 1}]", "is not a MIG profile"),
    ("[{profile: 4g.40gb, gpu_instance_id: 1}, {profile: 4g.40gb, gpu_instance_id: 2}]",
     "more than the 7"),
    ("[{profile: 1g.10gb, gpu_instance_id: 1}, {profile: 1g.10gb, gpu_instance_id: 1}]",
     "another slice's"),
    ("[{profile: 1g.10gb}]", "missing key 'gpu_instance_id'"),
])
def test_a_bad_mig_slice_is_refused_naming_the_field(slices: str, message: str) -> None:
    from gpuwatch.sim.scenario import ScenarioError
    with pytest.raises(ScenarioError, match=message):
        scenario(f"gpus:\n  - mig: {slices}\n    name: A100\n")
