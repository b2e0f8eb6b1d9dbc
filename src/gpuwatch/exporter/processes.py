"""pid -> who runs it, which command, since when, in which container or Slurm job.

psutil is injected (``ps``) so the simulated node answers through the same code; the
cgroup file is read through ``read_cgroup`` for the same reason.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from gpuwatch.exporter.readings import ProcessInfo

UNKNOWN = "unknown"
"""User and command of a process the exporter may not look at (hidepid, another namespace)."""

CMDLINE_MAX = 200
"""Characters of a command line kept when --process.command=cmdline (it can hold secrets)."""

# Docker, containerd, CRI-O and Podman put the 64-hex container id in the cgroup path.
_CONTAINER = re.compile(r"(?:docker|containerd|crio|libpod|cri-containerd)[-/:]?([0-9a-f]{64})"
                        r"|/([0-9a-f]{64})(?:\.scope)?$", re.MULTILINE)
_SLURM_JOB = re.compile(r"/slurm[^/\n]*/(?:uid_\d+/)?job_(\d+)")


def parse_cgroup(text: str) -> tuple[str, str]:
    """(container id shortened to 12 characters, Slurm job id) from /proc/PID/cgroup."""
    container = ""
    match = _CONTAINER.search(text)
    if match:
        container = (match.group(1) or match.group(2))[:12]
    job = _SLURM_JOB.search(text)
    return container, job.group(1) if job else ""


def read_proc_cgroup(pid: int, proc_root: Path = Path("/proc")) -> str:
    try:
        return (proc_root / str(pid) / "cgroup").read_text(errors="replace")
    except OSError:
        return ""


def clean_text(value: str) -> str:
    """A string read from the host as valid UTF-8: bytes that are not UTF-8 become U+FFFD.

    psutil hands out undecodable bytes of /proc (a name set with prctl(PR_SET_NAME), a
    command line, a user name) as lone surrogates; written as they are, they would make the
    whole /metrics page fail to encode, so every value of a label passes through here.
    """
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that was not an escaped byte
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


class ProcessInspector:
    """Looks up pids, remembering what is costly to read for as long as it stays the same.

    Every look-up reads the process's start time, user and name again, so a process that
    changes its uid (setuid) or its name (exec, prctl) gets its new labels at once; the
    command line and the cgroup (container, Slurm job) are read again only then, or when the
    pid is recycled (another start time). Entries of processes no longer on any GPU are
    dropped by `forget_others`.
    """

    def __init__(self, ps: ModuleType | Any = psutil,
                 read_cgroup: Callable[[int], str] = read_proc_cgroup,
                 cmdline_max: int = CMDLINE_MAX) -> None:
        self._ps = ps
        self._read_cgroup = read_cgroup
        self._cmdline_max = cmdline_max
        self._cache: dict[int, tuple[float, ProcessInfo]] = {}
        self._lock = threading.Lock()

    def inspect(self, pid: int) -> ProcessInfo | None:
        """What the host knows of the pid; None when it exited meanwhile or is invisible."""
        try:
            # no oneshot(): each value comes from a file of its own (the start time is read
            # by Process() itself, the name from stat, the user from status), and its cache
            # costs a fifth of the look-up
            process = self._ps.Process(pid)
            started = process.create_time()
            user = clean_text(process.username())
            name = clean_text(process.name())
            with self._lock:
                cached = self._cache.get(pid)
            if cached is not None and cached[0] == started and \
                    (cached[1].user, cached[1].command) == (user, name):
                return cached[1]
            info = self._describe(process, user, name, started)
            if not info.cmdline:
                # caught inside exec(): /proc has no command line yet; look again next time
                return info
        except (self._ps.NoSuchProcess, self._ps.ZombieProcess):
            return None
        except self._ps.AccessDenied:
            # hidepid=2 or a namespace boundary: the pid is on the GPU, its owner unknown
            info = ProcessInfo(user=UNKNOWN, command=UNKNOWN, cmdline="", start_time_seconds=0.0)
            started = 0.0
        with self._lock:
            self._cache[pid] = (started, info)
        return info

    def _describe(self, process: Any, user: str, name: str, started: float) -> ProcessInfo:
        try:
            cmdline = clean_text(" ".join(process.cmdline()))
        except self._ps.AccessDenied:
            cmdline = name
        container, job = parse_cgroup(self._read_cgroup(process.pid))
        return ProcessInfo(user=user, command=name, cmdline=cmdline[: self._cmdline_max],
                           start_time_seconds=started, container_id=container,
                           slurm_job_id=job)

    def forget_others(self, alive: Iterable[int]) -> None:
        keep = set(alive)
        with self._lock:
            for pid in [p for p in self._cache if p not in keep]:
                del self._cache[pid]
