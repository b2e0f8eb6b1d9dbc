"""The exporter over simulated nodes: values in base units, faults isolated, scrapes bounded."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import pytest
from simnode import OPTIONS, T0, build
from simnode import scenario as scenario_of

from gpuwatch.exporter import nvml as N
from gpuwatch.exporter.collectors.process import ProcessOptions
from gpuwatch.exporter.collectors.xid import XidCollector
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.sim import GIB, SimulatedNode, SimulatedNvml, load_scenario

IDLE_GPU = """
gpus:
  - name: NVIDIA GeForce RTX 3090
    memory_gib: 24
    power_limit_watts: 350
    idle_power_watts: 25
    idle_temperature: 31
    fan: true
    ecc: false
    max_clocks_mhz: {graphics: 2100, sm: 2100, memory: 9751, video: 1950}
"""


SHORT_TIMEOUT = replace(OPTIONS, collection_timeout=0.3)


def gpu(index: int, node_uuid: str) -> dict[str, str]:
    return {"gpu": str(index), "uuid": node_uuid}


def uuid_of(node: object, index: int) -> str:
    from gpuwatch.sim import gpu_uuid

    return gpu_uuid(getattr(node, "name", "test-scenario"), index)


@pytest.fixture
def idle():
    node = build(IDLE_GPU)
    yield node
    node.close()


def test_units_are_converted_at_the_edge(idle) -> None:
    labels = gpu(0, uuid_of(None, 0))
    assert idle.value("nvidia_gpu_power_usage_watts", **labels) == 25.0
    assert idle.value("nvidia_gpu_power_limit_watts", **labels) == 350.0
    assert idle.value("nvidia_gpu_memory_total_bytes", **labels) == 24 * GIB
    assert idle.value("nvidia_gpu_temperature_celsius", **labels) == 31.0
    assert idle.value("nvidia_gpu_fan_speed_ratio", **labels) == 0.3
    assert idle.value("nvidia_gpu_utilization_ratio", **labels) == 0.0
    assert idle.value("nvidia_gpu_clock_max_hertz", clock="graphics", **labels) == 2.1e9
    assert idle.value("nvidia_gpu_clock_hertz", clock="memory", **labels) == \
        pytest.approx(9751e6 * 0.3, rel=1e-3)
    assert idle.value("nvidia_gpu_performance_state", **labels) == 8
    assert idle.value("nvidia_gpu_clock_event_active", reason="gpu_idle", **labels) == 1
    assert idle.value("nvidia_gpu_clock_event_active", reason="sw_power_cap", **labels) is None


def test_a_clock_event_reason_is_served_from_its_first_activity_on() -> None:
    now = [T0]
    node = build("gpus:\n  - processes:\n      - {pid: 5, user: ann, period_seconds: 100, "
                 "active_seconds: 50}\n", clock=lambda: now[0])
    labels = dict(gpu(0, uuid_of(None, 0)), reason="gpu_idle")
    assert node.value("nvidia_gpu_clock_event_active", **labels) is None  # busy: never idle yet
    now[0] += 60
    assert node.value("nvidia_gpu_clock_event_active", **labels) == 1
    now[0] += 50
    assert node.value("nvidia_gpu_clock_event_active", **labels) == 0  # busy again: still there
    node.close()


def test_info_carries_the_descriptive_labels(idle) -> None:
    assert idle.value("nvidia_gpu_info", gpu="0", uuid=uuid_of(None, 0),
                      name="NVIDIA GeForce RTX 3090", display_name="RTX 3090",
                      pci_bus_id="00000000:17:00.0", driver_version="550.54.15",
                      cuda_version="12.4", vbios_version="92.00.45.00.06", mig_mode="",
                      compute_mode="default") == 1


def test_display_names_come_from_the_config_file(tmp_path) -> None:
    config = tmp_path / "gpuwatch.yml"
    config.write_text('display_names:\n  "NVIDIA GeForce RTX 3090": "3090"\n')
    node = build(IDLE_GPU, replace(OPTIONS, config_file=config))
    assert 'display_name="3090"' in node.text()
    node.close()


def test_unsupported_fields_are_left_out_not_zero(idle) -> None:
    text = idle.text()
    assert "nvidia_gpu_ecc_errors_total{" not in text  # ECC off on this GeForce
    lost = build("lost-gpu")
    text = lost.text()
    assert 'nvidia_gpu_power_usage_watts{gpu="3"' not in text
    assert 'nvidia_gpu_energy_joules_total{gpu="3"' not in text
    assert 'nvidia_gpu_temperature_celsius{gpu="3"' in text
    assert "NaN" not in text
    lost.close()


def test_a_lost_gpu_is_down_and_the_others_are_read() -> None:
    node = build("lost-gpu")
    text = node.text()
    assert node.value("nvidia_gpu_up", gpu="1", uuid="") == 0
    for index in (0, 2, 3):
        assert node.value("nvidia_gpu_up", gpu=str(index), uuid=uuid_of(node.sim.scenario,
                                                                          index)) == 1
    assert 'nvidia_gpu_utilization_ratio{gpu="1"' not in text
    assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    node.close()


def test_a_gpu_lost_while_running_keeps_its_uuid() -> None:
    now = [T0]
    node = build("gpus:\n  - {lost_after_seconds: 60}\n  - {}\n", clock=lambda: now[0])
    uuid = uuid_of(None, 0)
    assert node.value("nvidia_gpu_up", gpu="0", uuid=uuid) == 1
    now[0] += 61
    assert node.value("nvidia_gpu_up", gpu="0", uuid=uuid) == 0
    assert node.value("nvidia_gpu_up", gpu="1", uuid=uuid_of(None, 1)) == 1
    node.close()


def test_no_driver_is_reported_and_retried_on_later_scrapes(caplog) -> None:
    node = build("driver: false\ngpus:\n  - {}\n")
    text = node.text()
    assert node.value("nvidia_gpu_nvml_up") == 0
    for collector in ("gpu", "process", "xid"):
        assert node.value("nvidia_gpu_scrape_collector_success", collector=collector) == 0
    assert "nvidia_gpu_up{" not in text
    # one line, as the README says, not one per collector
    assert sum("libnvidia-ml.so not found" in r.message for r in caplog.records) == 1
    node.text()  # the failure is logged when it starts, not at every scrape
    assert sum("libnvidia-ml.so not found" in r.message for r in caplog.records) == 1
    node.sim.driver_loaded = True  # the driver is installed while the exporter runs
    assert node.value("nvidia_gpu_nvml_up") == 1
    assert node.value("nvidia_gpu_up", gpu="0", uuid=uuid_of(None, 0)) == 1
    assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    node.close()


def test_processes_users_and_roll_ups() -> None:
    node = build("workstation")
    labels = gpu(1, uuid_of(node.sim.scenario, 1))
    assert node.value("nvidia_gpu_processes", **labels) == 2
    assert node.value("nvidia_gpu_users_info", users="alice,bob", **labels) == 1
    assert node.value("nvidia_gpu_user_memory_used_bytes", user="alice", **labels) == 9 * GIB
    assert node.value("nvidia_gpu_user_memory_used_bytes", user="bob", **labels) == 6.5 * GIB
    assert node.value("nvidia_gpu_user_processes", user="bob", **labels) == 1
    process = dict(labels, pid="52201", user="bob", command="python", container_id="",
                   slurm_job_id="")
    assert node.value("nvidia_gpu_process_memory_used_bytes", **process) == 6.5 * GIB
    assert node.value("nvidia_gpu_process_start_time_seconds", **process) == T0 - 1800
    free = gpu(3, uuid_of(node.sim.scenario, 3))
    assert node.value("nvidia_gpu_processes", **free) == 0
    assert node.value("nvidia_gpu_users_info", users="", **free) == 1
    node.close()


def test_container_and_slurm_job_labels() -> None:
    node = build("server")
    text = node.text()
    assert 'container_id="3f4e1b2c9d8a",gpu="2",pid="81234"' in text
    assert 'gpu="0",pid="73001",slurm_job_id="4242",user="carol"' in text
    node.close()


def test_a_process_that_exits_mid_read_has_no_series_but_still_holds_the_gpu() -> None:
    node = build("server")
    labels = gpu(6, uuid_of(node.sim.scenario, 6))
    # NVML listed three pids; one is gone before the host could name it: it still counts
    # (a pid in another pid namespace looks the same, and its GPU is not free)
    assert node.value("nvidia_gpu_processes", **labels) == 3
    assert node.value("nvidia_gpu_processes_unresolved", **labels) == 1
    assert 'pid="66003"' not in node.text()
    assert node.value("nvidia_gpu_processes_unresolved", **gpu(0, uuid_of(node.sim.scenario, 0))
                      ) == 0
    node.close()


def test_a_process_with_compute_and_graphics_contexts_counts_once() -> None:
    node = build("gpus:\n  - processes:\n      - {pid: 5, user: ann, kind: both}\n")
    assert node.value("nvidia_gpu_processes", **gpu(0, uuid_of(None, 0))) == 1
    node.close()


def test_processes_come_and_go_with_their_series() -> None:
    now = [T0]
    node = build("gpus:\n  - processes:\n      - {pid: 5, user: ann, period_seconds: 100, "
                 "active_seconds: 50}\n", clock=lambda: now[0])
    labels = gpu(0, uuid_of(None, 0))
    assert 'pid="5"' in node.text()
    now[0] += 60
    text = node.text()
    assert 'pid="5"' not in text
    assert node.value("nvidia_gpu_processes", **labels) == 0
    now[0] += 50  # the next cycle: a new process, a new pid
    assert 'pid="12"' in node.text()
    node.close()


def test_the_cap_keeps_the_largest_processes_and_counts_the_rest() -> None:
    node = build("server", replace(OPTIONS, process=ProcessOptions(max_per_gpu=1)))
    labels = gpu(6, uuid_of(node.sim.scenario, 6))
    text = node.text()
    assert text.count('nvidia_gpu_process_memory_used_bytes{command="python",container_id="",'
                      'gpu="6"') == 1
    assert node.value("nvidia_gpu_process_series_dropped_total", **labels) == 2
    assert node.value("nvidia_gpu_user_processes", user="alice", **labels) == 2
    node.close()


def test_without_pid_labels_processes_of_one_user_and_command_are_summed() -> None:
    node = build("server", replace(OPTIONS, process=ProcessOptions(pid=False)))
    labels = dict(gpu(6, uuid_of(node.sim.scenario, 6)), user="alice", command="python",
                  container_id="", slurm_job_id="")
    assert node.value("nvidia_gpu_process_memory_used_bytes", **labels) == 24 * GIB
    assert node.value("nvidia_gpu_process_start_time_seconds", **labels) == T0 - 7200
    assert "pid=" not in node.text()
    node.close()


def test_command_label_modes() -> None:
    cmdline = build("workstation",
                    replace(OPTIONS, process=ProcessOptions(command="cmdline")))
    assert 'command="python train.py --config resnet50.yaml"' in cmdline.text()
    cmdline.close()
    none = build("workstation", replace(OPTIONS, process=ProcessOptions(command="none")))
    text = none.text()
    assert "command=" not in text
    assert 'nvidia_gpu_process_memory_used_bytes{container_id="",gpu="0",pid="41021"' in text
    none.close()


def test_collectors_can_be_turned_off() -> None:
    node = build("workstation", replace(OPTIONS, collectors=frozenset({"gpu"})))
    text = node.text()
    assert "nvidia_gpu_processes{" not in text
    assert "nvidia_gpu_utilization_ratio{" in text
    assert 'collector="process"' not in text
    assert node.sim.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 0
    node.close()


def test_xid_events_are_counted() -> None:
    node = build("server")
    labels = dict(gpu(7, uuid_of(node.sim.scenario, 7)), xid="13")
    assert node.value("nvidia_gpu_xid_errors_total", **labels) == 1
    assert node.value("nvidia_gpu_xid_last_timestamp_seconds", **labels) == T0
    assert node.value("nvidia_gpu_xid_errors_total", **labels) == 1  # counted once
    node.close()


def test_the_xid_watcher_thread_counts_events_in_the_background() -> None:
    scenario = load_scenario("server")
    lib = SimulatedNvml(SimulatedNode(scenario))
    nvml = Nvml(lib)
    nvml.ensure_initialized()
    from gpuwatch.exporter.collectors import Device

    devices = [Device(i, nvml.handle(i), f"uuid-{i}") for i in range(len(scenario.gpus))]
    lib.nvmlDeviceGetUUID = lambda h: f"uuid-{h.index}"  # type: ignore[method-assign]
    collector = XidCollector(background=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            reading = collector.read_node(nvml, devices)
            if reading.counts:
                break
            time.sleep(0.05)
        assert reading.counts == {"uuid-7": {13: (1, pytest.approx(time.time(), abs=30))}}
    finally:
        collector.close()


def test_a_hung_nvml_call_fails_the_collection_not_the_scrape() -> None:
    node = build("gpus:\n  - {}\n  - {hang: [nvmlDeviceGetTemperature]}\n", SHORT_TIMEOUT)
    text = node.text()
    assert 'nvidia_gpu_scrape_collector_success{collector="gpu"} 0.0' in text
    assert 'nvidia_gpu_utilization_ratio{gpu="0"' in text
    assert 'nvidia_gpu_utilization_ratio{gpu="1"' not in text
    calls = node.sim.calls["nvmlDeviceGetTemperature"]
    assert calls == 2  # GPU 0 answered, GPU 1 is stuck in it
    # the hung call has not returned: that GPU is not read again, the scrape still answers
    text = node.text()
    assert 'nvidia_gpu_scrape_collector_success{collector="gpu"} 0.0' in text
    assert node.sim.calls["nvmlDeviceGetTemperature"] == calls + 1
    node.sim.release_hangs()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            node.value("nvidia_gpu_scrape_collector_success", collector="gpu") != 1:
        time.sleep(0.05)
    assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    node.close()


def test_concurrent_scrapes_share_one_collection() -> None:
    node = build("gpus:\n  - {hang: [nvmlDeviceGetTemperature]}\n",
                 replace(OPTIONS, collection_timeout=10))
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(node.text()))
    first.start()
    deadline = time.monotonic() + 5
    while node.sim.calls["nvmlDeviceGetTemperature"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: results.append(node.text()))
    second.start()
    time.sleep(0.2)
    node.sim.release_hangs()
    first.join(5)
    second.join(5)
    assert len(results) == 2 and results[0] == results[1]
    assert node.sim.calls["nvmlDeviceGetCount"] == 1
    node.close()


def test_gpus_are_read_concurrently() -> None:
    scenario = "latency_seconds: 0.002\ngpus:\n  - {}\n  - {}\n  - {}\n  - {}\n"
    node = build(scenario, frozen_timer=False)
    node.text()
    assert node.sim.peak_in_flight >= 2
    node.close()


# -- a GPU is up only with a fresh reading; every NVML call under the deadline ----------------

def wait_until(check, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("function", ["nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage"])
def test_a_hung_gpu_is_down_with_a_reason_and_its_neighbours_up(function: str) -> None:
    # the power reading hangs nvmlDeviceGetFieldValues, which asks for it
    node = build(f"gpus:\n  - {{}}\n  - {{hang: [{function}]}}\n", SHORT_TIMEOUT)
    hung, fine = uuid_of(None, 1), uuid_of(None, 0)
    try:
        text = node.text()  # one scrape: value() would scrape again
        assert f'nvidia_gpu_up{{gpu="1",uuid="{hung}"}} 0.0' in text
        assert f'nvidia_gpu_down_info{{gpu="1",reason="timeout",uuid="{hung}"}} 1.0' in text
        assert f'nvidia_gpu_up{{gpu="0",uuid="{fine}"}} 1.0' in text
        assert 'nvidia_gpu_down_info{gpu="0"' not in text
        # the next scrape does not ask it again: still down, now because the call hangs
        assert node.value("nvidia_gpu_down_info", reason="hung", **gpu(1, hung)) == 1
        node.sim.release_hangs()
        assert wait_until(lambda: node.value("nvidia_gpu_up", **gpu(1, hung)) == 1)
        assert "nvidia_gpu_down_info{" not in node.text()
    finally:
        node.close()


@pytest.mark.parametrize("function", ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID",
                                      "nvmlDeviceGetMemoryInfo"])
def test_a_gpu_that_hangs_when_opened_is_down_and_blocks_nobody(function: str) -> None:
    node = build(f"gpus:\n  - {{}}\n  - {{hang: [{function}]}}\n  - {{}}\n", SHORT_TIMEOUT,
                 frozen_timer=False)
    try:
        began = time.monotonic()
        text = node.text()
        assert time.monotonic() - began < 5  # the deadline, not the hang
        assert 'nvidia_gpu_up{gpu="1",uuid=""} 0.0' in text
        assert 'nvidia_gpu_down_info{gpu="1",reason="timeout",uuid=""} 1.0' in text
        for index in (0, 2):
            assert node.value("nvidia_gpu_up", **gpu(index, uuid_of(None, index))) == 1
            assert f'nvidia_gpu_utilization_ratio{{gpu="{index}"' in text
        calls = node.sim.calls[function]
        assert 'reason="hung"' in node.text()
        # the hung open is not repeated; GPUs 0 and 2 read their memory once each, and their
        # field-values call, not their UUID, proves they are still there
        assert node.sim.calls[function] - calls == (2 if "Memory" in function else 0)
        node.sim.release_hangs()
        assert wait_until(lambda: node.value("nvidia_gpu_up", **gpu(1, uuid_of(None, 1))) == 1)
    finally:
        node.close()


@pytest.mark.parametrize("function", ["nvmlInit", "nvmlDeviceGetCount"])
def test_a_hung_initialisation_is_nvml_down_and_the_scrape_answers(function: str) -> None:
    node = build(f"hang: [{function}]\ngpus:\n  - {{}}\n", SHORT_TIMEOUT, frozen_timer=False)
    try:
        began = time.monotonic()
        text = node.text()
        assert time.monotonic() - began < 5
        assert node.value("nvidia_gpu_nvml_up") == 0
        assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 0
        assert "nvidia_gpu_up{" not in text
        node.text()
        assert node.sim.calls[function] == 1  # waited for, not called again
        node.sim.release_hangs()
        assert wait_until(lambda: node.value("nvidia_gpu_up", **gpu(0, uuid_of(None, 0))) == 1)
        assert node.value("nvidia_gpu_nvml_up") == 1
    finally:
        node.close()


@pytest.mark.parametrize("error", ["Unknown", "GPUIsLost"])
def test_one_fields_error_costs_that_field_only(error: str, caplog) -> None:
    node = build(f"gpus:\n  - errors: {{nvmlDeviceGetTemperature: {error}}}\n")
    labels = gpu(0, uuid_of(None, 0))
    text = node.text()
    assert node.value("nvidia_gpu_up", **labels) == 1
    assert 'nvidia_gpu_temperature_celsius{gpu="0"' not in text
    assert node.value("nvidia_gpu_power_limit_watts", **labels) == 400
    assert node.value("nvidia_gpu_processes", **labels) == 0
    node.text()
    assert sum("nvmlDeviceGetTemperature" in r.message for r in caplog.records) == 1
    node.close()


@pytest.mark.parametrize("error", ["Unknown", "GPUIsLost"])
def test_one_field_values_error_costs_that_value_only(error: str, caplog) -> None:
    # the power fields answer with the error of nvmlDeviceGetPowerUsage, in the one call
    node = build(f"gpus:\n  - errors: {{nvmlDeviceGetPowerUsage: {error}}}\n")
    labels = gpu(0, uuid_of(None, 0))
    text = node.text()
    assert node.value("nvidia_gpu_up", **labels) == 1
    assert 'nvidia_gpu_power_usage_watts{gpu="0"' not in text
    assert node.value("nvidia_gpu_power_limit_watts", **labels) == 400
    assert node.value("nvidia_gpu_energy_joules_total", **labels) is not None
    logged = sum("nvmlDeviceGetFieldValues field" in r.message for r in caplog.records)
    node.text()
    assert logged > 0  # once per field (average and instant power)
    assert sum("nvmlDeviceGetFieldValues field" in r.message for r in caplog.records) == logged
    assert node.sim.calls["nvmlDeviceGetPowerUsage"] == 0  # a failure is not "not there"
    node.close()


@pytest.mark.parametrize("function", ["nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID"])
def test_unknown_from_a_presence_call_is_a_lost_gpu(function: str) -> None:
    node = build(f"gpus:\n  - errors: {{{function}: Unknown}}\n  - {{}}\n")
    assert node.value("nvidia_gpu_down_info", reason="lost", gpu="0", uuid="") == 1
    assert node.value("nvidia_gpu_up", **gpu(1, uuid_of(None, 1))) == 1
    node.close()


def test_a_lost_gpu_is_logged_when_it_goes_and_when_it_comes_back(caplog) -> None:
    now = [T0]
    node = build("gpus:\n  - {lost_after_seconds: 60, back_after_seconds: 120}\n",
                 clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        node.text()
        now[0] += 61
        node.text()
        node.text()
        now[0] += 60
        node.text()
    lines = [r for r in caplog.records
             if r.name == "gpuwatch.exporter.scrape" and "GPU 0" in r.message]
    assert [(r.levelno, "down (lost)" in r.message) for r in lines] == \
        [(logging.WARNING, True), (logging.INFO, False)]
    assert "answers again" in lines[1].message
    node.close()


def test_a_gpu_lost_at_start_takes_its_uuid_from_the_kernel_driver(tmp_path) -> None:
    for bus, uuid in (("0000:17:00.0", "GPU-aaaaaaaa-0000-0000-0000-000000000000"),
                      ("0000:27:00.0", "GPU-bbbbbbbb-0000-0000-0000-000000000000")):
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(
            f"Model: \t\t NVIDIA A100\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\n"
            f"Bus Location: \t {bus}\n")
    node = build("gpus:\n  - {}\n  - {lost: true}\n")
    node.exporter._nvml._proc_gpus = tmp_path
    assert node.value("nvidia_gpu_up", gpu="1", uuid="GPU-bbbbbbbb-0000-0000-0000-000000000000") \
        == 0
    node.close()


def test_a_gpu_lost_at_start_gets_its_uuid_when_it_answers() -> None:
    now = [T0]
    node = build("gpus:\n  - {lost_after_seconds: 0, back_after_seconds: 60}\n",
                 clock=lambda: now[0])
    assert node.value("nvidia_gpu_up", gpu="0", uuid="") == 0
    now[0] += 61
    assert node.value("nvidia_gpu_up", **gpu(0, uuid_of(None, 0))) == 1
    assert 'uuid=""' not in node.text()
    node.close()


def test_a_gpu_that_vanishes_from_the_count_is_reported_down() -> None:
    now = [T0]
    node = build("gpus:\n  - {}\n  - {missing_after_seconds: 60}\n  - {}\n",
                 clock=lambda: now[0])
    assert node.value("nvidia_gpu_up", **gpu(1, uuid_of(None, 1))) == 1
    now[0] += 61
    text = node.text()
    # the GPUs after it move up, and the one gone is counted after them, down, by its uuid
    assert node.value("nvidia_gpu_up", **gpu(0, uuid_of(None, 0))) == 1
    assert node.value("nvidia_gpu_up", **gpu(1, uuid_of(None, 2))) == 1
    assert node.value("nvidia_gpu_up", **gpu(2, uuid_of(None, 1))) == 0
    assert node.value("nvidia_gpu_down_info", reason="missing", **gpu(2, uuid_of(None, 1))) == 1
    assert text.count("nvidia_gpu_up{") == 3
    node.close()


def test_nvml_initialised_is_logged_once_while_calls_fail_after_a_good_init(caplog) -> None:
    node = build("gpus:\n  - {}\n")
    count = node.sim.nvmlDeviceGetCount
    node.sim.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(  # type: ignore[method-assign]
        N.NVMLError(N.ERROR_UNINITIALIZED))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            node.text()
    assert node.value("nvidia_gpu_nvml_up") == 0
    assert sum("NVML initialised" in r.message for r in caplog.records
               if r.levelno >= logging.INFO) == 1
    node.sim.nvmlDeviceGetCount = count  # type: ignore[method-assign]
    assert node.value("nvidia_gpu_nvml_up") == 1
    node.close()


def test_a_name_that_is_not_utf8_is_decoded_with_replacement() -> None:
    node = build("gpus:\n  - {}\n")

    def name(h: object) -> str:  # what pynvml's convertStrBytes does with such bytes
        return b"NVIDIA \xff\xfe A100".decode()

    node.sim.nvmlDeviceGetName = name  # type: ignore[method-assign,assignment]
    text = node.text()
    assert 'name="NVIDIA \ufffd\ufffd A100"' in text
    assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    node.close()


# -- Xid events when they matter: a GPU that falls off the bus and comes back -----------------

LOST_AND_BACK = """
gpus:
  - lost_after_seconds: 60
    back_after_seconds: 120
    xid:
      - {code: 79, after_seconds: 60}
      - {code: 13, after_seconds: 150}
  - {}
