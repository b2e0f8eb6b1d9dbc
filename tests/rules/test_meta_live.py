"""The meta-monitoring rules (prometheus/rules/meta.yml) against the real programs: Debian's
Prometheus and Alertmanager on 127.0.0.1, with this repository's configuration (rendered by
tools.localstack with short intervals), scraping themselves.

promtool's cases (prometheus/tests/meta_test.yml) prove the expressions on made-up series;
here the series are real: every metric the meta alerts read is in the programs' /metrics, a
targets file that cannot be read raises PrometheusTargetsFileUnreadable, and that alert's
runbook_url is the absolute address of prometheus.yml's external label, which promtool 2.42
cannot show (its test files have no external_labels)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql import metric_names

from tools import localstack

pytestmark = pytest.mark.apt

PROMETHEUS = localstack.SOURCE_DIR
META_RULES = PROMETHEUS / "rules" / "meta.yml"
TIMEOUT = 60.0
"""A bound on waiting for the programs, not a timing assertion."""
ALERT = "PrometheusTargetsFileUnreadable"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        body: bytes = answer.read()
        return body


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = localstack.free_port()
        self.alertmanager_port = localstack.free_port()
        self.url = f"http://{localstack.LOCALHOST}:{self.port}"
        self.alertmanager_url = f"http://{localstack.LOCALHOST}:{self.alertmanager_port}"

    def alerts(self) -> list[dict[str, Any]]:
        answer = json.loads(_get(f"{self.url}/api/v1/alerts"))
        alerts: list[dict[str, Any]] = answer["data"]["alerts"]
        return alerts


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("meta")
    stack = Stack(workdir)
    targets = workdir / "targets"
    targets.mkdir()
    # a targets file caught broken: not YAML
    (targets / "nodes.yml").write_text("- targets: [gpu-a01:9839\n")
    config = localstack.render_config(
        workdir / "prometheus", targets,
        localstack.Overrides(scrape_interval="1s", evaluation_interval="1s",
                             refresh_interval="1s", alert_for={ALERT: "2s"}),
        alertmanager=f"{localstack.LOCALHOST}:{stack.alertmanager_port}",
        prometheus=f"{localstack.LOCALHOST}:{stack.port}")
    alertmanager = localstack.alertmanager(
        localstack.render_alertmanager_config(workdir / "alertmanager"),
        workdir / "alertmanager-data", stack.alertmanager_port, workdir / "alertmanager.log")
    prometheus = localstack.prometheus(config, workdir / "data", stack.port,
                                       workdir / "prometheus.log")
    with alertmanager, prometheus:
        yield stack


def _wait(what: str, check: Any) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {TIMEOUT:g} s")
        time.sleep(0.2)


def _meta_metric_names() -> set[str]:
    names: set[str] = set()
    for rule in localstack.rules(localstack.load_rules(META_RULES)):
        names |= metric_names(rule["expr"])
    return names - {"up"}


def test_every_metric_the_meta_alerts_read_is_served(stack: Stack) -> None:
    """Each prometheus_* name in Prometheus' own /metrics, each alertmanager_* one in
    Alertmanager's (a renamed metric in a later release would leave its alert silent)."""
    wanted = _meta_metric_names()
    assert {n.split("_", 1)[0] for n in wanted} == {"prometheus", "alertmanager"}

    def served() -> set[str]:
        lines = (_get(f"{stack.url}/metrics") + _get(f"{stack.alertmanager_url}/metrics"))
        return {line.split("{", 1)[0].split(" ", 1)[0]
                for line in lines.decode().splitlines() if line and not line.startswith("#")}

    # prometheus_notifications_errors_total appears once the Alertmanager is discovered
    _wait("series of every metric the meta alerts read", lambda: wanted <= served())


def test_the_self_scrape_jobs_reach_both_programs(stack: Stack) -> None:
    def up() -> dict[str, float] | None:
        answer = json.loads(_get(f"{stack.url}/api/v1/query?query=up"))
        jobs = {s["metric"]["job"]: float(s["value"][1]) for s in answer["data"]["result"]}
        return jobs if {"prometheus", "alertmanager"} <= set(jobs) else None

    found = _wait("scrapes of prometheus and alertmanager", up)
    assert found["prometheus"] == 1 and found["alertmanager"] == 1


def test_an_unreadable_targets_file_fires_with_an_absolute_runbook_url(stack: Stack) -> None:
    firing = _wait(f"{ALERT} firing", lambda: [
        a for a in stack.alerts()
        if a["labels"]["alertname"] == ALERT and a["state"] == "firing"])
    (alert,) = firing
    assert alert["labels"]["audience"] == "admins"
    assert alert["labels"]["host"] == localstack.LOCALHOST
    base = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())[
        "global"]["external_labels"]["runbook_url"]
    assert base.startswith("http")
    assert alert["annotations"]["runbook_url"] == f"{base}#{ALERT.lower()}"
    assert "cannot read a targets file" in alert["annotations"]["summary"]
