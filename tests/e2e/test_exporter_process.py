"""gpuwatch-exporter as a process: started, scraped and stopped on SIGTERM; with no NVIDIA
driver; refusing a web config it cannot honour. (tests/unit/test_exporter_cli.py checks the
flags and bad input in process.)"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tools import localstack

EXPORTER = [sys.executable, "-m", "gpuwatch.exporter"]
BROKEN_HASH = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7z"  # one short


def scrape(port: int, deadline: float = 20) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_the_exporter_serves_a_simulated_node_and_stops_on_sigterm() -> None:
    port = localstack.free_port()
    process = subprocess.Popen([*EXPORTER, "--simulate", "server", "--web.listen-address",
                                f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        text = scrape(port)
        assert 'nvidia_gpu_users_info{gpu="3",users="erin"' in text
        assert "process_resident_memory_bytes" in text  # the exporter's own process metrics
    finally:
        process.terminate()
        assert process.wait(10) == 0
    assert "listening on http://127.0.0.1" in (process.stderr.read() if process.stderr else "")


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="this machine has an NVIDIA driver")
def test_without_a_driver_the_exporter_runs_and_says_why() -> None:
    """On a machine with no NVIDIA driver the real NVML path serves health, not a crash."""
    port = localstack.free_port()
    env = dict(os.environ, LD_LIBRARY_PATH="/nonexistent")
    process = subprocess.Popen([*EXPORTER, "--web.listen-address", f"127.0.0.1:{port}"],
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        text = scrape(port)
        assert "nvidia_gpu_nvml_up 0.0" in text
        assert 'nvidia_gpu_scrape_collector_success{collector="gpu"} 0.0' in text
        scrape(port)
    finally:
        process.terminate()
        process.wait(10)
    log = process.stderr.read() if process.stderr else ""
    # one line, as the README says: the collectors that fail for that reason share it
    assert log.count("collectors gpu, process, xid failed") == 1, log
    assert sum("failed" in line for line in log.splitlines()) == 1, log
    assert "libnvidia-ml.so not found" in log or "NVIDIA" in log


def test_a_malformed_bcrypt_hash_stops_the_exporter_process(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{BROKEN_HASH}'\n")
    address = f"127.0.0.1:{localstack.free_port()}"
    done = subprocess.run([*EXPORTER, "--simulate", "workstation", "--web.config.file",
                           str(config), "--web.listen-address", address],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpuwatch-exporter: error: {config}: basic_auth_users.prometheus: not a bcrypt hash "
        "($2a$, $2b$ or $2y$, a cost of 04 to 31, then 53 characters of bcrypt base64); make "
        "one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"]
