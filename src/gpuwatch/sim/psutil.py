"""psutil's Process and errors, and the cgroup file, over a SimulatedNode."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from gpuwatch.sim.node import LiveProcess, SimulatedNode


class SimulatedPsutil:
    """What the exporter's ProcessInspector asks psutil, answered from a SimulatedNode."""

    NoSuchProcess = psutil.NoSuchProcess
    AccessDenied = psutil.AccessDenied
    ZombieProcess = psutil.ZombieProcess

    def __init__(self, node: SimulatedNode) -> None:
        self.node = node

    def Process(self, pid: int) -> _Process:
        live = self.node.find(pid)
        if live is None or live.process.vanished:
            raise psutil.NoSuchProcess(pid)
        return _Process(live)

    def read_cgroup(self, pid: int) -> str:
        """/proc/PID/cgroup: a container's or a Slurm job's, else a login session's."""
        live = self.node.find(pid)
        if live is None:
            return ""
        if live.process.container_id:
            return f"0::/system.slice/docker-{live.process.container_id}.scope\n"
        if live.process.slurm_job_id:
            return f"0::/slurm/uid_1000/job_{live.process.slurm_job_id}/step_0/task_0\n"
        return "0::/user.slice/user-1000.slice/session-1.scope\n"


@dataclass(frozen=True)
class _Process:
    """psutil.Process's methods that the exporter calls, for one live process."""

    live: LiveProcess

    @property
    def pid(self) -> int:
        return self.live.pid

    def create_time(self) -> float:
        return self.live.started

    def username(self) -> str:
        return self.live.process.user

    def name(self) -> str:
        return self.live.process.command

    def cmdline(self) -> list[str]:
        return self.live.process.cmdline.split()
