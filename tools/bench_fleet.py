"""The fleet benchmark (`python -m tools.bench_fleet`): how far one Prometheus carries gpuwatch.

For each fleet size (100, 1,000 and 10,000 GPUs on nodes of 8 GPUs, 2 processes per GPU) it
starts the fleet simulator (tools.fleetsim: one target per node, each serving what
gpuwatch-exporter serves) and Debian's Prometheus with this repository's prometheus.yml and
rules, rendered by tools.localstack with the production intervals (15 s) and the targets
pointed at the simulator. Once every GPU has a state it prints:

- active series (prometheus_tsdb_head_series), split into what the exporters serve, what the
  rules record and what Prometheus adds per target; series per GPU with processes and users
  left out (the target), and series per process;
- Prometheus' memory (RSS, heap) and CPU, and the simulator's CPU, since both share the
  machine;
- scrape duration over the targets (median, p99, max);
- every rule group's evaluation time (prometheus_rule_group_last_duration_seconds, the most
  seen over several evaluations);
- the grid query and every dashboard panel query (grafana/dashboards/*.json through
  tools.dashboards, variables as Grafana fills them when a dashboard opens: All, or the
  first value; range panels over the last hour at one point per scrape interval), median of
  a few runs each;
- `gpuwatch status` end to end (a new Python process, as a person runs it);
- a MIG node beside the fleet (`--mig-node`, on by default): a gpuwatch-exporter process
  serving the simulator's `mig` scenario (an A100 in seven slices, an H100 in three, an H100
  whose switch to MIG is pending), its series by name, with and without its processes and
  users; the fleet's series per GPU leave it out, so they stay those of GPUs without MIG.

Figures are printed next to the targets; nothing is asserted about time. `--quick` is the
smoke run the tests use: one small fleet, 1 s intervals, one run per query.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gpuwatch import __version__
from gpuwatch.contract import metrics, states
from gpuwatch.contract.prometheus import SCRAPE_SERIES as PER_TARGET_SERIES
from gpuwatch.fleet.prometheus import Prometheus, PrometheusError
from gpuwatch.sim import load_scenario
from tools import dashboards, fleetsim, localstack

PROG = "gpuwatch-bench-fleet"
SIZES = (100, 1_000, 10_000)
GPUS_PER_NODE = 8
PROCESSES_PER_GPU = 2

TARGET_GPUS = 10_000
TARGET_RULE_GROUP_SECONDS = 1.0
TARGET_GRID_SECONDS = 2.0
TARGET_STATUS_SECONDS = 2.0
TARGET_SERIES_PER_GPU = 45.0

PROCESS_SERIES = (metrics.PROCESS_MEMORY.name, metrics.PROCESS_START.name)
USER_SERIES = (metrics.USER_MEMORY.name, metrics.USER_PROCESSES.name)
CHURN_GPUS = 1_000
CHURN_JOB_SECONDS = 60.0
"""Every process slot of the churn runs starts a new job (a new pid) every minute."""
CHURN_JOBS_PER_DAY = (10_000, 100_000, 1_000_000)
CHURN_VARIANTS = (("pid label on (default)", ()),
                  ("--no-process.pid", ("--no-process.pid",)))
HEAD_HOURS = 2.5
"""About how long a series that ended stays in Prometheus' head (and its memory): until the
head compaction that follows the next 2-hour block boundary, 2 to 3 hours."""
MIG_SCENARIO = "mig"
"""The simulator's MIG node, served beside the fleet by a gpuwatch-exporter process."""
MIG_HOST = "mig-node"
GRID_PANEL_TITLE = "Availability grid"
GRID_DASHBOARD = "gpuwatch-fleet"


@dataclass(frozen=True)
class Settings:
    interval: float
    """Scrape and evaluation interval, seconds (the repository's: 15)."""
    evaluations: int
    """Rule evaluations watched for the rule groups' times."""
    repeats: int
    """Runs of each query and of `gpuwatch status`; the median is printed."""
    range_seconds: float
    """The time range of range panels (Grafana's default view: the last hour)."""
    ready_seconds: float
    """At most this long for every target to answer and every GPU to have a state."""
    simulator_cache_seconds: float
    """The simulator's --cache-seconds: how long a node's answer serves later scrapes."""


