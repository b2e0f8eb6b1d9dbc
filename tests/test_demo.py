"""make demo: the fleet comes up, the grid shows every node, the booking command it prints
shows in the grid, Ctrl-C stops every process."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpuwatch import demo
from gpuwatch.localstack import free_port
from gpuwatch.simulate import load_scenario

WAIT = 90.0
"""A bound on how long the demo may take to show its grid, not a timing assertion."""


def _listening(url: str) -> bool:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()  # type: ignore[union-attr]
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _as_a_background_job() -> None:
    """What a shell does to a job started with &: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_demo_shows_the_grid_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch.demo", "--dir", str(tmp_path / "demo"),
         "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_as_a_background_job)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []],
                              daemon=True)
    reader.start()
    gpus = sum(len(load_scenario(scenario).gpus) for _, scenario in demo.NODES)
    summary = f"{gpus} GPUs on {len(demo.NODES)} hosts: "
    seen: list[str] = []
    try:
        deadline = time.monotonic() + WAIT
        while not any(line.startswith(summary) for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
        urls = sorted({m.group(0) for m in re.finditer(r"http://[\d.:]+", "".join(seen))})
        assert len(urls) == len(demo.NODES) + 2  # the exporters, the bookings, Prometheus
        assert all(_listening(url) for url in urls)
        grid = "".join(seen)
        for host, _ in demo.NODES:
            assert re.search(rf"^{re.escape(host)} ", grid, re.MULTILINE), host

        def wait_for_line(pattern: re.Pattern[str]) -> None:
            deadline = time.monotonic() + WAIT
            while not any(pattern.match(line) for line in seen):
                assert time.monotonic() < deadline, "".join(seen)
                try:
                    seen.append(lines.get(timeout=1))
                except queue.Empty:
                    assert process.poll() is None, "".join(seen)

        # the booking it starts with (the endpoint may be scraped after the first grid)
        wait_for_line(re.compile(r"^\s+\d+\s+reserved\s.* frank until "))
        # the booking command it prints, run as printed
        (command,) = [line.split(": ", 1)[1] for line in seen if line.startswith("book a GPU: ")]
        target, until, comment = demo.TRY
        assert f"reserve {target} --until {until}" in command and " --file /" in command
        booked = subprocess.run(shlex.split(command), capture_output=True, text=True,
                                timeout=60)
        assert booked.returncode == 0, booked.stderr
        index = target.split(":")[1]
        wait_for_line(re.compile(rf"^\s+{index}\s+reserved\s.*until .* "
                                 rf"\({re.escape(comment)}\)$"))
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
        while not lines.empty():
            seen.append(lines.get())
        assert "stopped everything" in "".join(seen)
        assert not any(_listening(url) for url in urls)
    finally:
        if process.poll() is None:  # failed midway: let the demo stop its processes
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
