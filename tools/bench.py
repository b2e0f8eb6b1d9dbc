"""The exporter benchmark (`make bench`): what one scrape of /metrics costs.

A scrape is the whole /metrics response: the collection and the text exposition the
exporter serves (`gpuwatch.exporter.encoding.text`) of the registry, as
`gpuwatch.exporter.main.build_registry` builds it, over simulated GPUs. Every node is measured in a
fresh Python process, so its peak RSS is that of an exporter serving that node.

Three tables:
- scrape cost on nodes of 1, 8 and 16 GPUs with 0, 8 and 64 processes each (NVML answers
  at once): median and p99 wall time, CPU time per scrape (the process's CPU time, every
  thread, over the measured scrapes: not wall time, so a loaded machine moves it less) and
  the part of it spent in the text exposition alone, the samples served, peak RSS;
- the same on shipped scenarios of the simulator (SCENARIOS: `server`, and `mig`, a MIG
  node), with the NVML calls on each GPU apart, since a MIG GPU's calls depend on its
  slices; a scenario the simulator under test does not have is named and skipped (a run
  of this tool over an older checkout's src, to measure "before");
- concurrency: every NVML call takes LATENCY_SECONDS, the last GPU's SLOW_LATENCY_SECONDS.
  A scrape should cost about the slowest GPU's share (the sum of its NVML latencies), not
  the sum over all GPUs. "NVML done" is when the scrape's last NVML answer came: the reads;
  what follows is turning readings into families and text (the exposition alone is shown).

NVML calls are counted at the pynvml boundary of the simulator: the calls on a GPU per GPU
per scrape (the device count, one per scrape for the node, apart), after the warm-up, so
what is read once per device (names, thresholds, maximum clocks and link) is not in them;
the first scrape's calls (opening the GPUs, reading what never changes, walking the MIG
slices, which is done again once a minute) are printed for the scenarios.

It prints figures next to the targets and asserts nothing about time. `--quick` is the
smoke run the tests use: every node, a few scrapes each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

from gpuwatch import __version__
from gpuwatch.exporter import encoding
from gpuwatch.exporter.collectors.process import ProcessOptions
from gpuwatch.exporter.main import build_exporter, build_registry, simulated_sources
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.sim import Scenario, SimulatedNvml, load_scenario, scenario_names

NODES = tuple((gpus, processes) for gpus in (1, 8, 16) for processes in (0, 8, 64))
"""(GPUs, processes per GPU) of the scrape-cost table."""
LATENCY_NODES = tuple((gpus, processes) for processes in (8, 64) for gpus in (1, 8, 16))
"""(GPUs, processes per GPU) of the concurrency table."""
LATENCY_SECONDS = 0.001
SLOW_LATENCY_SECONDS = 0.002

CPU_TARGET_NODE = (8, 64)
CPU_TARGET_SECONDS = 0.005
RSS_TARGET_BYTES = 40 * 2**20
WALL_TARGET_RATIO = 1.3
CALLS_TARGET = 15
"""NVML calls per GPU per scrape, for a GPU without MIG."""
NODE_CALLS = frozenset({"nvmlInit", "nvmlDeviceGetCount"})
"""Library calls, once per node: not a GPU's."""
SCENARIOS = ("server", "mig")
"""Shipped scenarios of the scenario table (`mig`: a MIG node)."""

PROCESS_CAP = 1024
"""--process.max-per-gpu: far above any node here, so every process is exported."""
OPTIONS = ExporterOptions(process=ProcessOptions(max_per_gpu=PROCESS_CAP))
"""The exporter's defaults otherwise (the Xid watcher thread and the process_* series too)."""


@dataclass(frozen=True)
class Budget:
    """How long each node is measured: at least min_scrapes, then until seconds have passed."""

    seconds: float
    min_scrapes: int
    max_scrapes: int
    warmup_scrapes: int
    """The first scrape opens the GPUs and looks every process up; later ones hit caches."""
    exposition_repeats: int


FULL = Budget(seconds=3.0, min_scrapes=100, max_scrapes=2000, warmup_scrapes=3,
              exposition_repeats=20)