FULL = Settings(interval=15.0, evaluations=6, repeats=3, range_seconds=3600,
                ready_seconds=240.0, simulator_cache_seconds=60.0)
"""A node's answer serves the scrapes of a minute (values move once a minute, the series,
labels and bytes are the exporter's): collecting 1,250 nodes every 15 s would take one of
the machine's two cores from Prometheus, whose figures these are."""
QUICK = Settings(interval=1.0, evaluations=2, repeats=1, range_seconds=60, ready_seconds=60.0,
                 simulator_cache_seconds=0.0)


class BenchError(Exception):
    """A fleet that did not come up, or Prometheus answering something unexpected."""


# -- asking Prometheus ---------------------------------------------------------------------------

QUERY_TIMEOUT = 120.0
"""Seconds any one question to Prometheus may take: the largest fleet's range panels are slow."""


def own_metrics(prometheus: Prometheus) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus' own /metrics: name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(prometheus.get("/metrics").decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def timed(prometheus: Prometheus, expr: str, range_seconds: float | None,
          step: float) -> float:
    """Seconds from asking to the whole answer read and decoded (what Grafana waits for)."""
    began = time.perf_counter()
    if range_seconds is None:
        prometheus.query(expr)
    else:
        now = time.time()
        prometheus.query_range(expr, now - range_seconds, now, step)
    return time.perf_counter() - began


def _one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    found = samples.get(name)
    if not found:
        raise BenchError(f"Prometheus' /metrics has no {name}")
    return found[0][1]


# -- the figures ---------------------------------------------------------------------------------

@dataclass
class QueryTime:
    dashboard: str
    panel: str
    ref: str
    kind: str
    """instant or range."""
    seconds: float
    series: int


@dataclass
class Figures:
    gpus: int
    nodes: int
    processes: int
    head_series: float = 0.0
    series_by_kind: dict[str, int] = field(default_factory=dict)
    """exporter, process, user, recorded, recorded_user, per_target, alerts, other."""
    rss_bytes: float = 0.0
    heap_bytes: float = 0.0
    prometheus_cores: float = 0.0
    simulator_cores: float = 0.0
    simulator_rss_bytes: float = 0.0
    scrape_seconds: dict[str, float] = field(default_factory=dict)
    """median, p99, max over the targets."""
    scrape_interval_p99: float = 0.0
    group_evaluations: dict[str, list[float]] = field(default_factory=dict)
    """group -> the seconds each evaluation watched took (/api/v1/rules)."""
    rule_evaluations: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """group -> rule -> the seconds of the rule in each evaluation of its group."""

    @property
    def rule_groups(self) -> dict[str, float]:
        """group -> median evaluation, seconds."""
        return {g: statistics.median(v) for g, v in self.group_evaluations.items()}

    def rules_of(self, group: str) -> dict[str, float]:
        """rule -> median evaluation, seconds."""
        return {r: statistics.median(v)
                for r, v in self.rule_evaluations.get(group, {}).items()}
    rule_iterations_missed: float = 0.0
    grid_seconds: float = 0.0
    queries: list[QueryTime] = field(default_factory=list)
    status_seconds: float = 0.0
    status_json_seconds: float = 0.0
    status_gpus: int = 0
    samples_per_scrape: float = 0.0
    prometheus_uptime_seconds: float = 0.0
    """When the rule groups were watched: their cost grows with the samples in each series'
    head chunk (up to 120: 30 minutes at 15 s), so a young Prometheus reads less."""
    mig_gpus: int = 0
    """GPUs of the MIG node beside the fleet (0: none)."""
    mig_slices: int = 0
    """Its MIG devices when measured (nvidia_gpu_mig_info)."""
    mig_series_by_name: dict[str, int] = field(default_factory=dict)
    """The MIG node's series (its instance label) by metric name."""

    def mig_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for name, n in self.mig_series_by_name.items():
            kinds[classify(name)] = kinds.get(classify(name), 0) + n
        return kinds

    @property
    def mig_series(self) -> int:
        """The MIG node's series less the per-process and per-user ones."""
        kinds = self.mig_by_kind()
        return sum(kinds.values()) - sum(kinds.get(k, 0) for k in PER_HOLDER_KINDS)

    @property
    def series_per_gpu(self) -> float:
        """Head series less the per-process and per-user ones and the MIG node's, per GPU
        of the fleet (GPUs without MIG)."""
        excluded = sum(self.series_by_kind.get(k, 0) for k in PER_HOLDER_KINDS)
        mig = sum(self.mig_series_by_name.values())
        mig_holders = sum(self.mig_by_kind().get(k, 0) for k in PER_HOLDER_KINDS)
        return (self.head_series - excluded - (mig - mig_holders)) / self.gpus

    @property
    def series_per_process(self) -> float:
        return self.series_by_kind.get("process", 0) / max(1, self.processes)

    def per_gpu(self, kind: str) -> float:
        """Series of a kind per GPU of the fleet, the MIG node's left out."""
        return (self.series_by_kind.get(kind, 0) - self.mig_by_kind().get(kind, 0)) / self.gpus


