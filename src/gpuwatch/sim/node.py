"""A scenario running on a clock: which processes live on which GPU now, and the load.

Load follows the processes and a slow wave, so graphs look alive; a frozen clock makes every
reading reproducible (the golden files). `SimulatedNvml` and `SimulatedPsutil` answer from here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpuwatch.sim.scenario import Scenario, SimProcess


@dataclass(frozen=True)
class LiveProcess:
    """A scenario's process as it runs now: a periodic one has a new pid each time."""

    pid: int
    process: SimProcess
    started: float
    """The Unix time it started (psutil's create_time)."""

class SimulatedNode:
    """The state of the simulated GPUs at the clock's current time."""

    def __init__(self, scenario: Scenario, clock: Callable[[], float] = time.time,
                 start: float | None = None) -> None:
        self.scenario = scenario
        self.clock = clock
        self.start = clock() if start is None else start
        # find() answers from these rather than scanning every GPU (a pid look-up per
        # process per scrape would make the simulator, not the exporter, what benchmarks
        # measure): the first place of each steady pid, and every periodic process, in
        # the order processes() lists them
        self._steady: dict[int, tuple[tuple[int, int], SimProcess]] = {}
        self._periodic: list[tuple[tuple[int, int], SimProcess]] = []
        for index, gpu in enumerate(scenario.gpus):
            for n, p in enumerate(gpu.processes):
                if _periodic(p):
                    self._periodic.append(((index, n), p))
                else:
                    self._steady.setdefault(p.pid, ((index, n), p))

    def elapsed(self) -> float:
        return self.clock() - self.start

    def _live(self, p: SimProcess, now: float) -> LiveProcess | None:
        """The process as it runs at `now`; None while a periodic process is off."""
        if not _periodic(p):
            return LiveProcess(p.pid, p, self.start - p.age_seconds)
        cycle, phase = divmod(now - self.start + p.offset_seconds, p.period_seconds)
        if phase >= p.active_seconds:
            return None
        return LiveProcess(p.pid + 7 * int(cycle), p, now - phase)

    def processes(self, index: int) -> list[LiveProcess]:
        now = self.clock()
        return [live for p in self.scenario.gpus[index].processes
                if (live := self._live(p, now)) is not None]

    def busy(self, index: int) -> bool:
        """Whether a process runs on the GPU now."""
        now = self.clock()
        return any(self._live(p, now) is not None for p in self.scenario.gpus[index].processes)

    def utilization(self, index: int) -> float:
        gpu = self.scenario.gpus[index]
        if not self.busy(index) or gpu.load == 0:
            return 0.0
        wave = 0.08 * math.sin(2 * math.pi * self.elapsed() / 240 + index)
        return min(1.0, max(0.0, gpu.load + wave))

    def find(self, pid: int) -> LiveProcess | None:
        """The first live process with this pid, scanning the GPUs in order."""
        now = self.clock()
        steady = self._steady.get(pid)
        candidates = self._periodic if steady is None else sorted(
            [steady, *self._periodic], key=lambda candidate: candidate[0])
        for _, p in candidates:
            live = self._live(p, now)
            if live is not None and live.pid == pid:
                return live
        return None


def _periodic(p: SimProcess) -> bool:
    return bool(p.period_seconds and p.active_seconds)