"""


def test_xid_79_of_a_gpu_that_falls_off_the_bus_is_counted_and_it_is_watched_again() -> None:
    now = [T0]
    node = build(LOST_AND_BACK, clock=lambda: now[0])
    labels = gpu(0, uuid_of(None, 0))
    assert node.value("nvidia_gpu_up", **labels) == 1
    now[0] += 61
    assert node.value("nvidia_gpu_up", **labels) == 0
    assert node.value("nvidia_gpu_xid_errors_total", xid="79", **labels) == 1
    assert node.value("nvidia_gpu_scrape_collector_success", collector="xid") == 1
    now[0] += 60  # it answers again, and is registered again
    assert node.value("nvidia_gpu_up", **labels) == 1
    now[0] += 30
    node.text()
    assert node.value("nvidia_gpu_xid_errors_total", xid="13", **labels) == 1
    assert node.value("nvidia_gpu_xid_errors_total", xid="79", **labels) == 1
    node.close()


def test_xid_collector_fails_while_a_gpu_cannot_be_watched() -> None:
    node = build("gpus:\n  - errors: {nvmlDeviceRegisterEvents: Unknown}\n  - {}\n")
    assert node.value("nvidia_gpu_scrape_collector_success", collector="xid") == 0
    assert node.value("nvidia_gpu_up", **gpu(0, uuid_of(None, 0))) == 1
    node.close()


def test_the_xid_watcher_thread_counts_a_lost_gpus_xid_and_watches_it_again() -> None:
    now = [T0]
    s = scenario_of(LOST_AND_BACK)
    lib = SimulatedNvml(SimulatedNode(s, clock=lambda: now[0]))
    nvml = Nvml(lib)
    nvml.ensure_initialized()
    from gpuwatch.exporter.collectors import Device

    devices = [Device(i, nvml.handle(i), f"uuid-{i}") for i in range(2)]
    collector = XidCollector(background=True)
    try:
        collector.read_node(nvml, devices)
        now[0] += 61
        assert wait_until(lambda: collector.read_node(nvml, devices[1:]).counts.get("uuid-0")
                          == {79: (1, pytest.approx(time.time(), abs=30))})
        now[0] += 90
        devices[0] = Device(0, nvml.handle(0), "uuid-0")  # opened again
        assert wait_until(lambda: 13 in collector.read_node(nvml, devices).counts.get(
            "uuid-0", {}))
        assert collector.problem() is None
    finally:
        collector.close()
        lib.release_hangs()


def test_a_name_that_failed_once_is_asked_again() -> None:
    node = build("gpus:\n  - errors: {nvmlDeviceGetName: Unknown}\n")
    assert 'name=""' in node.text()
    node.sim.scenario.gpus[0].errors.pop("nvmlDeviceGetName")  # type: ignore[attr-defined]
    assert 'name="NVIDIA A100-SXM4-80GB"' in node.text()
    node.close()


# -- fewer round trips: one field-values call, what never changes read once ----------------

HEALTH_NODE = """
gpus:
  - name: NVIDIA A100-SXM4-80GB
    remapped_rows: {correctable: 3, uncorrectable: 1, pending: 1}
    pcie_link: {width: 8}
    pcie_replays: 12
  - name: Tesla V100-SXM2-32GB
    retired_pages: {single_bit_ecc: 2, pending: 1}
  - name: NVIDIA GeForce RTX 3090
    ecc: false
    fan: true