@dataclass
class Churn:
    gpus: int
    job_seconds: float
    flags: str
    jobs: float
    """Jobs started during the window (every process slot starts one per job_seconds)."""
    series_created: float

    @property
    def series_per_job(self) -> float:
        return self.series_created / self.jobs


PER_HOLDER_KINDS = ("process", "user", "recorded_user")
"""Series that come with the processes and users on a GPU, not with the GPU."""


def classify(name: str) -> str:
    if name in PROCESS_SERIES:
        return "process"
    if name in USER_SERIES:
        return "user"
    if name.startswith("user:"):
        return "recorded_user"
    if ":" in name:
        return "recorded"
    if name in PER_TARGET_SERIES:
        return "per_target"
    if name in ("ALERTS", "ALERTS_FOR_STATE"):
        return "alerts"
    return "exporter"


# -- one fleet -----------------------------------------------------------------------------------

class FleetRun:
    """The simulator and Prometheus for one fleet size, in `workdir`; stopped by close()."""

    def __init__(self, gpus: int, workdir: Path, settings: Settings,
                 log: Callable[[str], None], source: Path = localstack.SOURCE_DIR,
                 job_seconds: float = 0.0, exporter_flags: Sequence[str] = (),
                 mig_node: bool = False) -> None:
        self.spec = fleetsim.FleetSpec(gpus, GPUS_PER_NODE, PROCESSES_PER_GPU,
                                       job_seconds=job_seconds)
        self.exporter_flags = list(exporter_flags)
        self.workdir = workdir
        self.source = source
        self.settings = settings
        self.log = log
        self.stack = ExitStack()
        self._prometheus: Prometheus | None = None
        self.simulator_stats_url = ""
        self.mig_node = mig_node
        self.mig_instance = ""
        """host:port of the MIG node's exporter ("": none)."""

    def __enter__(self) -> FleetRun:
        try:
            self.start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def start(self) -> None:
        targets = self.workdir / "targets"
        targets.mkdir(parents=True)
        port = localstack.free_port()
        first = fleetsim.node_address(fleetsim.DEFAULT_BASE_ADDRESS, 0)
        simulator = localstack.Service(
            f"fleet simulator ({self.spec.gpus} GPUs)",
            [sys.executable, "-m", "tools.fleetsim", f"--gpus={self.spec.gpus}",
             f"--gpus-per-node={self.spec.gpus_per_node}",
             f"--processes={self.spec.processes_per_gpu}", f"--port={port}",
             f"--targets-file={targets / 'fleet.yml'}",
             f"--cache-seconds={self.settings.simulator_cache_seconds:g}",
             f"--job-seconds={self.spec.job_seconds:g}",
             *(f"--exporter-flag={flag}" for flag in self.exporter_flags), "--log.level=warn"],
            f"http://{first}:{port}/-/healthy", self.workdir / "fleetsim.log")
        simulator.start(timeout=120)
        self.stack.callback(simulator.stop)
        self.simulator_stats_url = f"http://{first}:{port}{fleetsim.STATS_PATH}"
        if self.mig_node:
            self.start_mig_node(targets)
        every = f"{self.settings.interval:g}s"
        overrides = localstack.Overrides() if self.settings.interval == FULL.interval else \
            localstack.Overrides(scrape_interval=every, evaluation_interval=every)
        config = localstack.render_config(self.workdir / "prometheus", targets, overrides,
                                          source=self.source)
        prometheus_port = localstack.free_port()
        prometheus = localstack.prometheus(config, self.workdir / "data", prometheus_port,
                                           self.workdir / "prometheus.log")
        prometheus.start(timeout=60)
        self.stack.callback(prometheus.stop)
        self._prometheus = Prometheus(f"http://{localstack.LOCALHOST}:{prometheus_port}",
                                      QUERY_TIMEOUT)

    def start_mig_node(self, targets: Path) -> None:
        """gpuwatch-exporter --simulate mig on 127.0.0.1, in the targets beside the fleet."""
        port = localstack.free_port()
        self.mig_instance = f"{localstack.LOCALHOST}:{port}"
        exporter = localstack.Service(
            f"MIG node (gpuwatch-exporter --simulate {MIG_SCENARIO})",
            [sys.executable, "-m", "gpuwatch.exporter", f"--simulate={MIG_SCENARIO}",
             f"--web.listen-address={self.mig_instance}", "--log.level=warn"],
            f"http://{self.mig_instance}/-/healthy", self.workdir / "mig-node.log")
        exporter.start(timeout=60)
        self.stack.callback(exporter.stop)
        localstack.write_targets(targets / "mig-node.yml", [
            {"targets": [self.mig_instance], "labels": {"host": MIG_HOST, "cluster": MIG_HOST}}])

    @property
    def mig_gpus(self) -> int:
        return len(load_scenario(MIG_SCENARIO).gpus) if self.mig_node else 0

    @property
    def prometheus(self) -> Prometheus:
        if self._prometheus is None:
            raise BenchError("Prometheus is not started yet")
        return self._prometheus

    def simulator_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.simulator_stats_url, timeout=30) as r:
            stats: dict[str, Any] = json.loads(r.read())
            return stats

    def wait_ready(self) -> None:
        """Every target scraped and every GPU with a state, then two more evaluations."""
        p, spec = self.prometheus, self.spec
        deadline = time.monotonic() + self.settings.ready_seconds
        fleet, mig = f'instance!="{self.mig_instance}"', f'instance="{self.mig_instance}"'
        checks = [(f'count(up{{job="{states.JOB}"}} == 1)', spec.nodes + bool(self.mig_node),
                   "every node scraped"),
                  (f"count({states.STATE_INFO}{{{fleet}}})", spec.gpus,
                   "every GPU with a state")]
        if self.mig_node:  # at least its GPUs (its slices may have states of their own)
            checks.append((f"clamp_max(count({states.STATE_INFO}{{{mig}}}) >= "
                           f"{self.mig_gpus}, 1)", 1, "every GPU of the MIG node with a state"))
        for expr, wanted, what in checks:
            while (got := p.query_value(expr)) != wanted:
                if time.monotonic() > deadline:
                    raise BenchError(f"waited {self.settings.ready_seconds:g} s for {what}: "
                                     f"{got} of {wanted}")
                time.sleep(min(2.0, self.settings.interval / 2))
        time.sleep(2 * self.settings.interval)

    def measure(self) -> Figures:
        p, s = self.prometheus, self.settings
        processes = self.spec.gpus * self.spec.processes_per_gpu
        figures = Figures(self.spec.gpus, self.spec.nodes, processes)
        before, sim_before, t0 = own_metrics(p), self.simulator_stats(), time.monotonic()
        # the rule groups over several evaluations, with no query running beside them;
        # each evaluation counted once (by when it ran)
        seen: set[tuple[str, str]] = set()
        for _ in range(2 * s.evaluations):
            time.sleep(s.interval / 2)
            for g in p.rules():
                if (g["name"], g["lastEvaluation"]) in seen:
                    continue
                seen.add((g["name"], g["lastEvaluation"]))
                figures.group_evaluations.setdefault(g["name"], []).append(
                    float(g["evaluationTime"]))
                rules = figures.rule_evaluations.setdefault(g["name"], {})
                for rule in g["rules"]:
                    rules.setdefault(rule["name"], []).append(float(rule["evaluationTime"]))
        after, sim_after, wall = own_metrics(p), self.simulator_stats(), \
            time.monotonic() - t0
        figures.prometheus_cores = (_one(after, "process_cpu_seconds_total")
                                    - _one(before, "process_cpu_seconds_total")) / wall
        figures.simulator_cores = (sim_after["cpu_seconds"] - sim_before["cpu_seconds"]) / \
            (sim_after["uptime_seconds"] - sim_before["uptime_seconds"])
        figures.simulator_rss_bytes = sim_after["rss_bytes"]
        figures.rss_bytes = _one(after, "process_resident_memory_bytes")
        figures.heap_bytes = _one(after, "go_memstats_heap_inuse_bytes")
        figures.head_series = _one(after, "prometheus_tsdb_head_series")
        figures.prometheus_uptime_seconds = time.time() - _one(after,
                                                               "process_start_time_seconds")
        figures.rule_iterations_missed = sum(
            v for _, v in after.get("prometheus_rule_group_iterations_missed_total", []))
        figures.scrape_interval_p99 = max(
            (v for labels, v in after.get("prometheus_target_interval_length_seconds", [])
             if labels.get("quantile") == "0.99"), default=0.0)

        job = f'job="{states.JOB}"'
        for name, expr in (("median", f"quantile(0.5, scrape_duration_seconds{{{job}}})"),
                           ("p99", f"quantile(0.99, scrape_duration_seconds{{{job}}})"),
                           ("max", f"max(scrape_duration_seconds{{{job}}})")):
            figures.scrape_seconds[name] = p.query_value(expr) or 0.0
        figures.samples_per_scrape = \
            p.query_value(f"avg(scrape_samples_scraped{{{job}}})") or 0.0
        for row in p.query('count by (__name__) ({__name__=~".+"})'):
            kind = classify(row.labels["__name__"])
            figures.series_by_kind[kind] = figures.series_by_kind.get(kind, 0) + int(row.value)
        if self.mig_node:
            figures.mig_gpus = self.mig_gpus
            mig = f'instance="{self.mig_instance}"'
            figures.mig_series_by_name = {
                row.labels["__name__"]: int(row.value)
                for row in p.query(f"count by (__name__) ({{{mig}}})")}
            figures.mig_slices = int(p.query_value(
                f"count({metrics.MIG_INFO.name}{{{mig}}})") or 0)

        figures.queries = list(self.dashboard_queries())
        grid = [q for q in figures.queries
                if q.dashboard == GRID_DASHBOARD and q.panel == GRID_PANEL_TITLE]
        if len(grid) != 1:
            raise BenchError(f"{GRID_DASHBOARD} has no single panel {GRID_PANEL_TITLE!r}")
        figures.grid_seconds = grid[0].seconds
        figures.status_seconds = self.status_seconds([])
        figures.status_json_seconds = self.status_seconds(["--json"])
        out = self.status_output(["--json"])
        figures.status_gpus = len(json.loads(out))
        return figures

    def measure_churn(self, window: float) -> Churn:
        """Series Prometheus creates per job started, over `window` seconds."""
        p = self.prometheus
        created = "prometheus_tsdb_head_series_created_total"
        before, t0 = _one(own_metrics(p), created), time.monotonic()
        time.sleep(window)
        after, t1 = _one(own_metrics(p), created), time.monotonic()
        jobs = self.spec.gpus * self.spec.processes_per_gpu * (t1 - t0) / self.spec.job_seconds
        return Churn(self.spec.gpus, self.spec.job_seconds, " ".join(self.exporter_flags),
                     jobs, after - before)

    def dashboard_queries(self) -> Iterator[QueryTime]:
        p, s = self.prometheus, self.settings
        builtins = dashboards.grafana_values(s.interval, s.range_seconds)
        for uid, dashboard in dashboards.load_all().items():
            values = dashboards.resolve_variables(dashboard, p.label_values, builtins,
                                                  each_value=False)[0]
            for panel, target in dashboards.targets(dashboard):
                expr = dashboards.expand(target["expr"], values)
                ranged = bool(target.get("range")) and not target.get("instant")
                seconds = statistics.median(
                    timed(p, expr, s.range_seconds if ranged else None, s.interval)
                    for _ in range(s.repeats))
                series = len(p.query(expr))
                yield QueryTime(uid, panel.get("title", ""), target.get("refId", ""),
                                "range" if ranged else "instant", seconds, series)

    def status_output(self, extra: Sequence[str]) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gpuwatch.cli", "--prometheus", self.prometheus.url,
             "--timeout", "60", "status", *extra],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "NO_COLOR": "1"})
        if done.returncode != 0:
            raise BenchError(f"gpuwatch status failed: {done.stderr.strip()}")
        return done.stdout

    def status_seconds(self, extra: Sequence[str]) -> float:
        """`gpuwatch status` from a new process to its last line, median of the runs."""
        runs = []
        for _ in range(self.settings.repeats):
            began = time.perf_counter()
            self.status_output(extra)
            runs.append(time.perf_counter() - began)
        return statistics.median(runs)


