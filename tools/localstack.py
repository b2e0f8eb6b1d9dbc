"""Simulated exporters, a real Prometheus and its Alertmanager on 127.0.0.1, for the end-to-end
tests and the demo.

Prometheus runs this repository's prometheus.yml and rules, generated into a directory of
the caller's with the overrides a short run needs (scrape and evaluation intervals,
thresholds, alert `for`): the files in prometheus/ are the only source, never forked.
Alertmanager runs prometheus/alertmanager/alertmanager.yml with the run's receivers and
intervals, rendered by the Ansible role's filter as a deployment's is.
Everything listens on 127.0.0.1 and every process started here is stopped by its owner.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import yaml

from gpuwatch.contract import states

LOCALHOST = "127.0.0.1"
SOURCE_DIR = Path(__file__).resolve().parents[1] / "prometheus"
"""prometheus/ of the checkout these tools run from (tools/ is not in the wheel)."""
RUN_GRAFANA = SOURCE_DIR.parent / "grafana" / "run-grafana"
"""grafana/run-grafana of that checkout: a Grafana with its provisioning and dashboards."""
GRAFANA_MISSING = 3
"""run-grafana's exit status when no Grafana is installed."""

_CONSTANT = re.compile(r"^\s*vector\(\s*([-+0-9.eE]+)\s*\)\s*$")



def end_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, and SIGKILL when the process has not ended `timeout` seconds later."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

class LocalStackError(Exception):
    """A process could not be started, or a configuration could not be generated."""


# -- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Overrides:
    """What a short local run changes in the repository's configuration."""

    scrape_interval: str | None = None
    """Also the scrape timeout, which may not exceed it."""
    evaluation_interval: str | None = None
    refresh_interval: str | None = None
    """How often file_sd re-reads the target files besides on change notifications."""
    thresholds: Mapping[str, float] = field(default_factory=dict)
    """Recording rule of rules/thresholds.yml -> value."""
    alert_for: Mapping[str, str] = field(default_factory=dict)
    """Alert name -> its `for`."""


def load_rules(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise LocalStackError(f"{path}: not a Prometheus rule file (no groups)")
    return doc


def rules(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in doc["groups"] for rule in group.get("rules", [])]


def rule_files(source: Path = SOURCE_DIR) -> list[Path]:
    """The rule files prometheus.yml loads, in its order."""
    config = yaml.safe_load((source / "prometheus.yml").read_text())
    return [source / f for f in config.get("rule_files", [])]


def threshold_values(source: Path = SOURCE_DIR) -> dict[str, float]:
    """Every constant the rules publish (rules/thresholds.yml): record name -> value."""
    values = {}
    for path in rule_files(source):
        for rule in rules(load_rules(path)):
            match = _CONSTANT.match(str(rule.get("expr", "")))
            if "record" in rule and match:
                values[rule["record"]] = float(match.group(1))
    return values


def render_rules(source: Path, dest: Path, overrides: Overrides) -> set[str]:
    """Writes the rule file `source` to `dest` with the overrides; returns the names of the
    rules it overrode."""
    doc = load_rules(source)
    done: set[str] = set()
    for rule in rules(doc):
        record, alert = str(rule.get("record", "")), str(rule.get("alert", ""))
        if record in overrides.thresholds:
            if not _CONSTANT.match(str(rule["expr"])):
                raise LocalStackError(f"{source}: {record} is not a constant")
            rule["expr"] = f"vector({overrides.thresholds[record]!r})"
            done.add(record)
        if alert in overrides.alert_for:
            rule["for"] = overrides.alert_for[alert]
            done.add(alert)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000))
    return done


PLUGINS = SOURCE_DIR.parent / "ansible" / "roles"
PROMETHEUS_CONFIG_PLUGIN = (PLUGINS / "gpuwatch_prometheus" / "filter_plugins"
                            / "gpuwatch_prometheus.py")
"""The one rendering of prometheus.yml: the Ansible role deploys with it (as a filter), and
render_config here calls the same function."""
ALERTMANAGER_CONFIG_PLUGIN = (PLUGINS / "gpuwatch_alertmanager" / "filter_plugins"
                              / "gpuwatch_alertmanager.py")
