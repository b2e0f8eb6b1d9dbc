"""End to end, alerts delivered: simulated exporters, Prometheus with the repository's
configuration and rules (tests/prom_harness.py, short intervals and `for`s) and a real
Alertmanager (Debian's prometheus-alertmanager) with the repository's alertmanager.yml,
rendered by the Ansible role's filter with webhook receivers that this test serves on
127.0.0.1 (one path per receiver) and a group_wait and group_interval of seconds.

What reaches whom: the idle-held GPU's alert reaches its holder, once, with an absolute runbook
link; a lost GPU reaches the admins; a broken targets file raises its alert at the admins
while Prometheus keeps the old targets; a stopped exporter's GPU alerts are held back (a
booking ending on that node reaches nobody, while the same booking on a live node reaches its
user).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpfake
import pytest
import yaml
from prom_harness import Fleet, Node

from gpuwatch import reservations
from gpuwatch.contract import states
from gpuwatch.contract.thresholds import IDLE_DURATION, RESERVATION_ENDING
from gpuwatch.sim import load_scenario
from tools import localstack

T = TypeVar("T")

NODES = (Node("gpu-srv-01", "server"), Node("gpu-node-07", "lost-gpu"),
         Node("doomed", "workstation"))
"""The server has a GPU held idle, lost-gpu a lost GPU; "doomed" is there to be stopped."""
BOOKER = "grace"
"""Books GPUs in the inhibition test; no process of hers runs anywhere."""
USERS = sorted({p.user for n in NODES for g in load_scenario(n.scenario).gpus
                for p in g.processes} | {BOOKER})
"""Every user of the scenarios has a receiver (a webhook path of this test)."""
GROUP_INTERVAL = 2.0
TIMINGS = {"group_wait": "1s", "group_interval": f"{GROUP_INTERVAL:g}s"}
ALERT_FOR = {"GpuHeldIdle": "2s", "GpuLost": "2s", "GpuExporterDown": "1s",
             "GpuReservationEndingSoon": "1s", "PrometheusTargetsFileUnreadable": "1s"}
DEADLINE = 60.0
"""A bound on how long a message may take (a bound, not a timing assertion)."""


class Webhooks:
    """An HTTP server on 127.0.0.1 that keeps every message Alertmanager posts, by path."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        received = self

        class Handler(httpfake.QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with received._lock:
                    received.messages.append((self.path, json.loads(body)))
                self.reply(200, b"")

        self.url, self._stop = httpfake.start(Handler)

    def __enter__(self) -> Webhooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def alerts(self, path: str | None = None) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """(path, message, alert) of every firing alert received (at `path`)."""
        with self._lock:
            messages = list(self.messages)
        return [(p, m, a) for p, m in messages if path in (None, p)
                for a in m["alerts"] if a["status"] == "firing"]


@pytest.fixture(scope="module")
def webhooks() -> Iterator[Webhooks]:
    with Webhooks() as hooks:
        yield hooks


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory,
                 webhooks: Webhooks) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("alertmanager")
    config = localstack.render_alertmanager_config(
        workdir, users={u: {"webhook_url": f"{webhooks.url}/user/{u}"} for u in USERS},
        admins={"webhook_url": f"{webhooks.url}/admins"}, timings=TIMINGS)
    port = localstack.free_port()
    with localstack.alertmanager(config, workdir / "data", port, workdir / "alertmanager.log"):
        yield f"{localstack.LOCALHOST}:{port}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, alertmanager: str) -> Iterator[Fleet]:
    with Fleet(tmp_path_factory.mktemp("fleet"), NODES, thresholds={IDLE_DURATION: 3},
               alert_for=ALERT_FOR, alertmanager=alertmanager) as f:
        yield f


def wait_for(what: str, probe: Callable[[], T], ok: Callable[[T], bool]) -> T:
    deadline = time.monotonic() + DEADLINE
    while True:
        value = probe()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE:g} s; {value!r}"
        time.sleep(0.25)