QUICK = Budget(seconds=0.0, min_scrapes=2, max_scrapes=2, warmup_scrapes=1,
               exposition_repeats=1)


# -- one node, in its own process ----------------------------------------------------------


def measure_node(gpus: int, processes: int, budget: Budget, latency: float = 0.0,
                 slow_latency: float | None = None) -> dict[str, Any]:
    """Scrape a synthetic node in this process; the figures as plain data (JSON)."""
    scenario = Scenario.synthetic(gpus, processes, latency_seconds=latency,
                                  slow_gpu_latency_seconds=slow_latency)
    return measure(scenario, budget) | {"gpus": gpus, "processes": processes}


def measure_scenario(name: str, budget: Budget) -> dict[str, Any]:
    """Scrape a shipped scenario in this process; {"missing": True} when the simulator
    under test has none of that name."""
    if name not in scenario_names():
        return {"scenario": name, "missing": True}
    scenario = load_scenario(name)
    # the MIG slices of each GPU when the scenario starts (one made later is not there yet)
    return measure(scenario, budget) | {
        "scenario": name, "gpus": len(scenario.gpus),
        "slices": [sum(1 for m in getattr(g, "mig", ())
                       if not getattr(m, "created_after_seconds", 0)) for g in scenario.gpus]}


class _PerGpu:
    """NVML calls per GPU index, counted where the simulator counts a GPU's calls (its
    `_gpu`, which every call on a GPU or MIG handle goes through): the simulator's own
    counter is by function only."""

    def __init__(self, sim: SimulatedNvml) -> None:
        self.calls: Counter[int] = Counter()
        inner = getattr(sim, "_gpu", None)
        if inner is None:  # another simulator: no per-GPU figures
            return

        def counted(handle: Any, function: str) -> Any:
            self.calls[handle.index] += 1
            return inner(handle, function)

        sim._gpu = counted  # type: ignore[method-assign]


def measure(scenario: Scenario, budget: Budget) -> dict[str, Any]:
    """Scrape a simulated node in this process; the figures as plain data (JSON)."""
    sources = simulated_sources(scenario)
    sim = sources.nvml_lib
    assert isinstance(sim, SimulatedNvml)
    per_gpu = _PerGpu(sim)
    gpus = len(scenario.gpus)
    exporter = build_exporter(OPTIONS, sources)
    registry = build_registry(exporter, OPTIONS)
    try:
        encoding.text(registry)
        first_gpu = dict(per_gpu.calls)
        for _ in range(budget.warmup_scrapes - 1):
            encoding.text(registry)
        walls: list[float] = []
        slowest_shares: list[float] = []
        serial_shares: list[float] = []
        nvml_done: list[float] = []
        calls_before = Counter(sim.calls)
        gpu_before = Counter(per_gpu.calls)
        cpu_start, start = time.process_time(), time.perf_counter()
        while len(walls) < budget.max_scrapes and (
                len(walls) < budget.min_scrapes
                or time.perf_counter() - start < budget.seconds):
            spent = dict(sim.latency_spent)
            began = time.perf_counter()
            encoding.text(registry)
            walls.append(time.perf_counter() - began)
            nvml_done.append(max(0.0, sim.last_answer - began))
            shares = [sim.latency_spent[i] - spent[i] for i in spent]
            slowest_shares.append(max(shares, default=0.0))
            serial_shares.append(sum(shares))
        cpu = time.process_time() - cpu_start
        calls = Counter(sim.calls)
        calls.subtract(calls_before)
        gpu_calls = Counter(per_gpu.calls)
        gpu_calls.subtract(gpu_before)
        peak_rss = _peak_rss_bytes()
        text = encoding.text(registry).decode()
        families = list(registry.collect())
        repeats = budget.exposition_repeats
        exposition_cpu = _exposition_cpu(families, encoding.text, repeats)
        library_cpu = _exposition_cpu(families, generate_latest, repeats)
        openmetrics_cpu = _exposition_cpu(families, encoding.openmetrics_text, repeats)
        library_openmetrics_cpu = _exposition_cpu(
            families, cast(Callable[[CollectorRegistry], bytes], openmetrics.generate_latest),
            repeats)
    finally:
        exporter.close()
    return {
        "scrapes": len(walls), "walls": walls,
        "cpu_per_scrape": cpu / len(walls), "exposition_cpu": exposition_cpu,
        "library_exposition_cpu": library_cpu, "openmetrics_cpu": openmetrics_cpu,
        "library_openmetrics_cpu": library_openmetrics_cpu,
        "samples": sum(1 for line in text.splitlines() if not line.startswith("#")),
        "peak_rss": peak_rss,
        "slowest_shares": slowest_shares, "serial_shares": serial_shares,
        "nvml_done": nvml_done,
        "gpu_calls": {f: n / len(walls) / gpus for f, n in sorted(calls.items())
                      if n and f not in NODE_CALLS},
        # JSON keys are strings: the GPU index as text
        "calls_by_gpu": {str(i): gpu_calls[i] / len(walls) for i in range(gpus)}
        if per_gpu.calls else {},
        "first_scrape_calls_by_gpu": {str(i): first_gpu.get(i, 0) for i in range(gpus)}
        if per_gpu.calls else {},
    }


