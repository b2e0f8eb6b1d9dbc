"""pid -> user, command, start time, container and Slurm job, with real psutil and /proc."""

from __future__ import annotations

import contextlib
import getpass
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from gpuwatch.exporter.processes import ProcessInspector, clean_text, parse_cgroup, read_proc_cgroup

DOCKER_ID = "3f4e1b2c9d8a7f6e5d4c3b2a19081726354453627180919a0b1c2d3e4f5a6b7c"


@pytest.mark.parametrize(("cgroup", "expected"), [
    (f"0::/system.slice/docker-{DOCKER_ID}.scope\n", (DOCKER_ID[:12], "")),
    (f"12:devices:/docker/{DOCKER_ID}\n", (DOCKER_ID[:12], "")),
    (f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{DOCKER_ID}.scope\n",
     (DOCKER_ID[:12], "")),
    (f"0::/user.slice/user-1000.slice/libpod-{DOCKER_ID}.scope/container\n",
     (DOCKER_ID[:12], "")),
    ("0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n", ("", "4242")),
    ("4:devices:/slurm/uid_1000/job_77/step_batch\n", ("", "77")),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", ("", "")),
    ("", ("", "")),
])
def test_parse_cgroup(cgroup: str, expected: tuple[str, str]) -> None:
    assert parse_cgroup(cgroup) == expected


def test_a_real_process_is_described() -> None:
    inspector = ProcessInspector()
    info = inspector.inspect(os.getpid())
    assert info is not None
    assert info.user == getpass.getuser()
    assert info.command == psutil.Process().name()
    assert info.start_time_seconds == psutil.Process().create_time()
    assert "pytest" in info.cmdline or "python" in info.cmdline


def test_an_exited_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert ProcessInspector().inspect(child.pid) is None


def test_command_lines_are_truncated() -> None:
    child = subprocess.Popen([sys.executable, "-c", "print(flush=True); import time; "
                              "time.sleep(30)", "x" * 500], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # running: past exec()
        info = ProcessInspector(cmdline_max=40).inspect(child.pid)
        assert info is not None and len(info.cmdline) == 40
    finally:
        child.kill()
        child.wait()


class FakePs:
    """psutil's face with settable answers."""

    NoSuchProcess = psutil.NoSuchProcess
    ZombieProcess = psutil.ZombieProcess
    AccessDenied = psutil.AccessDenied

    def __init__(self, cmdline: list[str] | None = None) -> None:
        self.started = 100.0
        self.user = "alice"
        self.cmdline = ["python"] if cmdline is None else cmdline

    def Process(self, pid: int) -> FakeProcess:
        return FakeProcess(pid, self)


@dataclass
class FakeProcess:
    pid: int
    ps: FakePs

    def create_time(self) -> float:
        return self.ps.started

    def username(self) -> str:
        return self.ps.user

    def name(self) -> str:
        return "python"

    def cmdline(self) -> list[str]:
        return self.ps.cmdline

    def oneshot(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def test_a_process_caught_inside_exec_is_described_again_later() -> None:
    ps = FakePs(cmdline=[])
    inspector = ProcessInspector(ps, read_cgroup=lambda pid: "")
    first = inspector.inspect(7)
    assert first is not None and first.cmdline == ""
    ps.cmdline = ["python", "train.py"]
    again = inspector.inspect(7)
    assert again is not None and again.cmdline == "python train.py"


def test_a_recycled_pid_is_looked_up_again() -> None:
    ps = FakePs()
    inspector = ProcessInspector(ps, read_cgroup=lambda pid: "")
    first = inspector.inspect(7)
    assert inspector.inspect(7) is first  # same process, nothing changed: cached
    ps.started = 200.0
    ps.cmdline = ["python", "other.py"]
    renewed = inspector.inspect(7)
    assert renewed is not None and renewed.cmdline == "python other.py"


def test_a_process_that_changes_its_user_gets_its_new_user_at_once() -> None:
    ps = FakePs()
    inspector = ProcessInspector(ps, read_cgroup=lambda pid: "")
    first = inspector.inspect(7)
    assert first is not None and first.user == "alice"
    ps.user = "bob"  # setuid() in a login-like launcher: same pid, same start time
    again = inspector.inspect(7)
    assert again is not None and again.user == "bob"


PRCTL_CHILD = """
import ctypes, sys
libc = ctypes.CDLL(None)
for line in sys.stdin:
    libc.prctl(15, line.rstrip("\\n").encode("latin-1"), 0, 0, 0)  # PR_SET_NAME
    print(flush=True)
"""


@contextlib.contextmanager
def renaming_child(*argv: bytes) -> Iterator[subprocess.Popen[bytes]]:
    """A process that sets its name (prctl) to each line written to it, as raw bytes."""
    child = subprocess.Popen([sys.executable.encode(), b"-c", PRCTL_CHILD.encode(), *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def rename(child: subprocess.Popen[bytes], name: bytes) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(name.decode("latin-1").encode() + b"\n")
    child.stdin.flush()
    child.stdout.readline()


def test_names_and_command_lines_that_are_not_utf8_are_decoded_with_replacement() -> None:
    with renaming_child(b"--data=\xff\xfe.bin") as child:
        rename(child, b"\xff\xfeevil")
        info = ProcessInspector(cmdline_max=1000).inspect(child.pid)
        assert info is not None
        assert info.command == "\ufffd\ufffdevil"
        assert "--data=\ufffd\ufffd.bin" in info.cmdline
        for value in (info.user, info.command, info.cmdline):
            value.encode("utf-8")  # strict: every label value can be written


def test_a_process_that_renames_itself_gets_its_new_name() -> None:
    inspector = ProcessInspector()
    with renaming_child() as child:
        rename(child, b"loader")
        first = inspector.inspect(child.pid)
        assert first is not None and first.command == "loader"
        rename(child, b"trainer")
        again = inspector.inspect(child.pid)
        assert again is not None and again.command == "trainer"


@pytest.mark.parametrize(("value", "expected"), [
    ("plain", "plain"),
    ("caf\xe9", "caf\xe9"),
    (b"\xff-x".decode("utf-8", "surrogateescape"), "\ufffd-x"),
    ("\ud800-lone", "\ufffd\ufffd\ufffd-lone"),
])
def test_clean_text(value: str, expected: str) -> None:
    assert clean_text(value) == expected


def test_read_proc_cgroup_from_a_proc_tree(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("0::/slurm/uid_1/job_9/step_0\n")
    assert parse_cgroup(read_proc_cgroup(42, tmp_path)) == ("", "9")
    assert read_proc_cgroup(43, tmp_path) == ""
