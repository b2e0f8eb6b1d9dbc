"""gpuwatch-exporter as a process: started, scraped and stopped on SIGTERM; with no NVIDIA
driver; refusing a web config it cannot honour; at and below its fd limit.
(tests/unit/test_exporter_cli.py checks the flags and bad input, tests/unit/test_web_server.py
the HTTP server, in process.)"""

from __future__ import annotations

import ctypes.util
import http.client
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuwatch.exporter import web
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


# -- at the fd limit ---------------------------------------------------------------------------

def request(port: int, path: str = "/metrics", timeout: float = 20
            ) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _exporter(port: int, nofile: int, *flags: str) -> subprocess.Popen[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = subprocess.Popen(
        [*EXPORTER, "--simulate", "workstation", "--web.listen-address", f"127.0.0.1:{port}",
         "--log.level=warn", *flags],
        stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    end = time.monotonic() + 30
    while True:
        try:
            if request(port, path="/-/healthy", timeout=5)[0] == 200:
                return process
        except OSError:
            if time.monotonic() > end or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)


def _connect_many(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:
            break  # refused or the backlog is full: enough
    return sockets


@pytest.fixture
def many_fds() -> Iterator[None]:
    """This test process may hold a few thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    if want < 1200:
        pytest.skip(f"the fd limit ({hard}) is too low for 1,000 client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1000_idle_connections_under_the_units_fd_limit_leave_scrapes_answered(
        many_fds: None) -> None:
    port = localstack.free_port()
    process = _exporter(port, web.UNIT_NOFILE_LIMIT)
    idle: list[socket.socket] = []
    try:
        idle = _connect_many(port, 1000)
        assert len(idle) == 1000
        status, _, body = request(port, timeout=10)
        assert status == 200 and b"nvidia_gpu_up" in body
    finally:
        for sock in idle:
            sock.close()
        process.terminate()
        assert process.wait(10) == 0


def test_at_the_fd_limit_the_server_waits_instead_of_spinning_and_recovers(
        many_fds: None) -> None:
    """A cap above what 64 fds allow: accept() fails with EMFILE. The server must pause, not
    retry at full speed (wsgiref did, at 100 % CPU), and answer again once fds are free."""
    port = localstack.free_port()
    process = _exporter(port, 64, "--web.max-connections=1000")
    held: list[socket.socket] = []
    try:
        held = _connect_many(port, 150)
        time.sleep(0.5)  # the server reaches the limit
        cpu, wall = _cpu_seconds(process.pid), time.monotonic()
        time.sleep(2)
        used = (_cpu_seconds(process.pid) - cpu) / (time.monotonic() - wall)
        assert used < 0.5, f"the exporter used {used:.0%} of a CPU at the fd limit"
        for sock in held:
            sock.close()
        held = []
        end = time.monotonic() + 15
        while True:
            try:
                assert request(port, timeout=5)[0] == 200
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
    finally:
        for sock in held:
            sock.close()
        process.terminate()
        process.wait(10)
    log = process.stderr.read() if process.stderr else ""
    assert "Traceback" not in log, log
    assert log.count("out of file descriptors") == 1, log


def test_below_a_low_fd_limit_the_cap_keeps_the_server_answering(many_fds: None) -> None:
    port = localstack.free_port()
    process = _exporter(port, 64)
    held: list[socket.socket] = []
    try:
        held = _connect_many(port, 150)
        assert request(port, timeout=10)[0] == 200
    finally:
        for sock in held:
            sock.close()
        process.terminate()
        assert process.wait(10) == 0
    log = process.stderr.read() if process.stderr else ""
    assert "out of file descriptors" not in log and "Traceback" not in log, log