"""


def calls_per_scrape(node, scrapes: int = 3) -> dict[str, float]:
    node.text()  # the first scrape opens the GPU and reads what never changes
    before = dict(node.sim.calls)
    for _ in range(scrapes):
        node.text()
    gpus = len(node.sim.scenario.gpus)
    return {f: (n - before.get(f, 0)) / scrapes / gpus for f, n in node.sim.calls.items()
            if n > before.get(f, 0) and f != "nvmlDeviceGetCount"}


@pytest.mark.parametrize("name", ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"])
def test_a_gpu_costs_at_most_15_nvml_calls_a_scrape(name: str) -> None:
    # the one field-values call proves the GPU is there: no UUID call for that
    node = build(f"gpus:\n  - name: {name}\n    nvlink_links: 18\n")
    calls = calls_per_scrape(node)
    assert sum(calls.values()) <= 15, calls
    assert calls["nvmlDeviceGetFieldValues"] == 1
    for once in ("nvmlDeviceGetTemperatureThreshold", "nvmlDeviceGetMaxClockInfo",
                 "nvmlDeviceGetSupportedClocksEventReasons", "nvmlDeviceGetMaxPcieLinkWidth",
                 "nvmlDeviceGetName", "nvmlDeviceGetFanSpeed",  # not supported: not asked again
                 "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetUUID"):
        assert once not in calls, once
    node.close()


def test_a_gpu_with_a_fan_costs_at_most_15_nvml_calls_a_scrape() -> None:
    node = build(IDLE_GPU)
    calls = calls_per_scrape(node)
    assert calls["nvmlDeviceGetFanSpeed"] == 1
    assert sum(calls.values()) <= 15, calls
    node.close()


@pytest.mark.parametrize("driver", ["", "field_values: false\n"])
def test_a_lost_gpu_is_told_by_its_field_values_call_and_without_them_by_its_uuid(
        driver: str) -> None:
    now = [T0]
    node = build(driver + "gpus:\n  - {lost_after_seconds: 60}\n  - {}\n",
                 clock=lambda: now[0])
    labels = gpu(0, uuid_of(None, 0))
    assert node.value("nvidia_gpu_up", **labels) == 1
    now[0] += 60
    text = node.text()
    assert f'nvidia_gpu_down_info{{gpu="0",reason="lost",uuid="{labels["uuid"]}"}}' in text
    assert node.value("nvidia_gpu_up", **gpu(1, uuid_of(None, 1))) == 1
    # at open, and without field values once a scrape (three scrapes) as the proof
    assert node.sim.calls["nvmlDeviceGetUUID"] == (2 if not driver else 2 + 3 * 2)
    node.close()


def test_one_field_lost_in_the_call_costs_that_field_not_the_gpu() -> None:
    node = build("gpus:\n  - errors: {nvmlDeviceGetTotalEnergyConsumption: GPUIsLost}\n")
    labels = gpu(0, uuid_of(None, 0))
    assert node.value("nvidia_gpu_up", **labels) == 1
    assert node.value("nvidia_gpu_energy_joules_total", **labels) is None
    assert node.value("nvidia_gpu_power_usage_watts", **labels) is not None
    node.close()


def test_a_driver_without_field_values_serves_the_same_page_through_each_function() -> None:
    with_fields, without = build(HEALTH_NODE), build("field_values: false\n" + HEALTH_NODE)
    page = with_fields.text()
    assert without.text() == page
    # tried once per GPU, then not again; the A100's rows by their own function every scrape
    assert without.sim.calls["nvmlDeviceGetFieldValues"] == 3
    calls = calls_per_scrape(without)
    assert "nvmlDeviceGetFieldValues" not in calls
    assert calls["nvmlDeviceGetRemappedRows"] == 1 / 3
    for series in ('nvidia_gpu_remapped_rows_total{cause="uncorrectable",gpu="0"',
                   'nvidia_gpu_row_remap_pending{gpu="0"', 'nvidia_gpu_pcie_replays_total{gpu="0"',
                   'nvidia_gpu_retired_pages_total{cause="single_bit_ecc",gpu="1"',
                   'nvidia_gpu_retired_pages_pending{gpu="1"',
                   'nvidia_gpu_power_usage_watts{gpu="2"', 'nvidia_gpu_ecc_errors_total{gpu="0"'):
        assert series in page, series
    assert 'nvidia_gpu_ecc_errors_total{gpu="2"' not in page  # ECC off
    with_fields.close()
    without.close()


def test_fields_a_driver_lacks_are_read_through_their_own_function() -> None:
    fields = [N.FI_POWER_INSTANT, N.FI_POWER_LIMIT, N.FI_ENERGY, N.FI_PCIE_REPLAYS]
    node = build(f"gpus:\n  - {{pcie_replays: 5, unsupported_fields: {fields}}}\n")
    reference = build("gpus:\n  - {pcie_replays: 5}\n")
    labels = gpu(0, uuid_of(None, 0))
    for metric in ("nvidia_gpu_power_usage_watts", "nvidia_gpu_power_limit_watts",
                   "nvidia_gpu_energy_joules_total", "nvidia_gpu_pcie_replays_total"):
        assert node.value(metric, **labels) == reference.value(metric, **labels), metric
    calls = calls_per_scrape(node)
    for function in ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
                     "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPcieReplayCounter"):
        assert calls[function] == 1, function
    node.close()
    reference.close()


def test_health_signals_of_a_healthy_gpu_are_left_out_and_its_pcie_link_served() -> None:
    node = build("gpus:\n  - {nvlink_links: 12}\n")
    text = node.text()
    labels = gpu(0, uuid_of(None, 0))
    assert node.value("nvidia_gpu_pcie_link_width", **labels) == 16
    assert node.value("nvidia_gpu_pcie_link_generation_max", **labels) == 4
    for name in ("nvidia_gpu_remapped_rows_total", "nvidia_gpu_row_remap_pending",
                 "nvidia_gpu_pcie_replays_total", "nvidia_gpu_nvlink_errors_total",
                 "nvidia_gpu_nvlink_links_inactive"):
        assert f"\n{name}{{" not in text, name
    node.close()


def test_nvlink_errors_and_links_down_come_in_the_one_call() -> None:
    node = build("gpus:\n  - nvlink_links: 12\n    nvlink_inactive: 2\n"
                 "    nvlink_errors: {crc_flit: 4, recovery: 1}\n")
    labels = gpu(0, uuid_of(None, 0))
    assert node.value("nvidia_gpu_nvlink_links_inactive", **labels) == 2
    assert node.value("nvidia_gpu_nvlink_errors_total", type="crc_flit", **labels) == 4
    assert node.value("nvidia_gpu_nvlink_errors_total", type="recovery", **labels) == 1
    assert node.value("nvidia_gpu_nvlink_errors_total", type="replay", **labels) is None
    assert calls_per_scrape(node)["nvmlDeviceGetFieldValues"] == 1
    node.close()


def test_a_health_series_stays_once_served() -> None:
    from gpuwatch.exporter.collectors import Device
    from gpuwatch.exporter.collectors.gpu import GpuCollector
    from gpuwatch.exporter.readings import GpuReading

    collector = GpuCollector()
    device = Device(0, None, "GPU-1")
    key = ("nvidia_gpu_row_remap_pending", "")

    def served(value: float) -> list[float]:
        reading = GpuReading(info={}, health={key: value})
        families = {f.name: f for f in collector._health_families([(device, reading)])}
        return [s.value for s in families["nvidia_gpu_row_remap_pending"].samples]

    assert served(0) == []
    assert served(1) == [1]
    assert served(0) == [0]  # reset since: it says so rather than vanish


def test_the_pcie_link_is_read_again_once_a_minute() -> None:
    from gpuwatch.exporter.collectors import Device
    from gpuwatch.exporter.collectors.gpu import LINK_REFRESH_SECONDS, GpuCollector

    sim = SimulatedNvml(SimulatedNode(scenario_of("gpus:\n  - {pcie_link: {width: 4}}\n"),
                                      clock=lambda: T0))
    nvml = Nvml(sim)
    now = [0.0]
    collector = GpuCollector(clock=lambda: now[0])
    device = Device(0, sim.nvmlDeviceGetHandleByIndex(0), "GPU-0")
    reads = []
    for now[0] in (0.0, LINK_REFRESH_SECONDS / 2, LINK_REFRESH_SECONDS + 1):
        assert collector.read_gpu(nvml, device).pcie_link_width == 4
        reads.append(sim.calls["nvmlDeviceGetCurrPcieLinkWidth"])
    assert reads == [1, 1, 2]


@pytest.mark.parametrize(("gpu_yaml", "message"), [
    ("{nvlink_links: 2, nvlink_inactive: 3}", "nvlink_inactive: must be between 0"),
    ("{remapped_rows: {spare: 1}}", "remapped_rows"),
    ("{nvlink_errors: {crc_data: -1}}", "must not be negative"),
    ("{unsupported_fields: [power]}", "unsupported_fields"),
])
def test_bad_health_settings_of_a_scenario_name_the_field(gpu_yaml: str, message: str) -> None:
    from gpuwatch.sim import ScenarioError

    with pytest.raises(ScenarioError, match=message):
        scenario_of(f"gpus:\n  - {gpu_yaml}\n")


# -- MIG: slices addressed like GPUs (gpu, uuid of the parent, gpu_instance_id) ---------------

def _series(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines()
            if not line.startswith("#") and all(n in line for n in needles)]


@pytest.fixture(scope="module")
def mig_page() -> str:
    node = build("mig")
    try:
        return node.text()
    finally:
        node.close()


def test_every_slice_has_its_info_memory_and_users(mig_page: str) -> None:
    a100 = gpu(0, uuid_of(load_scenario("mig"), 0))
    info = _series(mig_page, "nvidia_gpu_mig_info{", 'gpu="0"')
    assert len(info) == 7 and all('profile="1g.10gb"' in s and 'mig_uuid="MIG-' in s
                                  for s in info)
    assert len(_series(mig_page, "nvidia_gpu_mig_info{", 'gpu="1"')) == 3
    assert 'profile="3g.40gb"' in _series(mig_page, "nvidia_gpu_mig_info{", 'gpu="1"')[0]
    node = build("mig")
    try:
        value = node.value
        assert value("nvidia_gpu_mig_memory_total_bytes", **a100, gpu_instance_id="7") == \
            10 * GIB
        assert 8 * GIB < value("nvidia_gpu_mig_memory_used_bytes", **a100,
                               gpu_instance_id="7") < 10 * GIB
        assert value("nvidia_gpu_mig_processes", **a100, gpu_instance_id="10") == 2
        assert value("nvidia_gpu_mig_processes", **a100, gpu_instance_id="11") == 0
        assert value("nvidia_gpu_mig_users_info", **a100, gpu_instance_id="9",
                     users="grace") == 1
        assert value("nvidia_gpu_mig_users_info", **a100, gpu_instance_id="11", users="") == 1
        assert value("nvidia_gpu_users_info", **a100, users="grace,heidi") == 1
        assert value("nvidia_gpu_user_processes", **a100, gpu_instance_id="10",
                     user="heidi") == 2
        # what NVML does not report per slice stays on the parent, and is no error there
        assert value("nvidia_gpu_utilization_ratio", **a100) is not None
        assert value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
        assert value("nvidia_gpu_scrape_collector_success", collector="process") == 1
    finally:
        node.close()


def test_processes_of_a_mig_gpu_carry_their_slice_and_the_others_do_not(mig_page: str
                                                                         ) -> None:
    [grace] = _series(mig_page, "nvidia_gpu_process_memory_used_bytes{", 'pid="51001"')
    assert 'gpu_instance_id="7"' in grace
    [judy] = _series(mig_page, "nvidia_gpu_process_memory_used_bytes{", 'pid="70001"')
    assert "gpu_instance_id" not in judy  # GPU 2 has no MIG: its series as before
    assert not _series(mig_page, 'gpu="2"', "gpu_instance_id")


def test_mig_pending_is_served_and_a_node_without_mig_serves_no_mig_series(mig_page: str
                                                                           ) -> None:
    [pending] = _series(mig_page, "nvidia_gpu_mig_mode_change_pending")
    assert 'gpu="2"' in pending and pending.endswith(" 1.0")
    node = build("workstation")  # consumer GPUs: MIG not supported
    try:
        text = node.text()
        assert "nvidia_gpu_mig" not in text and "gpu_instance_id" not in text
        assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    finally:
        node.close()


def test_a_slice_destroyed_by_a_reconfiguration_leaves_no_series_behind() -> None:
    now = [T0]
    node = build("mig", clock=lambda: now[0])
    try:
        assert _series(node.text(), 'gpu="1"', 'gpu_instance_id="9"')
        now[0] += 601  # the H100's 1g.10gb slice is gone: its handle fails, slices walked
        text = node.text()
        assert not _series(text, 'gpu="1"', 'gpu_instance_id="9"')
        assert len(_series(text, "nvidia_gpu_mig_info{", 'gpu="1"')) == 2
        assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    finally:
        node.close()


def test_slices_are_walked_once_a_minute_and_their_memory_read_every_scrape() -> None:
    from gpuwatch.exporter.collectors import Device
    from gpuwatch.exporter.collectors.gpu import GpuCollector
    from gpuwatch.exporter.mig import WALK_SECONDS

    sim = SimulatedNvml(SimulatedNode(load_scenario("mig"), clock=lambda: T0))
    nvml = Nvml(sim)
    now = [0.0]
    collector = GpuCollector(clock=lambda: now[0])
    device = Device(1, sim.nvmlDeviceGetHandleByIndex(1), "GPU-1")
    walks, memory = [], []
    for now[0] in (0.0, WALK_SECONDS / 2, WALK_SECONDS + 1):
        reading = collector.read_gpu(nvml, device)
        assert [s.gpu_instance_id for s in reading.mig] == [2, 3, 9]
        walks.append(sim.calls["nvmlDeviceGetMaxMigDeviceCount"])
        memory.append(sim.calls["nvmlDeviceGetMemoryInfo"])
    assert walks == [1, 1, 2]
    assert memory[2] - memory[1] == memory[1] - memory[0] == 1 + 3  # the parent's, a slice's
    assert device.mig_instances == (2, 3, 9)


def test_the_profile_comes_from_the_attributes_where_the_name_does_not_say() -> None:
    node = build("""