"""The one rendering of alertmanager.yml (the receivers and the users' routes), which
render_alertmanager_config calls."""
ALERTMANAGER_SOURCE = SOURCE_DIR / "alertmanager" / "alertmanager.yml"


@functools.cache
def _plugin(path: Path) -> ModuleType:
    """The filter plugin at `path` as a module."""
    spec = importlib.util.spec_from_file_location(f"gpuwatch_plugin_{path.stem}", path)
    if not path.is_file() or spec is None or spec.loader is None:
        raise LocalStackError(f"{path}: missing; restore it with git checkout -- {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prometheus_config_plugin() -> ModuleType:
    """PROMETHEUS_CONFIG_PLUGIN as a module (its prometheus_config is the rendering)."""
    return _plugin(PROMETHEUS_CONFIG_PLUGIN)


def alertmanager_config_plugin() -> ModuleType:
    """ALERTMANAGER_CONFIG_PLUGIN as a module (its alertmanager_config is the rendering)."""
    return _plugin(ALERTMANAGER_CONFIG_PLUGIN)


def render_config(dest: Path, targets_dir: Path, overrides: Overrides | None = None,
                  source: Path = SOURCE_DIR, reservations: str | None = None,
                  alertmanager: str | None = None, prometheus: str | None = None,
                  runbook_url: str | None = None) -> Path:
    """Writes prometheus.yml and its rule files under `dest`, reading targets from
    `targets_dir` and the bookings from the reservations endpoint at `reservations`
    (HOST:PORT; None leaves that job out); returns the path of the configuration.

    Alerts go to the Alertmanager at `alertmanager` (HOST:PORT), which the alertmanager job
    scrapes; None sends them nowhere and leaves that job out, so a run without one never
    reaches an Alertmanager that happens to listen on the usual port. The prometheus job
    scrapes `prometheus` (HOST:PORT: the address this Prometheus will listen on); None leaves
    it out. `runbook_url` replaces the external label the alerts' runbook links start with.

    prometheus.yml is the Ansible role's rendering (PROMETHEUS_CONFIG_PLUGIN) with this
    run's settings."""
    overrides = overrides or Overrides()
    source_config = yaml.safe_load((source / "prometheus.yml").read_text())
    plugin = prometheus_config_plugin()
    jobs = {job.get("job_name") for job in source_config.get("scrape_configs") or []}
    without = [] if reservations is not None else [states.RESERVATIONS_JOB]
    services: dict[str, Any] = {}
    if "alerting" in source_config:
        services["alertmanagers"] = [alertmanager] if alertmanager else []
    if alertmanager is None and plugin.ALERTMANAGER_JOB in jobs:
        without.append(plugin.ALERTMANAGER_JOB)
    if prometheus is not None:
        services["prometheus_address"] = prometheus
    elif plugin.PROMETHEUS_JOB in jobs:
        without.append(plugin.PROMETHEUS_JOB)
    if runbook_url is not None:
        services["runbook_url"] = runbook_url
    settings: dict[str, str] = {}
    if overrides.scrape_interval:
        settings["scrape_interval"] = settings["scrape_timeout"] = overrides.scrape_interval
    if overrides.evaluation_interval:
        settings["evaluation_interval"] = overrides.evaluation_interval
    try:
        config = plugin.prometheus_config(
            source_config, rules_dir=str(dest / "rules"), file_sd_dir=str(targets_dir),
            global_settings=settings,
            file_sd_settings=({"refresh_interval": overrides.refresh_interval}
                              if overrides.refresh_interval else None),
            scrape_config_overrides=(
                {states.RESERVATIONS_JOB: {"static_configs": [{"targets": [reservations]}]}}
                if reservations is not None else None),
            without_jobs=without, **services)
    except ValueError as e:
        raise LocalStackError(f"{source / 'prometheus.yml'}: {e}") from e
    done: set[str] = set()
    for name in source_config.get("rule_files", []):
        done |= render_rules(source / name, dest / "rules" / Path(name).name, overrides)
    unknown = (set(overrides.thresholds) | set(overrides.alert_for)) - done
    if unknown:
        raise LocalStackError(f"overrides for rules that do not exist: {sorted(unknown)}")
    path = dest / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def render_alertmanager_config(dest: Path, users: Mapping[str, Any] | None = None,
                               admins: Mapping[str, Any] | None = None,
                               timings: Mapping[str, str] | None = None,
                               source: Path = ALERTMANAGER_SOURCE) -> Path:
    """Writes alertmanager.yml to `dest` (a directory): the repository's base with the
    receivers `admins` and one per user of `users` (Unix user name -> {email, webhook_url}),
    rendered by the Ansible role's filter (ALERTMANAGER_CONFIG_PLUGIN), and `timings`
    (group_wait, group_interval, repeat_interval) for a short run; returns its path."""
    try:
        config = alertmanager_config_plugin().alertmanager_config(
            yaml.safe_load(source.read_text()), users, admins, timings=timings)
    except ValueError as e:
        raise LocalStackError(f"{source}: {e}") from e
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_targets(path: Path, groups: Sequence[Mapping[str, Any]]) -> None:
    """A file_sd targets file, replaced in one step so Prometheus never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump([dict(g) for g in groups], sort_keys=False))
    os.replace(tmp, path)


def scrape_with_basic_auth(config: Path, job: str, username: str, password_file: Path) -> None:
    """Gives the scrape config `job` of the rendered prometheus.yml `config` a basic_auth
    (`username`, the password in `password_file`), as the Ansible role's scrape overrides do
    for a service whose web config has basic_auth_users."""
    doc = yaml.safe_load(config.read_text())
    for scrape in doc.get("scrape_configs") or []:
        if scrape.get("job_name") == job:
            scrape["basic_auth"] = {"username": username, "password_file": str(password_file)}
            break
    else:
        raise LocalStackError(f"{config}: no scrape config {job!r} to give basic_auth")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))

# -- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """A child process that serves HTTP on 127.0.0.1: started, awaited, stopped."""

    def __init__(self, name: str, argv: Sequence[str], ready_url: str, log: Path,
                 env: Mapping[str, str] | None = None,
                 ready_headers: Mapping[str, str] | None = None,
                 ready_context: ssl.SSLContext | None = None) -> None:
        """`ready_headers` and `ready_context` (TLS) are for a ready_url behind basic auth
        or https."""
        self.name = name
        self.argv = list(argv)
        self.ready_url = ready_url
        self.ready_headers = dict(ready_headers or {})
        self.ready_context = ready_context
        self.log = log
        self.env = dict(env) if env is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env,
                                             preexec_fn=_stop_with_parent())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LocalStackError(f"{self.name} exited with {self._process.returncode}: "
                                      f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(
                        urllib.request.Request(self.ready_url, headers=self.ready_headers),
                        timeout=1, context=self.ready_context):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise LocalStackError(f"{self.name} did not answer {self.ready_url} within "
                              f"{timeout:g} s: {self.log_tail()}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        end_process(process, timeout)

    def kill(self) -> None:
        """Ends the process at once (SIGKILL), as a crash or the OOM killer would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stop_with_parent() -> Callable[[], None] | None:
    """On Linux, a child that gets SIGTERM when its parent dies, so a test runner or demo
    that is killed (and cannot stop its children) leaves no process behind."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_parent_death_signal


def exporter(scenario: str, port: int, log: Path, extra: Sequence[str] = ()) -> Service:
    """gpuwatch-exporter serving a simulated node."""
    return Service(f"gpuwatch-exporter --simulate {scenario} on port {port}",
                   [sys.executable, "-m", "gpuwatch.exporter", "--simulate", scenario,
                    "--web.listen-address", f"{LOCALHOST}:{port}", *extra],
                   f"http://{LOCALHOST}:{port}/metrics", log)


def reservations_endpoint(path: Path, port: int, log: Path) -> Service:
    """gpuwatch-exporter serving the bookings of the reservations file `path`, as on the
    monitoring host before `gpuwatch serve` (the deprecated mode, kept one release): the GPU
    collectors off, so it never touches NVML."""
    return Service(f"reservations endpoint on port {port}",
                   [sys.executable, "-m", "gpuwatch.exporter",
                    "--collector.disable-defaults",
                    "--reservations.file", str(path),
                    "--web.listen-address", f"{LOCALHOST}:{port}"],
                   f"http://{LOCALHOST}:{port}/metrics", log)


def reservations_service(path: Path, port: int, log: Path, prometheus: str,
                         web_config: Path | None = None,
                         admins: Sequence[str] = ()) -> Service:
    """`gpuwatch serve` on 127.0.0.1:`port`, as on the monitoring host: the bookings of the
    reservations file `path` and the claims, checked against the fleet in `prometheus`
    (a URL); who asks is a basic-auth user of `web_config` (none: read-only); `admins` are
    Unix user names. Ready once /-/healthy answers (open without credentials)."""
    argv = [sys.executable, "-m", "gpuwatch.cli", "serve", "--reservations.file", str(path),
            "--web.listen-address", f"{LOCALHOST}:{port}", "--prometheus", prometheus]
    if web_config is not None:
        argv += ["--web.config.file", str(web_config)]
    if admins:
        argv += ["--admins", ",".join(admins)]
    return Service(f"gpuwatch serve on port {port}", argv,
                   f"http://{LOCALHOST}:{port}/-/healthy", log)


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise LocalStackError("prometheus is not installed: run scripts/ensure-prometheus "
                              "(Debian's package)")
    return found


def prometheus(config: Path, data_dir: Path, port: int, log: Path,
               web_config: Path | None = None, ready_headers: Mapping[str, str] | None = None,
               ready_context: ssl.SSLContext | None = None) -> Service:
    """A Prometheus server with `config`, its data in `data_dir`; `web_config` is its
    --web.config.file (basic auth, TLS), and then `ready_headers` (an Authorization) and
    `ready_context` (https, trusting its CA) reach its /-/ready."""
    web = [f"--web.config.file={web_config}"] if web_config is not None else []
    scheme = "https" if ready_context is not None else "http"
    return Service(f"prometheus on port {port}",
                   [prometheus_binary(), f"--config.file={config}",
                    f"--storage.tsdb.path={data_dir}",
                    f"--web.listen-address={LOCALHOST}:{port}", "--log.level=warn", *web],
                   f"{scheme}://{LOCALHOST}:{port}/-/ready", log,
                   ready_headers=ready_headers, ready_context=ready_context)


ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
"""Debian's name for the server, then upstream's."""


def alertmanager_binary() -> str:
    for name in ALERTMANAGER_BINARIES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise LocalStackError("prometheus-alertmanager is not installed: run "
                          "scripts/ensure-alertmanager (Debian's package)")


def alertmanager(config: Path, data_dir: Path, port: int, log: Path) -> Service:
    """An Alertmanager with `config`, its silences and notification log in `data_dir`, alone
    (clustering off: no gossip port)."""
    url = f"http://{LOCALHOST}:{port}"
    return Service(f"alertmanager on port {port}",
                   [alertmanager_binary(), f"--config.file={config}",
                    f"--storage.path={data_dir}", f"--web.listen-address={LOCALHOST}:{port}",
                    f"--web.external-url={url}", "--cluster.listen-address=",
                    "--log.level=warn"],
                   f"{url}/-/ready", log)


def grafana_missing() -> str | None:
    """None when grafana/run-grafana finds a Grafana to start; otherwise what it says about
    getting one."""
    try:
        done = subprocess.run([str(RUN_GRAFANA), "--check"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LocalStackError(f"{RUN_GRAFANA} --check failed: {e}") from e
    if done.returncode == 0:
        return None
    if done.returncode == GRAFANA_MISSING:
        return done.stderr.strip()
    raise LocalStackError(f"{RUN_GRAFANA} --check exited with {done.returncode}: "
                          f"{done.stderr.strip()}")


def grafana(prometheus_url: str, state_dir: Path, port: int, log: Path,
            scrape_interval: str | None = None) -> Service:
    """Grafana with this checkout's provisioning and dashboards (grafana/run-grafana), its
    datasource at `prometheus_url` (which scrapes every `scrape_interval`; None: as the
    shipped prometheus.yml), its database in `state_dir`."""
    env = {**os.environ, "GPUWATCH_PROMETHEUS_URL": prometheus_url,
           "GPUWATCH_GRAFANA_STATE": str(state_dir), "GPUWATCH_GRAFANA_ADDR": LOCALHOST,
           "GPUWATCH_GRAFANA_PORT": str(port)}
    if scrape_interval:
        env["GPUWATCH_SCRAPE_INTERVAL"] = scrape_interval
    return Service(f"grafana on port {port}", [str(RUN_GRAFANA)],
                   f"http://{LOCALHOST}:{port}/api/health", log, env=env)
