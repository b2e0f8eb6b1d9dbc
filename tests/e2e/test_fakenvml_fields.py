"""nvmlDeviceGetFieldValues through the real nvidia-ml-py and ctypes, on the fake libnvidia-ml:
the struct as the driver fills it, fields a driver does not answer, a driver without the call,
and the health signals. Each case scrapes twice in a fresh process (the library is loaded once
per process): the first scrape opens the GPUs, the second is what every scrape costs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fakenvml import GCC, Control, Gpu, build, environment, logged_calls
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed: the fake "
                                "libnvidia-ml cannot be built")

SCRAPE = """
from gpuwatch.exporter import encoding
from gpuwatch.exporter.main import build_registry
from gpuwatch.exporter.collectors.gpu import GpuCollector
from gpuwatch.exporter.nvml import Nvml
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.exporter.scrape import Exporter
options = ExporterOptions(xid_in_background=False, own_process_metrics=False)
exporter = Exporter(Nvml(), [GpuCollector()])
registry = build_registry(exporter, options)
encoding.text(registry)
print(encoding.text(registry).decode())
"""


@pytest.fixture(scope="module")
def fake_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("fakenvml"))


def scrape(library: Path, tmp_path: Path, *directives: str
           ) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], Path]:
    """The second scrape's samples, and the log of both scrapes' NVML calls."""
    control = Control(tmp_path / "control", [Gpu(0), Gpu(1)], faults=list(directives),
                      logged=["*"])
    control.write()
    calls = tmp_path / "calls.log"
    done = subprocess.run([sys.executable, "-c", SCRAPE],
                          env=environment(library, control.path, calls), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(done.stdout) for s in f.samples}
    return samples, calls


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          gpu: int, **labels: str) -> float | None:
    for (sample, found), v in samples.items():
        got = dict(found)
        if sample == name and got.get("gpu") == str(gpu) and \
                all(got.get(k) == want for k, want in labels.items()):
            return v
    return None


def test_the_values_come_in_one_call_per_gpu_and_scrape(fake_library: Path,
                                                        tmp_path: Path) -> None:
    samples, calls = scrape(fake_library, tmp_path)
    assert value(samples, "nvidia_gpu_power_usage_watts", 1) == 71.0  # the fake's 70 W + 1 W/GPU
    assert value(samples, "nvidia_gpu_power_limit_watts", 0) == 350.0
    assert value(samples, "nvidia_gpu_energy_joules_total", 1) is not None
    assert value(samples, "nvidia_gpu_ecc_errors_total", 0, type="uncorrected",
                 scope="volatile") == 0
    assert value(samples, "nvidia_gpu_pcie_link_width_max", 0) == 16
    for function in ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit",
                     "nvmlDeviceGetTotalEccErrors"):
        assert logged_calls(calls, function) == 0, function
    # per GPU: the UUID at open only (the field values prove the GPU is there), the call of
    # what never changes at open, and one a scrape
    assert logged_calls(calls, "nvmlDeviceGetUUID", gpu=0) == 1
    assert logged_calls(calls, "nvmlDeviceGetFieldValues", gpu=0) == 3


def test_a_field_the_driver_does_not_answer_is_read_by_its_function(fake_library: Path,
                                                                    tmp_path: Path) -> None:
    samples, calls = scrape(fake_library, tmp_path, "field_error 0 190 3")  # NOT_SUPPORTED
    assert value(samples, "nvidia_gpu_power_limit_watts", 0) == 350.0
    assert logged_calls(calls, "nvmlDeviceGetEnforcedPowerLimit", gpu=0) == 2
    assert logged_calls(calls, "nvmlDeviceGetEnforcedPowerLimit", gpu=1) == 0


def test_a_driver_without_the_call_is_read_function_by_function(fake_library: Path,
                                                                 tmp_path: Path) -> None:
    samples, calls = scrape(fake_library, tmp_path, "error * nvmlDeviceGetFieldValues 13",
                            "field 1 144 1")  # 13: FUNCTION_NOT_FOUND
    assert value(samples, "nvidia_gpu_power_usage_watts", 1) == 71.0
    assert value(samples, "nvidia_gpu_ecc_errors_total", 0, type="corrected",
                 scope="aggregate") == 0
    assert value(samples, "nvidia_gpu_row_remap_pending", 1) == 1  # nvmlDeviceGetRemappedRows
    assert value(samples, "nvidia_gpu_row_remap_pending", 0) is None  # zero: not served
    assert logged_calls(calls, "nvmlDeviceGetFieldValues", gpu=0) == 1  # tried once
    assert logged_calls(calls, "nvmlDeviceGetPowerUsage", gpu=0) == 2


def test_health_signals_through_the_real_binding(fake_library: Path, tmp_path: Path) -> None:
    samples, _ = scrape(fake_library, tmp_path, "field 0 143 2", "field 0 145 1",
                        "pcie 0 4 8", "field 0 94 17", "field 1 91 18", "field 1 165 2",
                        "field 1 45 9")
    assert value(samples, "nvidia_gpu_remapped_rows_total", 0, cause="uncorrectable") == 2
    assert value(samples, "nvidia_gpu_row_remap_failure", 0) == 1
    assert value(samples, "nvidia_gpu_pcie_link_width", 0) == 8
    assert value(samples, "nvidia_gpu_pcie_link_generation", 0) == 4
    assert value(samples, "nvidia_gpu_pcie_replays_total", 0) == 17
    assert value(samples, "nvidia_gpu_nvlink_links_inactive", 1) == 2
    assert value(samples, "nvidia_gpu_nvlink_errors_total", 1, type="crc_data") == 9
    assert value(samples, "nvidia_gpu_nvlink_errors_total", 0, type="crc_data") is None