gpus:
  - name: NVIDIA A100-SXM4-40GB
    memory_gib: 40
    errors: {nvmlDeviceGetName: NotSupported}
    mig:
      - {profile: 3g.20gb, gpu_instance_id: 1, memory_gib: 19.625}
""")
    try:
        [info] = _series(node.text(), "nvidia_gpu_mig_info{")
        assert 'profile="3g.20gb"' in info
    finally:
        node.close()


@pytest.mark.parametrize(("name", "profile"), [
    ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "1g.10gb"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "1g.10gb+me"),
    ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", "1c.3g.20gb"),
    ("NVIDIA H200 MIG 7g.141gb", "7g.141gb"),
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gbx", ""),  # not a profile: from the attributes
])
def test_the_profile_in_the_mig_device_name(name: str, profile: str) -> None:
    from gpuwatch.exporter.mig import _PROFILE_IN_NAME

    found = _PROFILE_IN_NAME.search(name)
    assert (found.group(1) if found else "") == profile


def test_series_per_slice_are_bounded(mig_page: str) -> None:
    """docs/scale.md's "what a MIG node costs": a free slice is 5 series, a held one adds 2
    per user and 2 per process."""
    free = _series(mig_page, 'gpu="0"', 'gpu_instance_id="11"')
    assert len(free) == 5
    held = _series(mig_page, 'gpu="0"', 'gpu_instance_id="10"')  # heidi, two processes
    assert len(held) == 5 + 2 * 1 + 2 * 2
    parent = [s for s in _series(mig_page, 'gpu="0"') if "gpu_instance_id" not in s
              and not s.startswith(("nvidia_gpu_process_", "nvidia_gpu_user_"))]
    assert len(parent) < 45  # the parent keeps a GPU's budget


def test_a_slice_made_by_a_reconfiguration_is_served_within_a_minute() -> None:
    from gpuwatch.exporter.collectors import Device
    from gpuwatch.exporter.collectors.gpu import GpuCollector
    from gpuwatch.exporter.mig import WALK_SECONDS

    elapsed = [0.0]
    sim = SimulatedNvml(SimulatedNode(load_scenario("mig"), clock=lambda: T0 + elapsed[0],
                                      start=T0))
    nvml, now = Nvml(sim), [0.0]
    collector = GpuCollector(clock=lambda: now[0])
    device = Device(1, sim.nvmlDeviceGetHandleByIndex(1), "GPU-1")

    def instances() -> list[int]:
        return [s.gpu_instance_id for s in collector.read_gpu(nvml, device).mig]

    assert instances() == [2, 3, 9]
    elapsed[0] = now[0] = 601.0  # the 1g.10gb slice destroyed: seen at once
    assert instances() == [2, 3]
    elapsed[0] = 901.0  # a 2g.20gb slice made: seen at the next walk, within a minute
    now[0] = 601.0 + WALK_SECONDS / 2
    assert instances() == [2, 3]
    now[0] = 601.0 + WALK_SECONDS
    assert instances() == [2, 3, 5]


def test_compute_instances_of_one_gpu_instance_share_its_memory_series() -> None:
    node = build("""
gpus:
  - name: NVIDIA A100-SXM4-80GB
    mig:
      - {profile: 2g.20gb, gpu_instance_id: 1, compute_instance_id: 0}
      - {profile: 2g.20gb, gpu_instance_id: 1, compute_instance_id: 1}
""")
    try:
        text = node.text()
        assert len(_series(text, "nvidia_gpu_mig_info{")) == 2
        assert len(_series(text, "nvidia_gpu_mig_memory_total_bytes{")) == 1
        assert len(_series(text, "nvidia_gpu_mig_users_info{")) == 1
    finally:
        node.close()