# -- printing ------------------------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def report_size(f: Figures, out: Callable[[str], None]) -> None:
    out(f"\n== {f.gpus:,} GPUs: {f.nodes:,} nodes of {GPUS_PER_NODE} (the last one the rest), "
        f"{PROCESSES_PER_GPU} processes per GPU ({f.processes:,} processes)")
    k = f.series_by_kind
    out(f"  active series (head)        {f.head_series:,.0f}")
    out(f"    served by the exporters   {k.get('exporter', 0):,}  "
        f"({f.per_gpu('exporter'):.1f} per GPU; {f.samples_per_scrape:,.0f} samples per "
        "scrape)")
    out(f"    per process               {k.get('process', 0):,}  "
        f"({f.series_per_process:.1f} per process)")
    out(f"    per user and GPU          {k.get('user', 0):,}")
    out(f"    recorded by the rules     {k.get('recorded', 0):,}  "
        f"({f.per_gpu('recorded'):.1f} per GPU) + {k.get('recorded_user', 0):,} per user")
    out(f"    per target (up, scrape_*) {k.get('per_target', 0):,}  "
        f"({f.per_gpu('per_target'):.1f} per GPU)")
    out(f"    alerts                    {k.get('alerts', 0):,}")
    out(f"  series per GPU              {f.series_per_gpu:.1f}  (processes and users left out"
        f"{'; the MIG node too, as in every per GPU figure above' if f.mig_gpus else ''})")
    if f.mig_gpus:
        kinds = f.mig_by_kind()
        mig_own = sum(n for name, n in f.mig_series_by_name.items()
                      if name.startswith("nvidia_gpu_mig_"))
        holders = sum(kinds.get(k, 0) for k in PER_HOLDER_KINDS)
        out(f"  MIG node                    {f.mig_series}  (processes and users left out; "
            f"{f.mig_gpus} GPUs, {f.mig_slices} MIG devices; {f.mig_series / f.mig_gpus:.1f} "
            f"per GPU; {holders} more for its processes and users)")
        out(f"    served by its exporter    {kinds.get('exporter', 0)}  (of which "
            f"nvidia_gpu_mig_*: {mig_own}, {mig_own / max(1, f.mig_slices):.1f} per MIG device)")
        out(f"    recorded by the rules     {kinds.get('recorded', 0)}; per target "
            f"{kinds.get('per_target', 0)}; alerts {kinds.get('alerts', 0)}")
    out(f"  Prometheus memory           RSS {_mib(f.rss_bytes)}, heap in use "
        f"{_mib(f.heap_bytes)} ({f.rss_bytes / max(1.0, f.head_series):,.0f} bytes per series)")
    out(f"  CPU (cores)                 Prometheus {f.prometheus_cores:.2f}, simulator "
        f"{f.simulator_cores:.2f} (simulator RSS {_mib(f.simulator_rss_bytes)})")
    out(f"  scrape duration             median {_ms(f.scrape_seconds['median'])}, p99 "
        f"{_ms(f.scrape_seconds['p99'])}, max {_ms(f.scrape_seconds['max'])}; interval p99 "
        f"{f.scrape_interval_p99:.2f} s (the simulator's answers; an exporter's own "
        "collection time: make bench)")
    evaluations = max((len(v) for v in f.group_evaluations.values()), default=0)
    out(f"  rule groups (median and longest of {evaluations} evaluations; iterations missed: "
        f"{f.rule_iterations_missed:.0f}; Prometheus up {f.prometheus_uptime_seconds / 60:.0f} "
        "min)")
    for group, seconds in sorted(f.rule_groups.items()):
        longest = max(f.group_evaluations[group])
        out(f"    {group:<26}  {_ms(seconds):>9}  (longest {_ms(longest)})")
        slow = sorted(f.rules_of(group).items(), key=lambda kv: -kv[1])
        shown = [kv for kv in slow if kv[1] >= 0.05 * seconds] if seconds >= 0.01 else []
        for rule, took in shown[:6]:
            out(f"      {rule[:56]:<56} {_ms(took):>9}")
    out(f"  grid query                  {_ms(f.grid_seconds)}")
    out(f"  gpuwatch status             {_ms(f.status_seconds)} (--json "
        f"{_ms(f.status_json_seconds)}; {f.status_gpus:,} GPUs listed)")
    out("  dashboard queries (median time; series the query returns now)")
    for q in f.queries:
        title = f"{q.dashboard.removeprefix('gpuwatch-')}: {q.panel} {q.ref}"
        out(f"    {title[:62]:<62} {q.kind:<7} {_ms(q.seconds):>10} {q.series:>8,}")