class _Frozen:
    """One collection's families, served again: exposition without collection."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _exposition_cpu(families: list[Metric], encode: Callable[[CollectorRegistry], bytes],
                    repeats: int) -> float:
    """CPU seconds one exposition (ours or prometheus_client's) alone takes for these
    families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Frozen(families))
    began = time.process_time()
    for _ in range(repeats):
        encode(registry)
    return (time.process_time() - began) / repeats


def _peak_rss_bytes() -> int:
    """The most resident memory this process has had (VmHWM)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS says bytes, Linux KiB


def _child(arguments: list[str], quick: bool, what: str) -> dict[str, Any]:
    """tools.bench with these arguments in a fresh interpreter: its JSON line."""
    command = [sys.executable, "-m", "tools.bench", *arguments]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {what} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def run_node(gpus: int, processes: int, quick: bool, latency: float = 0.0,
             slow_latency: float | None = None) -> dict[str, Any]:
    """measure_node in a fresh interpreter."""
    arguments = [f"--node={gpus}x{processes}"]
    if latency:
        arguments += [f"--latency={latency}", f"--slow-latency={slow_latency}"]
    return _child(arguments, quick, f"{gpus}x{processes}")


def run_nodes(nodes: Sequence[tuple[int, int]], quick: bool, latency: float = 0.0,
              slow_latency: float | None = None) -> Iterator[dict[str, Any]]:
    """run_node for each node, in order; one at a time unless quick (then timings are
    not for quoting, and the smoke run takes a few seconds rather than many)."""
    workers = (os.cpu_count() or 1) if quick else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(
            lambda node: run_node(node[0], node[1], quick, latency, slow_latency), nodes)


def run_scenarios(names: Sequence[str], quick: bool) -> Iterator[dict[str, Any]]:
    """measure_scenario for each shipped scenario, each in a fresh interpreter."""
    workers = (os.cpu_count() or 1) if quick else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(
            lambda name: _child([f"--scenario={name}"], quick, f"scenario {name}"), names)


# -- the report ----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _environment() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"gpuwatch {__version__}, Python {platform.python_version()}, prometheus_client "
            f"{version('prometheus_client')}, {platform.system()} {platform.machine()}, "
            f"{cpus} CPUs{f' ({model})' if model else ''}")


def _load() -> str:
    """The load average (1, 5, 15 minutes): how busy the machine was around the figures."""
    try:
        return " ".join(f"{n:.2f}" for n in os.getloadavg())
    except OSError:
        return "unknown"


def calls_per_gpu(result: dict[str, Any]) -> float:
    """NVML calls on a GPU, per GPU per scrape."""
    return float(sum(result["gpu_calls"].values()))


def scrape_table(quick: bool, out: Any) -> list[dict[str, Any]]:
    print("Scrape cost: collection + text exposition, in-process; NVML answers at once; "
          "a fresh process per node", file=out)
    header = (f"{'GPUs':>4} {'procs':>5} {'samples':>7} {'scrapes':>7} {'median ms':>9} "
              f"{'p99 ms':>7} {'CPU ms/scrape':>13} {'exposition ms':>13} {'peak RSS MiB':>12} "
              f"{'NVML calls/GPU':>14}")
    print(header, file=out)
    results = []
    for r in run_nodes(NODES, quick):
        gpus, processes = r["gpus"], r["processes"]
        results.append(r)
        print(f"{gpus:>4} {processes:>5} {r['samples']:>7} {r['scrapes']:>7} "
              f"{_ms(statistics.median(r['walls'])):>9} {_ms(_p99(r['walls'])):>7} "
              f"{_ms(r['cpu_per_scrape']):>13} {_ms(r['exposition_cpu']):>13} "
              f"{r['peak_rss'] / 2**20:>12.1f} {calls_per_gpu(r):>14.1f}", file=out, flush=True)
    return results


def scenario_table(quick: bool, out: Any) -> list[dict[str, Any]]:
    print("Scenarios: the simulator's shipped scenarios measured the same way (mig: a MIG "
          "node); NVML calls per scrape on each GPU apart", file=out)
    header = (f"{'scenario':>8} {'GPUs':>4} {'slices':>6} {'samples':>7} {'scrapes':>7} "
              f"{'median ms':>9} {'p99 ms':>7} {'CPU ms/scrape':>13} {'peak RSS MiB':>12} "
              f"{'NVML calls/GPU':>14}")
    print(header, file=out)
    results = []
    for r in run_scenarios(SCENARIOS, quick):
        if r.get("missing"):
            print(f"{r['scenario']:>8}  (not a scenario of this simulator)", file=out)
            continue
        results.append(r)
        print(f"{r['scenario']:>8} {r['gpus']:>4} {sum(r['slices']):>6} {r['samples']:>7} "
              f"{r['scrapes']:>7} {_ms(statistics.median(r['walls'])):>9} "
              f"{_ms(_p99(r['walls'])):>7} {_ms(r['cpu_per_scrape']):>13} "
              f"{r['peak_rss'] / 2**20:>12.1f} {calls_per_gpu(r):>14.1f}", file=out, flush=True)
    for r in results:
        if not r["calls_by_gpu"]:
            continue
        calls, first = r["calls_by_gpu"], r["first_scrape_calls_by_gpu"]
        if not any(r["slices"]) and len(set(calls.values())) == 1 and len(set(first.values())) == 1:
            print(f"  {r['scenario']}: NVML calls per scrape on every GPU {calls['0']:g} (first "
                  f"scrape {first['0']})", file=out)
            continue
        print(f"  {r['scenario']}: NVML calls per scrape by GPU (first scrape: opening, what "
              "never changes, MIG slices walked; the walk and the PCIe link again once a "
              "minute):", file=out)
        for index, slices in enumerate(r["slices"]):
            kind = f"MIG, {slices} slices" if slices else "no MIG"
            print(f"    GPU {index} ({kind}): {calls[str(index)]:g} "
                  f"(first scrape {first[str(index)]})", file=out)
    return results


def latency_table(quick: bool, out: Any) -> list[dict[str, Any]]:
    print(f"Concurrency: every NVML call takes {LATENCY_SECONDS * 1e3:g} ms, the last GPU's "
          f"{SLOW_LATENCY_SECONDS * 1e3:g} ms; medians per scrape", file=out)
    header = (f"{'GPUs':>4} {'procs':>5} {'scrapes':>7} {'slowest GPU ms':>14} "
              f"{'all GPUs ms':>11} {'NVML done ms':>12} {'wall ms':>8} {'p99 wall ms':>11} "
              f"{'exposition ms':>13} {'wall/slowest':>12}")
    print(header, file=out)
    results = []
    for r in run_nodes(LATENCY_NODES, quick, LATENCY_SECONDS, SLOW_LATENCY_SECONDS):
        gpus, processes = r["gpus"], r["processes"]
        r["ratio"] = statistics.median(r["walls"]) / statistics.median(r["slowest_shares"])
        results.append(r)
        print(f"{gpus:>4} {processes:>5} {r['scrapes']:>7} "
              f"{_ms(statistics.median(r['slowest_shares'])):>14} "
              f"{_ms(statistics.median(r['serial_shares'])):>11} "
              f"{_ms(statistics.median(r['nvml_done'])):>12} "
              f"{_ms(statistics.median(r['walls'])):>8} {_ms(_p99(r['walls'])):>11} "
              f"{_ms(r['exposition_cpu']):>13} {r['ratio']:>11.2f}x", file=out, flush=True)
    return results


def report(quick: bool, out: Any = sys.stdout) -> None:
    print(_environment(), file=out)
    print(f"load average at the start: {_load()}", file=out)
    if quick:
        print("--quick: a few scrapes per node; a smoke run, not figures to quote", file=out)
    print(file=out)
    scrapes = scrape_table(quick, out)
    print(file=out)
    scenarios = scenario_table(quick, out)
    print(file=out)
    concurrency = latency_table(quick, out)
    print(file=out)
    target = next(r for r in scrapes if (r["gpus"], r["processes"]) == CPU_TARGET_NODE)
    cpu = target["cpu_per_scrape"]
    gpus, processes = CPU_TARGET_NODE
    print(f"Targets:\n  CPU per scrape, {gpus} GPUs x {processes} processes: {_ms(cpu)} ms "
          f"(of which text exposition {_ms(target['exposition_cpu'])} ms); target "
          f"< {_ms(CPU_TARGET_SECONDS)} ms: {_verdict(cpu < CPU_TARGET_SECONDS)}", file=out)
    print(f"    (prometheus_client's generate_latest for the same families: "
          f"{_ms(target['library_exposition_cpu'])} ms; OpenMetrics, which Prometheus asks "
          f"for first: ours {_ms(target['openmetrics_cpu'])} ms, prometheus_client's "
          f"{_ms(target['library_openmetrics_cpu'])} ms)", file=out)
    calls = max(calls_per_gpu(r) for r in scrapes)
    print(f"  NVML calls per GPU per scrape (no MIG), most of all nodes: {calls:.1f} (and one "
          f"device count per scrape for the node); target <= {CALLS_TARGET}: "
          f"{_verdict(calls <= CALLS_TARGET)}", file=out)
    print("    (" + ", ".join(f"{f.removeprefix('nvmlDevice')} {n:g}"
                              for f, n in target["gpu_calls"].items()) + ")", file=out)
    for r in scenarios:
        if not any(r["slices"]) or not r["calls_by_gpu"]:
            continue
        plain = [r["calls_by_gpu"][str(i)] for i, n in enumerate(r["slices"]) if not n]
        mig = [r["calls_by_gpu"][str(i)] for i, n in enumerate(r["slices"]) if n]
        print(f"    ({r['scenario']} node: a GPU without MIG {max(plain, default=0):g}, a MIG GPU "
              f"{max(mig):g} at most: one memory call per slice on top; no target for MIG)",
              file=out)
    rss = max(r["peak_rss"] for r in scrapes)
    print(f"  peak RSS, largest of all nodes: {rss / 2**20:.1f} MiB; target "
          f"< {RSS_TARGET_BYTES / 2**20:g} MiB: {_verdict(rss < RSS_TARGET_BYTES)}", file=out)
    for processes in sorted({r["processes"] for r in concurrency}):
        ratio = max(r["ratio"] for r in concurrency if r["processes"] == processes)
        print(f"  wall / slowest GPU's share, worst node with {processes} processes per GPU: "
              f"{ratio:.2f}x; target < {WALL_TARGET_RATIO:g}x: "
              f"{_verdict(ratio < WALL_TARGET_RATIO)}", file=out)
    reads = max(statistics.median(r["nvml_done"]) / statistics.median(r["slowest_shares"])
                for r in concurrency)
    print(f"    (the reads alone, NVML done / slowest GPU's share, worst node: {reads:.2f}x)",
          file=out)
    print(f"load average at the end: {_load()}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few scrapes per node: checks the benchmark runs, nothing more")
    # one node in this process, for the parent run (JSON on stdout)
    p.add_argument("--node", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--slow-latency", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.scenario is not None:
        print(json.dumps(measure_scenario(args.scenario, budget)))
        return 0
    if args.node is None:
        report(args.quick)
        return 0
    gpus, processes = (int(n) for n in args.node.split("x"))
    result = measure_node(gpus, processes, budget, args.latency, args.slow_latency)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