def named(found: list[tuple[str, dict[str, Any], dict[str, Any]]], alertname: str,
          **labels: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(p, m, a) for p, m, a in found if a["labels"]["alertname"] == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def runbook_base(fleet: Fleet) -> str:
    """The external label the rendered prometheus.yml gives every alert's runbook link."""
    config = yaml.safe_load((fleet.workdir / "prometheus" / "prometheus.yml").read_text())
    base: str = config["global"]["external_labels"]["runbook_url"]
    return base


def alertmanager_alerts(alertmanager: str, alertname: str) -> list[dict[str, Any]]:
    """Alertmanager's own view of the alerts of that name (active, suppressed or not yet
    processed)."""
    query = urllib.parse.urlencode({"filter": f'alertname="{alertname}"'})
    with urllib.request.urlopen(f"http://{alertmanager}/api/v2/alerts?{query}",
                                timeout=10) as answer:
        found: list[dict[str, Any]] = json.load(answer)
    return found


# -- a user's alert reaches that user --------------------------------------------------------

def test_the_idle_held_gpu_reaches_its_holder_once(fleet: Fleet, webhooks: Webhooks) -> None:
    fleet.wait_for_rules()
    idle = {(gpu.host, str(gpu.gpu), user) for gpu in fleet.expected().values()
            if gpu.state == states.IDLE.name for user in gpu.users}
    assert idle, "the server scenario has a GPU held but idle"

    def received() -> set[tuple[str, str, str]]:
        return {(a["labels"]["host"], a["labels"]["gpu"], a["labels"]["user"])
                for p, _, a in named(webhooks.alerts(), "GpuHeldIdle")
                if p == f"/user/{a['labels'].get('user')}"}

    wait_for("GpuHeldIdle at each holder's receiver", received, lambda got: idle <= got)
    first = time.monotonic()
    for host, gpu, user in sorted(idle):
        (path, message, alert), *_ = named(webhooks.alerts(), "GpuHeldIdle", host=host, gpu=gpu,
                                           user=user)
        assert (path, message["receiver"]) == (f"/user/{user}", f"user-{user}")
        link = urllib.parse.urlsplit(alert["annotations"]["runbook_url"])
        assert link.scheme in ("http", "https") and link.netloc, link
        assert alert["annotations"]["runbook_url"] == f"{runbook_base(fleet)}#gpuheldidle"
        assert user in alert["annotations"]["summary"]
    # long enough for Alertmanager to have sent it again, were it to repeat per group_interval
    time.sleep(max(0.0, first + 3 * GROUP_INTERVAL - time.monotonic()))
    for host, gpu, user in sorted(idle):
        messages = named(webhooks.alerts(), "GpuHeldIdle", host=host, gpu=gpu, user=user)
        assert len(messages) == 1, messages
        assert [p for p, _, _ in messages] == [f"/user/{user}"], "to the holder only"


# -- the hardware reaches the admins ---------------------------------------------------------

def test_a_lost_gpu_reaches_the_admins(fleet: Fleet, webhooks: Webhooks) -> None:
    fleet.wait_for_rules()
    lost = {(gpu.host, str(gpu.gpu)) for gpu in fleet.expected().values()
            if gpu.state == states.DOWN.name and not fleet.node(gpu.host).stopped}
    assert lost, "the lost-gpu scenario has a lost GPU"
    wait_for("GpuLost at the admins",
             lambda: {(a["labels"]["host"], a["labels"]["gpu"])
                      for _, _, a in named(webhooks.alerts("/admins"), "GpuLost")},
             lambda got: lost <= got)
    found = named(webhooks.alerts(), "GpuLost")
    assert {(p, m["receiver"]) for p, m, _ in found} == {("/admins", "admins")}
    assert {h for h, _ in lost} == {m["groupLabels"]["host"] for _, m, _ in found}, \
        "grouped per node"


def test_a_broken_targets_file_raises_its_alert(fleet: Fleet, webhooks: Webhooks) -> None:
    fleet.wait_for_rules()
    targets = fleet.targets / "nodes.yml"
    try:
        garbage = targets.with_name(".garbage")
        garbage.write_text("- targets: [127.0.0.1:1\n  labels: {host: \x00\n")
        os.replace(garbage, targets)  # in one step: Prometheus never reads an empty file
        wait_for("PrometheusTargetsFileUnreadable at the admins",
                 lambda: named(webhooks.alerts("/admins"), "PrometheusTargetsFileUnreadable"),
                 bool)
        # and Prometheus goes on with the targets it had
        live = sum(not n.stopped for n in fleet.nodes)
        assert fleet.api.query_value(f'count(up{{job="{states.JOB}"}} == 1)') == live
    finally:
        fleet.write_targets()


# -- a node that does not answer --------------------------------------------------------------

def test_a_stopped_exporters_gpu_alerts_are_held_back(fleet: Fleet, webhooks: Webhooks,
                                                      alertmanager: str) -> None:
    fleet.wait_for_rules()
    free = sorted(gpu.gpu for gpu in fleet.expected().values()
                  if gpu.host == "gpu-srv-01" and gpu.state == states.FREE.name)
    assert free
    fleet.node("doomed").stop()
    wait_for("GpuExporterDown of doomed at the admins",
             lambda: named(webhooks.alerts("/admins"), "GpuExporterDown", host="doomed"), bool)
    # the same booking, ending soon, on the stopped node and on a live one
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    until = now + dt.timedelta(seconds=fleet.thresholds()[RESERVATION_ENDING] / 2)
    for host, gpu in (("doomed", 0), ("gpu-srv-01", free[0])):
        reservations.add(fleet.reservations_file, reservations.Reservation(
            host=host, gpus=(gpu,), user=BOOKER, until=until, comment="ending soon"), now)
    wait_for("the live node's booking at its user",
             lambda: named(webhooks.alerts(f"/user/{BOOKER}"), "GpuReservationEndingSoon",
                           host="gpu-srv-01"), bool)
    held = wait_for(
        "the stopped node's booking alert suppressed by GpuExporterDown",
        lambda: [a for a in alertmanager_alerts(alertmanager, "GpuReservationEndingSoon")
                 if a["labels"]["host"] == "doomed"],
        lambda found: len(found) == 1 and found[0]["status"]["state"] == "suppressed")
    (exporter_down,) = [a for a in alertmanager_alerts(alertmanager, "GpuExporterDown")
                        if a["labels"]["host"] == "doomed"]
    assert held[0]["status"]["inhibitedBy"] == [exporter_down["fingerprint"]]
    time.sleep(2 * GROUP_INTERVAL)
    assert named(webhooks.alerts(), "GpuReservationEndingSoon", host="doomed") == []
