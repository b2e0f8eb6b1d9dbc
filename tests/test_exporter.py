"""The exporter over simulated nodes: values in base units, faults isolated, scrapes bounded."""

from __future__ import annotations

import threading
import time

import pytest
from gpuwatch.collectors.xid import XidCollector
from gpuwatch.nvml import Nvml
from gpuwatch.simulate import GIB, SimulatedNode, SimulatedNvml, load_scenario
from simnode import T0, build

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


def gpu(index: int, node_uuid: str) -> dict[str, str]:
    return {"gpu": str(index), "uuid": node_uuid}


def uuid_of(node: object, index: int) -> str:
    from gpuwatch.simulate import _uuid

    return _uuid(getattr(node, "name", "test-scenario"), index)


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
    node = build(IDLE_GPU, ["--config.file", str(config)])
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
    assert sum("libnvidia-ml.so not found" in r.message for r in caplog.records) == 3
    node.text()  # the failure is logged when it starts, not at every scrape
    assert sum("libnvidia-ml.so not found" in r.message for r in caplog.records) == 3
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
    node = build("server", ["--process.max-per-gpu", "1"])
    labels = gpu(6, uuid_of(node.sim.scenario, 6))
    text = node.text()
    assert text.count('nvidia_gpu_process_memory_used_bytes{command="python",container_id="",'
                      'gpu="6"') == 1
    assert node.value("nvidia_gpu_process_series_dropped_total", **labels) == 2
    assert node.value("nvidia_gpu_user_processes", user="alice", **labels) == 2
    node.close()


def test_without_pid_labels_processes_of_one_user_and_command_are_summed() -> None:
    node = build("server", ["--no-process.pid"])
    labels = dict(gpu(6, uuid_of(node.sim.scenario, 6)), user="alice", command="python",
                  container_id="", slurm_job_id="")
    assert node.value("nvidia_gpu_process_memory_used_bytes", **labels) == 24 * GIB
    assert node.value("nvidia_gpu_process_start_time_seconds", **labels) == T0 - 7200
    assert "pid=" not in node.text()
    node.close()


def test_command_label_modes() -> None:
    cmdline = build("workstation", ["--process.command", "cmdline"])
    assert 'command="python train.py --config resnet50.yaml"' in cmdline.text()
    cmdline.close()
    none = build("workstation", ["--process.command", "none"])
    text = none.text()
    assert "command=" not in text
    assert 'nvidia_gpu_process_memory_used_bytes{container_id="",gpu="0",pid="41021"' in text
    none.close()


def test_collectors_can_be_turned_off() -> None:
    node = build("workstation", ["--no-collector.process", "--no-collector.xid"])
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
    from gpuwatch.collectors import Device

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
    node = build("gpus:\n  - {}\n  - {hang: [nvmlDeviceGetPowerUsage]}\n", timeout=0.3)
    text = node.text()
    assert 'nvidia_gpu_scrape_collector_success{collector="gpu"} 0.0' in text
    assert 'nvidia_gpu_utilization_ratio{gpu="0"' in text
    assert 'nvidia_gpu_utilization_ratio{gpu="1"' not in text
    calls = node.sim.calls["nvmlDeviceGetPowerUsage"]
    assert calls == 2  # GPU 0 answered, GPU 1 is stuck in it
    # the hung call has not returned: that GPU is not read again, the scrape still answers
    text = node.text()
    assert 'nvidia_gpu_scrape_collector_success{collector="gpu"} 0.0' in text
    assert node.sim.calls["nvmlDeviceGetPowerUsage"] == calls + 1
    node.sim.release_hangs()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            node.value("nvidia_gpu_scrape_collector_success", collector="gpu") != 1:
        time.sleep(0.05)
    assert node.value("nvidia_gpu_scrape_collector_success", collector="gpu") == 1
    node.close()


def test_concurrent_scrapes_share_one_collection() -> None:
    node = build("gpus:\n  - {hang: [nvmlDeviceGetPowerUsage]}\n", timeout=10)
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(node.text()))
    first.start()
    deadline = time.monotonic() + 5
    while node.sim.calls["nvmlDeviceGetPowerUsage"] == 0 and time.monotonic() < deadline:
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
