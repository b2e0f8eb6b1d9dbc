"""MIG through the real nvidia-ml-py and ctypes, on the fake libnvidia-ml: the MIG devices of
a GPU in MIG mode walked by handle (GPU and compute instance ids, MIG UUID, profile from the
name or from the attributes, memory per GPU instance), processes attributed to their slice
from the instance ids of the process structs, the parent's "not supported under MIG" answers
left out, a GPU without MIG as it was, and a reconfigured GPU walked again.

One exporter process (the library is loaded once per process) scrapes three times: the first
opens the GPUs, the second is what every scrape serves, and before the third the GPU is
reconfigured (one slice destroyed, another created, MIG mode off at the next reset).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fakenvml import GCC, Control, Gpu, Mig, Process, build, environment, logged_calls
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed: the fake "
                                "libnvidia-ml cannot be built")

MIB = 2**20
GONE_PID = 4_000_001
"""A pid NVML lists that is not running here (below pid_max: a plausible one)."""
SEPARATOR = "# --- next scrape ---"

SCRAPE = f"""
import logging, os, shutil, sys
from gpuwatch.exporter import encoding
from gpuwatch.exporter.main import build_registry
from gpuwatch.exporter.collectors.gpu import GpuCollector
from gpuwatch.exporter.collectors.process import GpuProcessCollector
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.exporter.scrape import Exporter
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
options = ExporterOptions(xid_in_background=False, own_process_metrics=False)
exporter = Exporter(Nvml(), [GpuCollector(), GpuProcessCollector()])
registry = build_registry(exporter, options)
print(encoding.text(registry).decode())
shutil.copy(os.environ["FAKENVML_LOG"], os.environ["FAKENVML_LOG"] + ".1")
print({SEPARATOR!r})
print(encoding.text(registry).decode())
shutil.copy(os.environ["FAKENVML_LOG"], os.environ["FAKENVML_LOG"] + ".2")
os.replace(sys.argv[1], os.environ["FAKENVML_CONTROL"])  # reconfigured: a new file
print({SEPARATOR!r})
print(encoding.text(registry).decode())
"""


@dataclass
class Run:
    scrapes: list[list[Sample]]
    stderr: str
    calls: Path

    def calls_of(self, scrape: int, gpu: int) -> list[str]:
        """The NVML functions called on the GPU (or its MIG devices) in that scrape (0, 1)."""
        before = [] if scrape == 0 else self._log(scrape)
        return [line.split()[0] for line in self._log(scrape + 1)[len(before):]
                if line.split()[1] == str(gpu)]

    def _log(self, after: int) -> list[str]:
        return Path(f"{self.calls}.{after}").read_text().splitlines()


def migs(*, reconfigured: bool = False) -> list[Mig]:
    """GPU 0's MIG devices: 3g.40gb named by the driver, 2g.20gb named by its attributes only,
    and a 1g.10gb (GPU instance 13, after the reconfiguration 11)."""
    return [Mig(0, 1, 0, gpu_slices=3, total_mib=40192, used_mib=1024, profile="3g.40gb"),
            Mig(0, 5, 0, gpu_slices=2, total_mib=19968, used_mib=2048),
            Mig(0, 11 if reconfigured else 13, 0, gpu_slices=1, total_mib=9856,
                profile="1g.10gb")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    directory = tmp_path_factory.mktemp("fakenvml_mig")
    library = build(directory / "lib")
    me = os.getpid()
    processes = [Process(0, me, 1536 * MIB, on=(5, 0)),
                 Process(0, GONE_PID, 512 * MIB, on=(5, 0)), Process(1, me, 512 * MIB)]
    gpus = [Gpu(0, used_mib=3584), Gpu(1, utilization_percent=40)]
    Control(directory / "control.next", gpus, processes, migs(reconfigured=True),
            faults=["mig_mode 0 1 0"], logged=["*"]).write()  # and MIG off at the next reset
    control = Control(directory / "control", gpus, processes, migs(), logged=["*"])
    control.write()
    calls = directory / "calls.log"
    done = subprocess.run([sys.executable, "-c", SCRAPE, str(directory / "control.next")],
                          env=environment(library, control.path, calls), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    scrapes = [[s for f in text_string_to_metric_families(text) for s in f.samples]
               for text in done.stdout.split(SEPARATOR)]
    assert len(scrapes) == 3
    yield Run(scrapes, done.stderr, calls)


def series(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and
            all(s.labels.get(k) == v for k, v in labels.items())]


def one(samples: list[Sample], name: str, **labels: str) -> float:
    found = series(samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def test_each_mig_device_is_served_with_its_profile_and_mig_uuid(run: Run) -> None:
    samples = run.scrapes[1]
    info = {(s.labels["gpu_instance_id"], s.labels["compute_instance_id"]):
            (s.labels["profile"], s.labels["mig_uuid"])
            for s in series(samples, "nvidia_gpu_mig_info", gpu="0")}
    assert info == {(str(m.gpu_instance_id), "0"): (profile, m.uuid)
                    for m, profile in zip(migs(), ("3g.40gb", "2g.20gb", "1g.10gb"),
                                          strict=True)}
    assert one(samples, "nvidia_gpu_mig_memory_total_bytes", gpu="0",
               gpu_instance_id="1") == 40192 * MIB
    assert one(samples, "nvidia_gpu_mig_memory_used_bytes", gpu="0",
               gpu_instance_id="5") == 2048 * MIB
    assert one(samples, "nvidia_gpu_mig_memory_used_bytes", gpu="0",
               gpu_instance_id="13") == 0


def test_processes_are_attributed_to_their_slice(run: Run) -> None:
    samples, me = run.scrapes[1], str(os.getpid())
    user = psutil.Process().username()
    assert one(samples, "nvidia_gpu_process_memory_used_bytes", gpu="0", pid=me,
               gpu_instance_id="5") == 1536 * MIB
    assert one(samples, "nvidia_gpu_mig_processes", gpu="0", gpu_instance_id="5") == 2
    assert one(samples, "nvidia_gpu_mig_processes", gpu="0", gpu_instance_id="1") == 0
    assert series(samples, "nvidia_gpu_mig_users_info", gpu="0", gpu_instance_id="5",
                  users=user)
    assert series(samples, "nvidia_gpu_mig_users_info", gpu="0", gpu_instance_id="13",
                  users="")
    assert one(samples, "nvidia_gpu_user_memory_used_bytes", gpu="0", user=user,
               gpu_instance_id="5") == 1536 * MIB


def test_what_the_parent_does_not_report_under_mig_is_left_out_not_an_error(run: Run) -> None:
    samples = run.scrapes[1]
    for name in ("nvidia_gpu_utilization_ratio", "nvidia_gpu_memory_utilization_ratio",
                 "nvidia_gpu_encoder_utilization_ratio"):
        assert not series(samples, name, gpu="0"), name
    assert one(samples, "nvidia_gpu_temperature_celsius", gpu="0") == 40
    assert one(samples, "nvidia_gpu_power_usage_watts", gpu="0") == 70
    assert series(samples, "nvidia_gpu_info", gpu="0", mig_mode="enabled")
    for collector in ("gpu", "process"):
        assert one(samples, "nvidia_gpu_scrape_collector_success", collector=collector) == 1
    assert one(samples, "nvidia_gpu_up", gpu="0") == 1
    assert "WARNING" not in run.stderr, run.stderr
    # NOT_SUPPORTED is not asked again: once over three scrapes
    assert logged_calls(run.calls, "nvmlDeviceGetUtilizationRates", gpu=0) == 1
    assert logged_calls(run.calls, "nvmlDeviceGetUtilizationRates", gpu=1) == 3


def test_a_gpu_without_mig_is_served_as_before(run: Run) -> None:
    samples, me = run.scrapes[1], str(os.getpid())
    assert one(samples, "nvidia_gpu_utilization_ratio", gpu="1") == 0.4
    assert series(samples, "nvidia_gpu_info", gpu="1", mig_mode="disabled")
    assert not [s for s in samples if s.labels.get("gpu") == "1" and
                ("gpu_instance_id" in s.labels or s.name.startswith("nvidia_gpu_mig_"))]
    assert one(samples, "nvidia_gpu_process_memory_used_bytes", gpu="1", pid=me) == 512 * MIB


def test_a_reconfigured_gpu_is_walked_again_and_a_destroyed_slice_leaves(run: Run) -> None:
    before, after = run.scrapes[1], run.scrapes[2]
    assert not series(before, "nvidia_gpu_mig_mode_change_pending")
    assert one(after, "nvidia_gpu_mig_mode_change_pending", gpu="0") == 1
    assert series(before, "nvidia_gpu_mig_info", gpu="0", gpu_instance_id="13")
    assert not [s for s in after if s.labels.get("gpu_instance_id") == "13"]
    assert one(after, "nvidia_gpu_mig_memory_total_bytes", gpu="0",
               gpu_instance_id="11") == 9856 * MIB
    assert series(after, "nvidia_gpu_mig_info", gpu="0", gpu_instance_id="11",
                  profile="1g.10gb", mig_uuid=migs(reconfigured=True)[2].uuid)
    assert one(after, "nvidia_gpu_mig_processes", gpu="0", gpu_instance_id="5") == 2


def test_a_scrape_costs_one_memory_call_per_gpu_instance_and_no_walk(run: Run) -> None:
    opened, steady = run.calls_of(0, gpu=0), run.calls_of(1, gpu=0)
    assert opened.count("nvmlDeviceGetMigDeviceHandleByIndex") == 7  # NOT_FOUND past 3
    assert steady.count("nvmlDeviceGetMemoryInfo") == 3  # the v1 call of each MIG device
    for walked in ("nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetGpuInstanceId",
                   "nvmlDeviceGetAttributes_v2", "nvmlDeviceGetMigMode"):
        assert walked not in steady, walked
    # what MIG adds, the parent saves: its utilisation and codecs are not asked again
    assert len(steady) <= len(run.calls_of(1, gpu=1)) + 3
