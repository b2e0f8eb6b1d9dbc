"""make demo: a simulated fleet, a real Prometheus with this repository's configuration, its
Alertmanager, and the grid, on 127.0.0.1 until Ctrl-C.

Four nodes run gpuwatch-exporter over simulated GPUs (the workstation, server, lost-gpu and
mig scenarios: the last one's GPUs are split in MIG slices, each a cell of the grid);
`gpuwatch serve` serves the bookings of a reservations file and the claims of `gpuwatch
run`, as on a monitoring host, with two basic-auth users of its web config: you (your Unix
user name, an admin) and prometheus, which Prometheus scrapes it as; Prometheus runs
prometheus/prometheus.yml and its rules with shorter intervals and a one-minute idle
duration, so the grid changes while you watch, and every alert fires ALERT_FOR after its
condition holds instead of its production `for`; Alertmanager runs
prometheus/alertmanager/alertmanager.yml without receivers, so the firing alerts show in its
web UI (the demo prints its address and the lab page's, the `/` of `gpuwatch serve`, whose
runbook the alerts link to); Grafana runs grafana/provisioning and the dashboards when it is
installed (the demo says how to get it when it is not). The grid is printed again whenever a
GPU changes state, hands, booking or claim; the demo prints the settings that reach the
service (GPUWATCH_SERVER, GPUWATCH_USER, GPUWATCH_PASSWORD), the `gpuwatch reserve` command
that books a GPU through it and the `gpuwatch run` commands that claim a GPU and a MIG
slice. A node added to its targets file shows in the grid like any other. Everything is
stopped on Ctrl-C.

Each start begins afresh: the working directory is emptied, so the bookings made in a demo
(its reservations file is in there) are gone when it starts again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import getpass
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Hashable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

import bcrypt
import yaml

from gpuwatch import cli, reservations
from gpuwatch.cells import Cell
from gpuwatch.contract import states
from gpuwatch.contract.ports import ALERTMANAGER_PORT
from gpuwatch.contract.thresholds import IDLE_DURATION
from gpuwatch.fleet import GpuStatus, read_fleet
from gpuwatch.fleet.prometheus import Prometheus, PrometheusError
from tools import localstack

PROG = "gpuwatch-demo"
NODES = (("ws-01", "workstation"), ("gpu-srv-01", "server"), ("gpu-node-07", "lost-gpu"),
         ("gpu-mig-01", "mig"))
# Rules every second: a booking shows in the grid within a scrape (5 s) of being made.
OVERRIDES = localstack.Overrides(
    scrape_interval="5s", evaluation_interval="1s", refresh_interval="5s",
    thresholds={IDLE_DURATION: 60})
ALERT_FOR = "20s"
"""Every alert's `for` in the demo: the lost GPU, the Xid and the idle-held GPU show in
Alertmanager within a minute or two rather than after the production hour."""
BOOKED = ("gpu-srv-01", (Cell(7),), "frank", "thesis experiments")
"""A booking the demo starts with (host, GPUs, user, comment), for three days."""
TRY = ("gpu-srv-01:4", "+2h", "trying the demo")
"""What the printed `gpuwatch reserve` command books: a free GPU of the server scenario."""
RUN_HOST = "gpu-srv-01"
"""The host the printed `gpuwatch run` claims a GPU of: the demo's nodes are simulated, so
the command names one (`--host`) rather than this machine."""
RUN_COMMAND = "sh -c 'echo $CUDA_VISIBLE_DEVICES'"
"""What the printed `gpuwatch run` runs on the claimed GPU: it prints the GPU's UUID."""
MIG_RUN = ("gpu-mig-01", "1g.10gb")
"""The host and the profile of the printed `gpuwatch run` on a MIG slice (scenario mig): it
prints the slice's MIG UUID."""
SCRAPER = "prometheus"
"""The basic-auth user Prometheus scrapes `gpuwatch serve` as."""
READY_TIMEOUT = 60.0
GRAFANA_PORT = 3000
"""Grafana's usual port, or another free one when it is taken."""
GRAFANA_START_TIMEOUT = 120.0
"""A first start creates Grafana's database, which takes a while."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__
                                else None)
    p.add_argument("--dir", type=Path, default=Path(".demo"),
                   help="working directory for configuration, data and logs; emptied first "
                   "(default %(default)s)")
    p.add_argument("--port", type=int, default=9090,
                   help="Prometheus' port on 127.0.0.1, another free one when taken "
                   "(default %(default)s)")
    return p


def _port(wanted: int) -> int:
    """`wanted` when a server can listen there, else a free port.

    The probe binds as Prometheus's and Grafana's Go listeners do, with SO_REUSEADDR: the
    connections of a demo just stopped linger in TIME_WAIT on its ports, which keep a plain
    bind out but not those servers, so a quick restart gets the usual ports again.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((localstack.LOCALHOST, wanted))
        except OSError:
            return localstack.free_port()
    return wanted


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        localstack.prometheus_binary()
        localstack.alertmanager_binary()
    except localstack.LocalStackError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    workdir: Path = args.dir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "targets").mkdir(parents=True)
    # SIGTERM ends the demo like Ctrl-C, so the ExitStack stops every process it started;
    # SIGINT explicitly too: a shell starting the demo in the background ignores it for us
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    with ExitStack() as stack:
        try:
            url = _start(stack, workdir, _port(args.port))
            return _watch(url)
        except KeyboardInterrupt:
            print("\nstopping...", file=sys.stderr)
            return 0
        except (localstack.LocalStackError, PrometheusError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        finally:
            stack.close()
            print(f"stopped everything; logs in {workdir}", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _command() -> str:
    """How to run gpuwatch from here: the venv's, when the demo runs from one."""
    beside = Path(sys.executable).parent / "gpuwatch"
    if not beside.exists():
        return "gpuwatch"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def _start(stack: ExitStack, workdir: Path, port: int) -> str:
    groups = []
    for host, scenario in NODES:
        exporter_port = localstack.free_port()
        service = localstack.exporter(scenario, exporter_port,
                                      workdir / f"exporter-{host}.log")
        stack.callback(service.stop)
        service.start()
        groups.append({"targets": [f"{localstack.LOCALHOST}:{exporter_port}"],
                       "labels": {"host": host}})
        print(f"exporter  {host:<12} ({scenario}): {service.ready_url}")
    localstack.write_targets(workdir / "targets" / "nodes.yml", groups)
    booking_file = workdir / "reservations.yml"
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    host, gpus, user, comment = BOOKED
    reservations.add(booking_file, reservations.Reservation(
        host=host, gpus=gpus, user=user, start=now, until=now + dt.timedelta(days=3),
        comment=comment), now)
    url = f"http://{localstack.LOCALHOST}:{port}"
    me = getpass.getuser()
    password_file, scraper_password_file = _web_users(workdir, me)
    service_port = localstack.free_port()
    service = localstack.reservations_service(
        booking_file, service_port, workdir / "serve.log", url,
        web_config=workdir / "web-config.yml", admins=(me,))
    stack.callback(service.stop)
    service.start()
    server = f"http://{localstack.LOCALHOST}:{service_port}"
    print(f"gpuwatch serve: {server} (bookings in {booking_file}, a new file each start: "
          f"bookings reset when the demo restarts; users {me} (admin) and {SCRAPER} in "
          f"{workdir / 'web-config.yml'}; log: {workdir / 'serve.log'})")
    print(f"lab page: {server}/ (the grid in a browser, booking included)")
    alertmanager_url = _start_alertmanager(stack, workdir)
    config = localstack.render_config(
        workdir / "prometheus", workdir / "targets", _overrides(),
        reservations=f"{localstack.LOCALHOST}:{service_port}",
        alertmanager=alertmanager_url.removeprefix("http://"),
        prometheus=f"{localstack.LOCALHOST}:{port}", runbook_url=f"{server}/runbook")
    localstack.scrape_with_basic_auth(config, states.RESERVATIONS_JOB, SCRAPER,
                                      scraper_password_file)
    prometheus = localstack.prometheus(config, workdir / "data", port,
                                       workdir / "prometheus.log")
    stack.callback(prometheus.stop)
    prometheus.start()
    print(f"prometheus: {url} (targets: {workdir / 'targets' / 'nodes.yml'}, add a node "
          f"there; rules and configuration generated from prometheus/ in "
          f"{workdir / 'prometheus'})")
    _start_grafana(stack, workdir, url)
    print(f"demo settings: scrape every {OVERRIDES.scrape_interval}, rules every "
          f"{OVERRIDES.evaluation_interval}, idle after "
          f"{OVERRIDES.thresholds[IDLE_DURATION]:g} s, alerts fire {ALERT_FOR} after their "
          f"condition holds")
    gpuwatch = _command()
    target, until, comment = TRY
    password = shlex.quote(str(password_file))
    print(f"in another terminal: export GPUWATCH_PROMETHEUS={url} GPUWATCH_SERVER={server} "
          f"GPUWATCH_USER={shlex.quote(me)} GPUWATCH_PASSWORD=\"$(cat {password})\"")
    print(f"see the grid: {gpuwatch} status")
    print(f"book a GPU: {gpuwatch} reserve {target} --until {until} "
          f"--comment {shlex.quote(comment)}")
    print(f"give it back: {gpuwatch} release {target}")
    print(f"run on a free GPU: {gpuwatch} run -n 1 --host {RUN_HOST} -- {RUN_COMMAND}")
    mig_host, profile = MIG_RUN
    print(f"run on a free MIG slice: {gpuwatch} run -n 1 --host {mig_host} --model {profile} "
          f"-- {RUN_COMMAND}")
    print("Ctrl-C stops everything.\n", flush=True)
    return url


def _overrides() -> localstack.Overrides:
    """OVERRIDES with every alert of the rule files firing ALERT_FOR after its condition."""
    names = [rule["alert"] for path in localstack.rule_files()
             for rule in localstack.rules(localstack.load_rules(path)) if "alert" in rule]
    return dataclasses.replace(OVERRIDES, alert_for={name: ALERT_FOR for name in names})


def _start_alertmanager(stack: ExitStack, workdir: Path) -> str:
    """Alertmanager with the repository's alertmanager.yml and no receivers (the alerts show
    in its UI); its URL."""
    port = _port(ALERTMANAGER_PORT)
    config = localstack.render_alertmanager_config(workdir / "alertmanager")
    service = localstack.alertmanager(config, workdir / "alertmanager-data", port,
                                      workdir / "alertmanager.log")
    stack.callback(service.stop)
    service.start()
    url = f"http://{localstack.LOCALHOST}:{port}"
    print(f"alertmanager: {url} (the firing alerts, routed by "
          f"prometheus/alertmanager/alertmanager.yml; no receivers in the demo: nothing is "
          f"sent; log: {workdir / 'alertmanager.log'})")
    return url


def _web_users(workdir: Path, me: str) -> tuple[Path, Path]:
    """The web config of the demo's `gpuwatch serve`: `me` and the scraper as basic-auth
    users with passwords of their own (bcrypt in the config, the passwords in files only
    the demo's user reads); returns the two password files (`me`'s, the scraper's)."""
    users: dict[str, str] = {}
    files: list[Path] = []
    for user, name in ((me, "password"), (SCRAPER, "prometheus-password")):
        password = secrets.token_urlsafe(16)
        users[user] = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
        path = workdir / name
        path.touch(mode=0o600)
        path.write_text(password)
        files.append(path)
    (workdir / "web-config.yml").write_text(yaml.safe_dump({"basic_auth_users": users}))
    return files[0], files[1]


def _start_grafana(stack: ExitStack, workdir: Path, prometheus_url: str) -> None:
    """Grafana beside the demo's Prometheus when one is installed; the demo goes on without
    it otherwise, after saying how to get one."""
    try:
        missing = localstack.grafana_missing()
    except localstack.LocalStackError as e:
        print(f"grafana: not started: {e}")
        return
    if missing is not None:
        print("grafana: not installed, so the demo runs without it.\n"
              + "\n".join(f"  {line}" for line in missing.splitlines()))
        return
    port = _port(GRAFANA_PORT)
    service = localstack.grafana(prometheus_url, workdir / "grafana", port,
                                 workdir / "grafana.log", OVERRIDES.scrape_interval)
    stack.callback(service.stop)
    try:
        service.start(timeout=GRAFANA_START_TIMEOUT)
    except localstack.LocalStackError as e:
        print(f"grafana: did not start, the demo goes on without it: {e}")
        return
    print(f"grafana:  http://{localstack.LOCALHOST}:{port}/d/gpuwatch-fleet (the availability "
          f"grid; anonymous viewing, admin/admin to edit; log: {workdir / 'grafana.log'})")


class Watch:
    """When the demo prints the grid: once Prometheus shows every node the demo started, then
    whenever what the grid shows changes. Nodes the user adds to the targets file, or removes
    from it, are changes like any other, never the end of the demo."""

    def __init__(self, url: str, deadline: float) -> None:
        self.url = url
        self.deadline = deadline
        self.started = False
        self.shown: list[Hashable] | None = None

    def should_show(self, fleet: Sequence[GpuStatus], now: float) -> bool:
        """Whether `fleet` is a grid to print; PrometheusError when the demo's own nodes did
        not all show by the deadline."""
        hosts = {g.host for g in fleet}
        if not self.started:
            if not {host for host, _ in NODES} <= hosts:
                if now > self.deadline:
                    raise PrometheusError(
                        f"Prometheus at {self.url} shows {sorted(hosts) or 'no hosts'} after "
                        f"{READY_TIMEOUT:g} s; see the logs")
                return False
            self.started = True
        view: list[Hashable] = [(g.host, g.cell, g.state, g.users, g.reservation, g.claim)
                                for g in fleet]
        if view == self.shown:
            return False
        self.shown = view
        return True


def _watch(url: str) -> int:
    prometheus = Prometheus(url)
    watch = Watch(url, time.monotonic() + READY_TIMEOUT)
    while True:
        if watch.should_show(read_fleet(prometheus, processes=False), time.monotonic()):
            print(time.strftime("%H:%M:%S"), flush=True)
            cli.main(["--prometheus", url, "status"])
            print(flush=True)
        time.sleep(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
