"""prometheus/alertmanager/: amtool's checks of the base and of a rendered configuration, and
the routing tree tested for every alert of the rule files (their names and labels read from
the files): a user's alert reaches that user when the map has them and the admins when it
does not, the hardware's the admins, whatever user it names; the docs' table agrees with the
configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from paths import REPO

from tools import localstack

pytestmark = pytest.mark.apt

plugin = localstack.alertmanager_config_plugin()
BASE_FILE = localstack.ALERTMANAGER_SOURCE
BASE = yaml.safe_load(BASE_FILE.read_text())
DOCS = REPO / "docs" / "alerting.md"
AUDIENCES = ("user", "admins")
MAPPED, UNMAPPED = "alice", "bob"
USERS = {MAPPED: {"email": "alice@example.org", "webhook_url": "https://chat.example.org/a"},
         "j.doe": {"webhook_url": "http://127.0.0.1:8080/j.doe"}}
ADMINS = {"email": "gpu-admins@example.org", "webhook_url": "https://chat.example.org/admins"}
SMTP = {"smtp_smarthost": "mail.example.org:25", "smtp_from": "alertmanager@example.org"}


@pytest.fixture(scope="session")
def amtool() -> str:
    """The path of Alertmanager's amtool (`make test` installs it with
    scripts/ensure-alertmanager)."""
    found = shutil.which("amtool")
    if found is None:
        pytest.fail("amtool is not installed: `make test` installs it with "
                    "scripts/ensure-alertmanager (Debian's prometheus-alertmanager package)")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("alertmanager") / "alertmanager.yml"
    path.write_text(yaml.safe_dump(plugin.alertmanager_config(
        BASE, USERS, ADMINS, global_settings=SMTP), sort_keys=False))
    return path


def run(amtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([amtool, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def alerts() -> list[dict[str, Any]]:
    return [r for path in localstack.rule_files()
            for r in localstack.rules(localstack.load_rules(path)) if "alert" in r]


# -- amtool check-config ------------------------------------------------------------------------

def test_amtool_checks_the_base(amtool: str) -> None:
    result = run(amtool, "check-config", str(BASE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_amtool_checks_a_rendered_configuration(amtool: str, rendered: Path) -> None:
    result = run(amtool, "check-config", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    receivers = 1 + len(USERS)
    assert f" - {receivers} receivers" in result.stdout, result.stdout


def test_amtool_refuses_a_broken_configuration(amtool: str, tmp_path: Path) -> None:
    """The check above can fail: a route to a receiver that does not exist."""
    broken = plugin.alertmanager_config(BASE, {}, {})
    broken["route"]["routes"][0]["receiver"] = "nobody"
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(broken))
    assert run(amtool, "check-config", str(path)).returncode != 0


# -- the routing tree, for every alert ----------------------------------------------------------

def test_every_alert_has_one_audience() -> None:
    found = {a["alert"]: a.get("labels", {}).get("audience") for a in alerts()}
    assert {name for name, audience in found.items() if audience not in AUDIENCES} == set()
    assert {audience for audience in found.values()} == set(AUDIENCES)


def receiver_for(amtool: str, config: Path, labels: dict[str, str]) -> str:
    result = run(amtool, "config", "routes", "test", f"--config.file={config}",
                 *(f"{k}={v}" for k, v in labels.items()))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_each_alert_reaches_its_audience(amtool: str, rendered: Path,
                                         alert: dict[str, Any]) -> None:
    labels = {"alertname": alert["alert"], "host": "gpu-node-07", "gpu": "3",
              **{k: str(v) for k, v in alert.get("labels", {}).items()}}
    if labels["audience"] == "user":
        assert receiver_for(amtool, rendered, {**labels, "user": MAPPED}) == f"user-{MAPPED}"
        assert receiver_for(amtool, rendered, {**labels, "user": "j.doe"}) == "user-j.doe"
        assert receiver_for(amtool, rendered, {**labels, "user": UNMAPPED}) == plugin.ADMINS
        assert receiver_for(amtool, rendered, labels) == plugin.ADMINS, "no user label"
    else:
        assert receiver_for(amtool, rendered, {**labels, "user": MAPPED}) == plugin.ADMINS
        assert receiver_for(amtool, rendered, labels) == plugin.ADMINS


def test_an_alert_without_an_audience_still_reaches_the_admins(amtool: str,
                                                               rendered: Path) -> None:
    assert receiver_for(amtool, rendered, {"alertname": "NewRule", "user": MAPPED}) \
        == plugin.ADMINS


# -- inhibition --------------------------------------------------------------------------------

def test_the_inhibiting_alert_is_the_exporter_down_alert_of_the_rules() -> None:
    """The base names it by its alertname: renamed in the rules, it would inhibit nothing."""
    (rule,) = BASE["inhibit_rules"]
    (source,) = rule["source_matchers"]
    name = re.fullmatch(r'alertname="(\w+)"', source)
    assert name, source
    (alert,) = [a for a in alerts() if a["alert"] == name.group(1)]
    assert re.fullmatch(r'up\{job="gpuwatch"\} == 0', alert["expr"].strip())
    assert rule["equal"] == ["host"]
    assert rule["target_matchers"] == ['gpu=~".+"'], "every alert about a GPU of that host"


# -- the docs ----------------------------------------------------------------------------------

def effective_routes() -> dict[str, dict[str, Any]]:
    """The base's settings per audience, as each route inherits them from the top."""
    top = BASE["route"]
    settings = ("group_by", "group_wait", "group_interval", "repeat_interval")
    return {route["matchers"][0]: {**{k: top[k] for k in settings},
                                   **{k: route[k] for k in settings if k in route},
                                   "receiver": route["receiver"]}
            for route in top["routes"]}


def test_the_docs_table_agrees_with_the_base() -> None:
    """docs/alerting.md's table: one row per route (user with an entry, user without, admins)."""
    rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            for line in DOCS.read_text().splitlines()
            if line.startswith("| `audience=")]
    routes = effective_routes()
    assert len(rows) == 3, rows
    for audience, receiver, group_by, wait, interval, repeat in rows:
        matcher = audience.split("`")[0]
        route = routes[matcher]
        expected_receiver = route["receiver"] if "without" in audience or \
            matcher != plugin.USER_ROUTE_MATCHERS[0] else "user-NAME"
        assert (receiver, group_by, wait, interval, repeat) == (
            expected_receiver, ", ".join(route["group_by"]), route["group_wait"],
            route["group_interval"], route["repeat_interval"]), audience
