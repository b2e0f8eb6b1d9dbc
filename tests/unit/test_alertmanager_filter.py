"""The rendering of alertmanager.yml (the filter gpuwatch_alertmanager_config): the users'
routes and receivers, the admins' receiver, a short run's timings, and one-line refusals of
inventory entries that are not what they claim to be; the local stack renders with it and
points its Prometheus at its own Alertmanager, or at none."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuwatch.contract import states
from tools import localstack

plugin = localstack.alertmanager_config_plugin()
BASE = yaml.safe_load(localstack.ALERTMANAGER_SOURCE.read_text())
SMTP = {"smtp_smarthost": "mail.example.org:25", "smtp_from": "alertmanager@example.org"}


def render(users: Any = None, admins: Any = None, **kwargs: Any) -> dict[str, Any]:
    config: dict[str, Any] = plugin.alertmanager_config(BASE, users, admins, **kwargs)
    return config


def user_route(config: dict[str, Any]) -> dict[str, Any]:
    (route,) = [r for r in config["route"]["routes"]
                if r["matchers"] == plugin.USER_ROUTE_MATCHERS]
    return route


def receivers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in config["receivers"]}


def refused(match: str, users: Any = None, admins: Any = None, **kwargs: Any) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        render(users, admins, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, "one line"
    return message


# -- what it renders --------------------------------------------------------------------------

def test_each_user_gets_a_receiver_and_a_route_before_the_fallback_to_the_admins() -> None:
    config = render({"j.doe": {"webhook_url": "https://chat.example.org/hooks/1"},
                     "alice": {"email": "alice@example.org",
                               "webhook_url": "http://127.0.0.1:8080/alice"}},
                    {"email": "gpu-admins@example.org"}, global_settings=SMTP)
    route = user_route(config)
    assert route["receiver"] == plugin.ADMINS, "users without an entry: the admins"
    assert route["routes"] == [
        {"matchers": ['user="alice"', 'audience="user"'], "receiver": "user-alice"},
        {"matchers": ['user="j.doe"', 'audience="user"'], "receiver": "user-j.doe"}]
    got = receivers(config)
    assert got["user-alice"] == {
        "name": "user-alice",
        "email_configs": [{"to": "alice@example.org", "send_resolved": False}],
        "webhook_configs": [{"url": "http://127.0.0.1:8080/alice", "send_resolved": False}]}
    assert got["user-j.doe"]["webhook_configs"] == [
        {"url": "https://chat.example.org/hooks/1", "send_resolved": False}]
    assert got[plugin.ADMINS]["email_configs"] == [
        {"to": "gpu-admins@example.org", "send_resolved": True}]
    assert config["global"] == SMTP


def test_no_users_and_no_admins_leave_the_base_as_it_is() -> None:
    before = copy.deepcopy(BASE)
    config = render({}, {})
    assert receivers(config) == {plugin.ADMINS: {"name": plugin.ADMINS}}
    assert "routes" not in user_route(config)
    assert before == BASE, "the base is not changed"


def test_timings_replace_the_settings_where_the_base_sets_them() -> None:
    config = render(timings={"group_wait": "1s", "group_interval": "2s"})
    top = config["route"]
    assert (top["group_wait"], top["group_interval"]) == ("1s", "2s")
    assert top["repeat_interval"] == BASE["route"]["repeat_interval"]
    assert user_route(config)["repeat_interval"] == user_route(BASE)["repeat_interval"]
    assert all("group_wait" not in r for r in config["route"]["routes"]), \
        "routes that inherit keep inheriting"


def test_the_filter_is_named_for_ansible() -> None:
    filters = plugin.FilterModule().filters()
    assert filters == {"gpuwatch_alertmanager_config": plugin.alertmanager_config}


# -- what it refuses --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Alice Smith", "-rf", "1abc", ".hidden", 'a"b', "a\\b",
                                  'x",user=~".*', "x" * 33, "", "alice\n", "élodie", 42])
def test_a_name_that_is_not_a_unix_user_name_is_refused(name: Any) -> None:
    message = refused(r"^users: .* is not a Unix user name; use the name the person logs in "
                      r"with on the nodes", {name: {"email": "a@example.org"}},
                      global_settings=SMTP)
    assert repr(name) in message


@pytest.mark.parametrize("name", ["alice", "j.doe", "svc_ml", "Alice", "_build", "x" * 32])
def test_unix_user_names_are_taken(name: str) -> None:
    config = render({name: {"webhook_url": "https://example.org/hook"}})
    assert f"user-{name}" in receivers(config)


@pytest.mark.parametrize("email", ["alice", "alice@", "@example.org", "a b@example.org",
                                   "alice@example.org, eve@evil.example",
                                   "Alice <alice@example.org>", "alice@-bad-.org",
                                   "alice@example.org\nBcc: eve@evil.example", 7])
def test_an_email_that_is_not_one_is_refused(email: Any) -> None:
    refused(r"^users\.alice\.email: .* is not an e-mail address; give one plain address",
            {"alice": {"email": email}}, global_settings=SMTP)


@pytest.mark.parametrize("url", ["ftp://example.org/hook", "javascript:alert(1)",
                                 "file:///etc/passwd", "https://", "example.org/hook",
                                 "http://exa mple.org/", "https://example.org/\nX: y",
                                 "https://example.org/" + "a" * 2048, ["https://example.org"]])
def test_a_url_that_is_not_http_is_refused(url: Any) -> None:
    refused(r"^admins\.webhook_url: .* is not an http\(s\) URL; give the webhook's address",
            admins={"webhook_url": url})


def test_a_url_with_a_bad_port_is_refused() -> None:
    refused(r"^users\.bob\.webhook_url: .* has a bad port",
            {"bob": {"webhook_url": "https://example.org:http/hook"}})


def test_an_entry_must_be_a_mapping_with_known_keys_and_one_way_at_least() -> None:
    refused(r"^users\.bob: unknown key 'mail'; an entry takes email and/or webhook_url$",
            {"bob": {"mail": "bob@example.org"}})
    refused(r"^users\.bob: neither email nor webhook_url is set; give at least one$",
            {"bob": {}})
    refused(r"^users\.bob: not a mapping", {"bob": "bob@example.org"})
    refused(r"^users: not a mapping; give one entry per user", ["bob"])
    refused(r"^admins: not a mapping", admins="root@example.org")


def test_errors_name_the_inventory_variables() -> None:
    refused(r"^gpuwatch_alertmanager_users\.bob\.email: ",
            {"bob": {"email": "bob"}}, users_key="gpuwatch_alertmanager_users",
            global_settings=SMTP)


def test_email_needs_an_smtp_server() -> None:
    refused(r"^an e-mail address is given but no smtp_smarthost or smtp_from; set the SMTP "
            r"server and sender \(smtp_smarthost, smtp_from\) in gpuwatch_alertmanager_smtp$",
            {"bob": {"email": "bob@example.org"}}, global_key="gpuwatch_alertmanager_smtp")
    refused(r"but no smtp_from;", admins={"email": "root@example.org"},
            global_settings={"smtp_smarthost": "localhost:25"})


@pytest.mark.parametrize(("timings", "match"), [
    ({"group_wait": "soon"}, r"^timings\.group_wait: 'soon' is not a duration"),
    ({"group_wait": 5}, r"^timings\.group_wait: 5 is not a duration"),
    ({"resolve_timeout": "5m"}, r"^timings: unknown setting 'resolve_timeout'")])
def test_bad_timings_are_refused(timings: dict[str, Any], match: str) -> None:
    refused(match, timings=timings)


def test_a_base_without_the_routes_it_needs_is_refused() -> None:
    base = copy.deepcopy(BASE)
    base["route"]["routes"] = [r for r in base["route"]["routes"]
                               if r["matchers"] != plugin.USER_ROUTE_MATCHERS]
    with pytest.raises(ValueError, match=r"no route with matchers \['audience=\"user\"'\]"):
        plugin.alertmanager_config(base, {}, {})
    base = copy.deepcopy(BASE)
    base["receivers"] = []
    with pytest.raises(ValueError, match=r"no receiver 'admins'; restore it"):
        plugin.alertmanager_config(base, {}, {})
    base = copy.deepcopy(BASE)
    base["receivers"].append({"name": "user-bob"})
    with pytest.raises(ValueError, match=r"^users\.bob: the base already has a receiver"):
        plugin.alertmanager_config(base, {"bob": {"webhook_url": "https://example.org/"}}, {})


# -- the local stack renders with it ------------------------------------------------------------

def test_the_local_stack_renders_alertmanager_yml_with_the_filter(tmp_path: Path) -> None:
    path = localstack.render_alertmanager_config(
        tmp_path, users={"erin": {"webhook_url": "http://127.0.0.1:1/erin"}},
        timings={"group_wait": "1s"})
    assert yaml.safe_load(path.read_text()) == render(
        {"erin": {"webhook_url": "http://127.0.0.1:1/erin"}}, timings={"group_wait": "1s"})
    with pytest.raises(localstack.LocalStackError,
                       match=rf"^{re.escape(str(localstack.ALERTMANAGER_SOURCE))}: users: "
                             r"'no body' is not a Unix user name"):
        localstack.render_alertmanager_config(tmp_path, users={"no body": {}})


def jobs_and_alerting(config: Path) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    doc = yaml.safe_load(config.read_text())
    return ({j["job_name"]: j.get("static_configs") for j in doc["scrape_configs"]},
            [t for am in doc["alerting"]["alertmanagers"] for s in am["static_configs"]
             for t in s["targets"]], doc["global"].get("external_labels", {}))


def test_a_local_prometheus_without_alertmanager_sends_alerts_nowhere(tmp_path: Path) -> None:
    """Not to whatever listens on the usual port (an Alertmanager of this machine's)."""
    (tmp_path / "targets").mkdir()
    jobs, targets, _ = jobs_and_alerting(
        localstack.render_config(tmp_path / "prometheus", tmp_path / "targets"))
    assert targets == []
    plugin_jobs = localstack.prometheus_config_plugin()
    assert plugin_jobs.ALERTMANAGER_JOB not in jobs and plugin_jobs.PROMETHEUS_JOB not in jobs
    assert states.JOB in jobs


def test_a_local_prometheus_sends_alerts_to_its_alertmanager_and_scrapes_both(
        tmp_path: Path) -> None:
    (tmp_path / "targets").mkdir()
    jobs, targets, labels = jobs_and_alerting(localstack.render_config(
        tmp_path / "prometheus", tmp_path / "targets", alertmanager="127.0.0.1:19093",
        prometheus="127.0.0.1:19090", runbook_url="http://127.0.0.1:19840/runbook"))
    names = localstack.prometheus_config_plugin()
    assert targets == ["127.0.0.1:19093"]
    assert jobs[names.ALERTMANAGER_JOB] == [{"targets": ["127.0.0.1:19093"]}]
    assert jobs[names.PROMETHEUS_JOB] == [{"targets": ["127.0.0.1:19090"]}]
    assert labels[names.RUNBOOK_URL_LABEL] == "http://127.0.0.1:19840/runbook"