def report_churn(runs: Sequence[Churn], bytes_per_series: float,
                 out: Callable[[str], None]) -> None:
    out(f"\nProcess churn ({CHURN_GPUS:,} GPUs, {PROCESSES_PER_GPU} processes per GPU, a new "
        f"job every {CHURN_JOB_SECONDS:g} s per process):")
    for run in runs:
        label = next(name for name, flags in CHURN_VARIANTS if " ".join(flags) == run.flags)
        per_day = ", ".join(f"{n:,} jobs/day: {n * run.series_per_job:,.0f} series/day"
                            for n in CHURN_JOBS_PER_DAY)
        out(f"  {label:<24} {run.series_per_job:.2f} new series per job "
            f"({run.series_created:,.0f} for {run.jobs:,.0f} jobs); {per_day}")
        if bytes_per_series:
            held = CHURN_JOBS_PER_DAY[1] / 24 * HEAD_HOURS * run.series_per_job
            out(f"  {'':<24} at {CHURN_JOBS_PER_DAY[1]:,} jobs/day about {held:,.0f} ended "
                f"series wait in the head ({HEAD_HOURS:g} h), {_mib(held * bytes_per_series)}")


def summary(results: Sequence[Figures], settings: Settings, out: Callable[[str], None]) -> None:
    mig = next((f for f in results if f.mig_gpus), None)
    out(f"\nSizing (one Prometheus, {settings.interval:g} s scrape and evaluation interval"
        f"{f', a MIG node of {mig.mig_gpus} GPUs beside each fleet' if mig else ''}):")
    header = ("GPUs", "nodes", "series", "series/GPU", "MIG node", "RSS", "slowest group",
              "grid", "status", "slowest panel")
    rows = []
    for f in results:
        slowest = max(f.queries, key=lambda q: q.seconds)
        rows.append((f"{f.gpus:,}", f"{f.nodes:,}", f"{f.head_series:,.0f}",
                     f"{f.series_per_gpu:.1f}",
                     f"{f.mig_series}" if f.mig_gpus else "-", _mib(f.rss_bytes),
                     _ms(max(f.rule_groups.values(), default=0.0)), _ms(f.grid_seconds),
                     _ms(f.status_seconds), _ms(slowest.seconds)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    at_target = [f for f in results if f.gpus == TARGET_GPUS]
    if not at_target:
        return
    f = at_target[0]
    out(f"\nTargets at {TARGET_GPUS:,} GPUs:")
    slowest_group = max(f.rule_groups.items(), key=lambda kv: kv[1])
    checks = (
        (f"every rule group under {TARGET_RULE_GROUP_SECONDS:g} s (median evaluation; slowest "
         f"{slowest_group[0]}: {_ms(slowest_group[1])})",
         slowest_group[1] < TARGET_RULE_GROUP_SECONDS),
        (f"grid query under {TARGET_GRID_SECONDS:g} s ({_ms(f.grid_seconds)})",
         f.grid_seconds < TARGET_GRID_SECONDS),
        (f"gpuwatch status under {TARGET_STATUS_SECONDS:g} s ({_ms(f.status_seconds)})",
         f.status_seconds < TARGET_STATUS_SECONDS),
        (f"series per GPU under {TARGET_SERIES_PER_GPU:g} ({f.series_per_gpu:.1f})",
         f.series_per_gpu < TARGET_SERIES_PER_GPU),
    )
    for text, met in checks:
        out(f"  {text}: {'met' if met else 'MISSED'}")


# -- the command ---------------------------------------------------------------------------------

def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__
                                else None)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="fleet sizes in GPUs, comma-separated (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one fleet of 16 GPUs, 1 s intervals, one run per query")
    p.add_argument("--no-churn", dest="churn", action="store_false",
                   help="leave out the process churn runs")
    p.add_argument("--no-mig-node", dest="mig_node", action="store_false",
                   help=f"no MIG node (gpuwatch-exporter --simulate {MIG_SCENARIO}) beside "
                   "each fleet")
    p.add_argument("--simulator-cache", type=float, metavar="SECONDS",
                   help="how long a simulated node's answer serves later scrapes (the "
                   "simulator's --cache-seconds; default %(default)s)")
    p.add_argument("--prometheus-dir", type=Path, default=localstack.SOURCE_DIR,
                   metavar="DIR", help="the prometheus/ directory to run (prometheus.yml, "
                   "rules/), to compare a change of the rules (default: this checkout's)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep configuration, data and logs under DIR (default: a temporary "
                   "directory, removed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.simulator_cache is not None:
        settings = replace(settings, simulator_cache_seconds=args.simulator_cache)
    # a stopped benchmark stops what it started (the with blocks), then exits
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sizes = [16] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        print(f"{PROG}: error: --sizes {args.sizes!r}: whole numbers, comma-separated",
              file=sys.stderr)
        return 2
    try:
        localstack.prometheus_binary()
    except localstack.LocalStackError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    def out(line: str) -> None:
        print(line, flush=True)

    out(f"gpuwatch {__version__} fleet benchmark: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {localstack.prometheus_binary()}; scrape and evaluation "
        f"every {settings.interval:g} s")
    base = args.keep or Path(tempfile.mkdtemp(prefix="gpuwatch-bench-fleet-"))
    results: list[Figures] = []
    churn: list[Churn] = []
    try:
        for gpus in sizes:
            began = time.monotonic()
            workdir = base / f"gpus-{gpus}"
            if workdir.exists():
                shutil.rmtree(workdir)
            with FleetRun(gpus, workdir, settings, out, args.prometheus_dir,
                          mig_node=args.mig_node) as run:
                run.wait_ready()
                figures = run.measure()
            results.append(figures)
            report_size(figures, out)
            out(f"  ({time.monotonic() - began:.0f} s for this size; load average "
                f"{os.getloadavg()[0]:.1f} at the end, this benchmark's own processes "
                "included)")
        if args.churn and not args.quick:
            # every scrape collects: a cached answer could skip a job altogether
            uncached = replace(settings, simulator_cache_seconds=0.0)
            for name, flags in CHURN_VARIANTS:
                workdir = base / f"churn-{len(churn)}"
                with FleetRun(CHURN_GPUS, workdir, uncached, out, args.prometheus_dir,
                              CHURN_JOB_SECONDS, flags) as run:
                    run.wait_ready()
                    churn.append(run.measure_churn(4 * settings.interval))
                out(f"  (churn run {name}: done)")
    except (BenchError, PrometheusError, localstack.LocalStackError,
            fleetsim.FleetSimError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    if churn:
        largest = max(results, key=lambda f: f.gpus, default=None)
        report_churn(churn, largest.rss_bytes / largest.head_series if largest else 0.0, out)
    summary(results, settings, out)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) | {"series_per_gpu": f.series_per_gpu,
                                                      "mig_series": f.mig_series,
                                                      "rule_groups": f.rule_groups}
                                         for f in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
