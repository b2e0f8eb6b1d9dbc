"""Reservations with real processes: `gpuwatch reserve` run by several people at once, the
exporter's imports, and the reservations endpoint as the monitoring host runs it.
(tests/unit/test_reservations.py checks the model, the file and the commands in process.)"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from gpuwatch import cli, reservations
from tools import localstack

UTC = dt.timezone.utc


def test_the_commands_booking_at_once_lose_no_booking(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    env = {**os.environ, reservations.ENV_FILE: str(path)}
    processes = [subprocess.Popen([sys.executable, "-m", "gpuwatch.cli", "reserve",
                                   f"node-{i % 2}:{i}", "--until", "+30d", "--user", f"u{i}"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in range(8)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 8, outputs
    now = dt.datetime.now(UTC)
    assert sorted((b.host, reservations.gpus_text(b.gpus), b.user)
                  for b in reservations.load(path, now)) == \
        sorted((f"node-{i % 2}", str(i), f"u{i}") for i in range(8))


def test_the_exporter_never_loads_the_old_format_importer() -> None:
    """The exporter reads the reservations file; importing comments.json is the command's."""
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys, gpuwatch.exporter.main, "
         "gpuwatch.exporter.collectors.reservation; print(json.dumps(["
         "sorted(n for n in sys.modules if n.startswith('gpuwatch.reservations')), "
         "sorted(n for n, m in sys.modules.items() if hasattr(m, 'convert_comments'))]))"],
        capture_output=True, text=True, timeout=60, check=True)
    loaded, importers = json.loads(done.stdout)
    assert "gpuwatch.reservations.model" in loaded, loaded
    assert "gpuwatch.reservations.legacy" not in loaded, loaded
    assert importers == [], f"the exporter loads the importer: {importers}"


def test_the_endpoint_as_a_process_serves_bookings_without_nvml(tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    port = localstack.free_port()
    with localstack.reservations_endpoint(path, port, tmp_path / "endpoint.log") as service:
        assert run_with_file(path, "reserve", "gpu-srv-01:2", "--until", "+2d",
                             "--user", "erin") == 0
        with urllib.request.urlopen(service.ready_url, timeout=10) as response:
            text = response.read().decode()
    assert 'reserved_host="gpu-srv-01"' in text and 'user="erin"' in text
    assert 'nvidia_gpu_scrape_collector_success{collector="reservation"} 1.0' in text
    assert "nvidia_gpu_nvml_up" not in text and 'collector="gpu"' not in text


def run_with_file(path: Path, *argv: str) -> int:
    return cli.main(["--prometheus", "http://127.0.0.1:9", *argv[:1], "--file", str(path),
                     *argv[1:]], out=io.StringIO())


def test_a_booking_the_file_would_refuse_is_refused_by_the_command_and_nothing_written(
        tmp_path: Path) -> None:
    path = tmp_path / "reservations.yml"
    env = {**os.environ, reservations.ENV_FILE: str(path)}
    ok = subprocess.run([sys.executable, "-m", "gpuwatch.cli", "reserve", "n1:0", "--until",
                         "+1d", "--user", "ann"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    before = path.read_bytes()
    for target in ("gpu node:0", "big:0-100000"):
        done = subprocess.run([sys.executable, "-m", "gpuwatch.cli", "reserve", target,
                               "--until", "+1d"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and done.stdout == "", done
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert path.read_bytes() == before
    now = dt.datetime.now(UTC)
    assert [(b.user, b.host) for b in reservations.load(path, now)] == [("ann", "n1")]
    assert [e["action"] for e in reservations.history(path)] == ["add"]
