"""The soak benchmark (`make bench-soak`): does an exporter stay flat over many scrapes?

An exporter process serves GPUs of the fake libnvidia-ml of the tests (tests/fakenvml,
compiled here with gcc, loaded by nvidia-ml-py as on a node), while real short-lived
processes come and go on those GPUs: every --churn-every scrapes, half of them are ended and
replaced by new ones, whose pids the fake then reports. Scrapes alternate between a kept
connection (as Prometheus does) and a new one. The exporter's RSS, threads and open file
descriptors (/proc/PID/status, /proc/PID/fd) are printed at checkpoints, before and after.

Without gcc or a checkout's tests/ (an installed wheel), it serves the simulator
(--simulate server) instead, without churn. It prints figures and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tools.bench import _environment, _p99
from tools.localstack import end_process

FAKE_NVML = Path(__file__).resolve().parents[1] / "tests" / "fakenvml" / "__init__.py"
"""The fake libnvidia-ml's builder and control file writer, in a checkout."""
CHECKPOINTS = 10
"""Rows of the table: the figures every scrapes/CHECKPOINTS scrapes."""
WARMUP_SCRAPES = 20
"""Scrapes before the "before" figures: the first opens the GPUs and fills the caches."""


@dataclass(frozen=True)
class Figures:
    scrapes: int
    rss_bytes: int
    peak_rss_bytes: int
    threads: int
    fds: int
    cpu_seconds: float


