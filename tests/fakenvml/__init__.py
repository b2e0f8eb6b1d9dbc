"""The fake libnvidia-ml (fakenvml.c): build it, and write the control file it reads.

The exporter loads it as it loads the real one, through nvidia-ml-py's
``CDLL("libnvidia-ml.so.1")``: run it with `environment()`, which puts the built library first
on ``LD_LIBRARY_PATH`` and names the control file and the call log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("fakenvml.c")
LIBRARY = "libnvidia-ml.so.1"
"""The name nvidia-ml-py dlopens on Linux."""
GCC = shutil.which("gcc")


WARNINGS = "gcc.log"
"""gcc's warnings, beside the library: there should be none."""


def build(directory: Path) -> Path:
    """Compile the fake into directory/libnvidia-ml.so.1; the directory for LD_LIBRARY_PATH."""
    if GCC is None:
        raise FileNotFoundError("gcc is not installed: the fake libnvidia-ml cannot be built")
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([GCC, "-Wall", "-Wextra", "-O2", "-shared", "-fPIC", "-pthread",
                           "-o", str(directory / LIBRARY), str(SOURCE)],
                          capture_output=True, text=True, check=False)
    (directory / WARNINGS).write_text(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"gcc cannot build {SOURCE}:\n{done.stderr}")
    return directory


def environment(library_dir: Path, control: Path, log: Path | None = None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an exporter that loads the fake from library_dir."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(library_dir), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["FAKENVML_CONTROL"] = str(control)
    if log is not None:
        env["FAKENVML_LOG"] = str(log)
    return env


@dataclass
class Gpu:
    index: int
    uuid: str = ""
    total_mib: int = 81920
    used_mib: int = 0
    utilization_percent: int = 0
    name: str = "NVIDIA H100 80GB HBM3"

    def __post_init__(self) -> None:
        self.uuid = self.uuid or f"GPU-{self.index:08d}-fake-4000-8000-{self.index:012d}"


@dataclass
class Process:
    gpu: int
    pid: int
    used_bytes: int
    graphics: bool = False
    on: tuple[int, int] | None = None
    """(GPU instance id, compute instance id) of its MIG device, on a GPU in MIG mode."""


@dataclass
class Mig:
    """A MIG device (compute instance of a GPU instance) of a GPU, which is then in MIG mode.
    Compute instances of one GPU instance share its memory: the first one's is served."""

    gpu: int
    gpu_instance_id: int
    compute_instance_id: int = 0
    gpu_slices: int = 1
    """The GPU instance's slices (on its first line); on a later compute instance of the same
    GPU instance, that compute instance's slices."""
    total_mib: int = 9984
    used_mib: int = 0
    profile: str = ""
    """Named in the device's name ("... MIG 1g.10gb"); "" names it not: the exporter reads
    the profile from its attributes (slices, memory) instead."""
    uuid: str = ""

    def __post_init__(self) -> None:
        self.uuid = self.uuid or (f"MIG-{self.gpu:08d}-{self.gpu_instance_id:04d}-"
                                  f"4{self.compute_instance_id:03d}-8000-000000fa4e00")


@dataclass
class Control:
    """What the fake GPUs answer; `write()` makes the running fake see it on its next call."""

    path: Path
    gpus: list[Gpu] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    migs: list[Mig] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    """Directives as fakenvml.c reads them: "hang 1 nvmlDeviceGetPowerUsage", "lost 1",
    "error 1 nvmlDeviceGetPowerUsage 999", "xid 1 79 first", "init_delay_ms 5000", and for
    nvmlDeviceGetFieldValues "field 0 144 1" (a field's value), "field_error 0 190 3" (its
    nvmlReturn), "pcie 0 4 8" (the link as it runs), and "mig_mode 0 1 0" (MIG mode current
    and pending, where it is not what the MIG devices make it)."""
    logged: list[str] = field(default_factory=list)
    """Functions whose every call is appended to $FAKENVML_LOG ("*" for all)."""
    _mtime_ns: int = 0

    @classmethod
    def healthy(cls, path: Path, gpus: int = 2) -> Control:
        control = cls(path, [Gpu(i) for i in range(gpus)])
        control.write()
        return control

    def text(self) -> str:
        lines = [f"gpu {g.index} {g.uuid} {g.total_mib} {g.used_mib} {g.utilization_percent} "
                 f"{g.name}" for g in self.gpus]
        lines += [f"proc {p.gpu} {p.pid} {p.used_bytes}{' graphics' if p.graphics else ''}"
                  + (f" on {p.on[0]} {p.on[1]}" if p.on is not None else "")
                  for p in self.processes]
        lines += [f"mig {m.gpu} {m.gpu_instance_id} {m.compute_instance_id} {m.uuid} "
                  f"{m.gpu_slices} {m.total_mib} {m.used_mib} {m.profile or '-'}"
                  for m in self.migs]
        lines += list(self.faults)
        lines += [f"log {function}" for function in self.logged]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """Replace the file atomically, with a later mtime than the last one: the fake looks
        for a change of inode, size or mtime, and a rename can reuse the old inode."""
        temporary = self.path.with_name(self.path.name + ".new")
        temporary.write_text(self.text())
        self._mtime_ns = max(time.time_ns(), self._mtime_ns + 1_000_000)
        os.utime(temporary, ns=(self._mtime_ns, self._mtime_ns))
        os.replace(temporary, self.path)

    def set_faults(self, *faults: str) -> None:
        self.faults = list(faults)
        self.write()


def logged_calls(log: Path, function: str, gpu: int | None = None) -> int:
    """How many calls of function (on gpu) the fake has logged."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines
               if line.split()[0] == function and (gpu is None or line.split()[1] == str(gpu)))
