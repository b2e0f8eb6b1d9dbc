"""The NVML door: error mapping, re-initialisation and the process-query probe."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from gpuwatch import nvml as N
from gpuwatch.nvml import GpuLost, Nvml, NvmlUnavailable
from gpuwatch.simulate import SimulatedNode, SimulatedNvml
from simnode import T0, scenario

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
def test_a_lost_gpu_raises_gpu_lost(code: int) -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetPowerUsage=error(code)))
    with pytest.raises(GpuLost):
        nvml.query("nvmlDeviceGetPowerUsage", "h")


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


def test_memory_unavailable_to_the_driver_stays_unknown() -> None:
    nvml = Nvml(FakeLib(nvmlDeviceGetComputeRunningProcesses_v3=[
        SimpleNamespace(pid=7, usedGpuMemory=None)]))
    assert nvml.running_processes("h", "compute", 1e9) == [N.RunningProcess(7, None)]


def test_xid_wait_timeout_is_no_event() -> None:
    nvml = Nvml(FakeLib(nvmlEventSetWait_v2=error(N.ERROR_TIMEOUT)))
    assert nvml.wait_event("set", 0) is None