def figures(pid: int, scrapes: int) -> Figures:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return Figures(
        scrapes=scrapes,
        rss_bytes=int(fields["VmRSS"].split()[0]) * 1024,
        peak_rss_bytes=int(fields["VmHWM"].split()[0]) * 1024,
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_seconds=(int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
    )


def load_fake() -> ModuleType | None:
    """tests/fakenvml of this checkout, when it is there and gcc is installed."""
    if not FAKE_NVML.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fakenvml", FAKE_NVML)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module if module.GCC is not None else None


class Churn:
    """Short-lived processes on the fake GPUs: half of them replaced on every turn."""

    def __init__(self, fake: ModuleType, control: Any, gpus: int, per_gpu: int) -> None:
        self._fake = fake
        self._control = control
        self._slots = [(gpu, n) for gpu in range(gpus) for n in range(per_gpu)]
        self._children: dict[tuple[int, int], subprocess.Popen[bytes]] = {}
        self.started = 0
        self._turn = 0
        for slot in self._slots:
            self._spawn(slot)
        self._write()

    def _spawn(self, slot: tuple[int, int]) -> None:
        self._children[slot] = subprocess.Popen(["sleep", "3600"])
        self.started += 1

    def turn(self) -> None:
        self._turn += 1
        for slot in self._slots[self._turn % 2::2]:
            child = self._children[slot]
            child.kill()
            child.wait()
            self._spawn(slot)
        self._write()

    def _write(self) -> None:
        self._control.processes = [
            self._fake.Process(gpu, child.pid, (256 + 64 * n) * 2**20)
            for (gpu, n), child in self._children.items()]
        self._control.write()

    def close(self) -> None:
        for child in self._children.values():
            child.kill()
            child.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper:
    """GET /metrics, alternating between one kept connection and a new one."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._kept: http.client.HTTPConnection | None = None
        self.failures = 0
        self.walls: list[float] = []

    def scrape(self, fresh_connection: bool) -> None:
        began = time.perf_counter()
        try:
            if fresh_connection:
                connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
                try:
                    ok = self._get(connection)
                finally:
                    connection.close()
            else:
                if self._kept is None:
                    self._kept = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
                ok = self._get(self._kept)
        except (OSError, http.client.HTTPException):
            ok = False
        if not ok:
            self.failures += 1
            self.close()
        self.walls.append(time.perf_counter() - began)

    @staticmethod
    def _get(connection: http.client.HTTPConnection) -> bool:
        connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        response = connection.getresponse()
        response.read()  # a server that closes the connection: http.client connects anew
        return response.status == 200

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None


def wait_until_serving(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the exporter exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the exporter did not listen within 30 s")


def soak(scrapes: int, gpus: int, per_gpu: int, churn_every: int, simulate: bool,
         out: Any = sys.stdout) -> list[Figures]:
    fake = None if simulate else load_fake()
    with tempfile.TemporaryDirectory(prefix="gpuwatch-soak-") as tmp:
        folder = Path(tmp)
        command = [sys.executable, "-m", "gpuwatch.exporter"]
        churn: Churn | None = None
        if fake is None:
            env = dict(os.environ)
            command += ["--simulate", "server"]
            source = "simulated GPUs (--simulate server; no fake libnvidia-ml: needs gcc and " \
                     "a checkout's tests/), no process churn"
        else:
            library = fake.build(folder / "lib")
            control = fake.Control(folder / "control", [fake.Gpu(i) for i in range(gpus)])
            churn = Churn(fake, control, gpus, per_gpu)
            env = fake.environment(library, control.path)
            source = (f"the fake libnvidia-ml through nvidia-ml-py, {gpus} GPUs x {per_gpu} "
                      f"real processes, half of them replaced every {churn_every} scrapes")
        port = free_port()
        log = folder / "exporter.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [*command, "--web.listen-address", f"127.0.0.1:{port}"], env=env,
                stdout=subprocess.DEVNULL, stderr=stderr)
        scraper = Scraper(port)
        try:
            wait_until_serving(process, port, log)
            print(f"Soak: {scrapes} scrapes of an exporter process serving {source}; "
                  "kept and new connections alternate", file=out)
            for i in range(WARMUP_SCRAPES):
                scraper.scrape(fresh_connection=i % 2 == 1)
            scraper.walls.clear()
            header = (f"{'scrapes':>7} {'RSS MiB':>8} {'peak RSS MiB':>12} {'threads':>7} "
                      f"{'fds':>5} {'CPU s':>7}")
            print(header, file=out)
            rows = [figures(process.pid, 0)]
            _row(rows[0], out)
            every = max(1, scrapes // CHECKPOINTS)
            for done in range(1, scrapes + 1):
                if churn is not None and done % churn_every == 0:
                    churn.turn()
                scraper.scrape(fresh_connection=done % 2 == 0)
                if done % every == 0 or done == scrapes:
                    rows.append(figures(process.pid, done))
                    _row(rows[-1], out)
            _summary(rows, scraper, churn, out)
            return rows
        finally:
            scraper.close()
            end_process(process)
            if churn is not None:
                churn.close()


def _row(f: Figures, out: Any) -> None:
    print(f"{f.scrapes:>7} {f.rss_bytes / 2**20:>8.1f} {f.peak_rss_bytes / 2**20:>12.1f} "
          f"{f.threads:>7} {f.fds:>5} {f.cpu_seconds:>7.1f}", file=out, flush=True)


def _summary(rows: list[Figures], scraper: Scraper, churn: Churn | None, out: Any) -> None:
    before, after = rows[0], rows[-1]
    walls = scraper.walls
    print(f"\nBefore -> after {after.scrapes} scrapes:", file=out)
    print(f"  RSS: {before.rss_bytes / 2**20:.1f} -> {after.rss_bytes / 2**20:.1f} MiB "
          f"({(after.rss_bytes - before.rss_bytes) / 2**20:+.1f})", file=out)
    print(f"  threads: {before.threads} -> {after.threads} ({after.threads - before.threads:+d})",
          file=out)
    print(f"  fds: {before.fds} -> {after.fds} ({after.fds - before.fds:+d})", file=out)
    cpu = after.cpu_seconds - before.cpu_seconds
    print(f"  scrapes: {len(walls)} ({scraper.failures} failed), median "
          f"{statistics.median(walls) * 1e3:.2f} ms, p99 {_p99(walls) * 1e3:.2f} ms, exporter "
          f"CPU {cpu / max(1, len(walls)) * 1e3:.2f} ms per scrape", file=out)
    if churn is not None:
        print(f"  processes started on the GPUs: {churn.started}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scrapes", type=int, default=10_000, help="(default %(default)s)")
    p.add_argument("--gpus", type=int, default=4, help="(default %(default)s)")
    p.add_argument("--processes", type=int, default=8,
                   help="processes per GPU (default %(default)s)")
    p.add_argument("--churn-every", type=int, default=100, metavar="SCRAPES",
                   help="replace half the processes every this many scrapes "
                   "(default %(default)s)")
    p.add_argument("--simulate", action="store_true",
                   help="serve the simulator (--simulate server) even where the fake "
                   "libnvidia-ml can be built")
    args = p.parse_args(argv)
    if min(args.scrapes, args.gpus, args.churn_every) < 1 or args.processes < 0:
        p.error("--scrapes, --gpus and --churn-every must be positive, --processes >= 0")
    print(_environment())
    print()
    soak(args.scrapes, args.gpus, args.processes, args.churn_every, args.simulate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
