"""prometheus/: promtool's checks and rule tests, and the rules against the metric contract,
the states, the thresholds, the docs and the runbook."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from paths import REPO as ROOT
from promql import metric_names

from gpuwatch.contract import metrics, ports, states
from gpuwatch.contract.prometheus import SCRAPE_SERIES
from gpuwatch.contract.thresholds import IDLE_DURATION
from gpuwatch.exporter import main as exporter_main
from gpuwatch.serve import runbook
from tools import localstack

PROMETHEUS = ROOT / "prometheus"
RULE_FILES = localstack.rule_files(PROMETHEUS)
PROMTOOL_TESTS = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
DOCS = (ROOT / "docs" / "prometheus.md").read_text()
RUNBOOK = ROOT / "docs" / "runbook.md"
SEVERITIES = {"critical", "warning", "info"}
AUDIENCES = {"user", "admins"}
"""Who an alert is for (the contract with prometheus/alertmanager/, which routes by it): a
person named in its user label, or the admins."""
RUNBOOK_URL = "{{ $externalLabels.runbook_url }}#"
"""How every runbook_url starts: the one address of the runbook, prometheus.yml's external
label, then the section's anchor."""
SELF_JOBS = ("prometheus", "alertmanager")
"""The self-scrape jobs of prometheus.yml (meta-monitoring), named by the alerts contract."""
META_RULES = PROMETHEUS / "rules" / "meta.yml"


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def all_rules() -> list[dict[str, Any]]:
    return [r for path in RULE_FILES for r in localstack.rules(localstack.load_rules(path))]


def records() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


def alerts() -> list[dict[str, Any]]:
    return [r for r in all_rules() if "alert" in r]


def rule(name: str) -> dict[str, Any]:
    return next(r for r in all_rules() if name in (r.get("record"), r.get("alert")))


# -- promtool ---------------------------------------------------------------------------------

def test_promtool_check_config(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(promtool: str, path: Path) -> None:
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_file_is_loaded() -> None:
    assert sorted(RULE_FILES) == sorted((PROMETHEUS / "rules").glob("*.yml"))


@pytest.mark.parametrize("path", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(promtool: str, path: Path) -> None:
    result = run(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the promtool cases cover every rule --------------------------------------------------------

def _promtool_cases() -> list[dict[str, Any]]:
    return [t for path in PROMTOOL_TESTS for t in yaml.safe_load(path.read_text())["tests"]]


def test_every_recording_rule_has_a_promtool_case() -> None:
    exprs = " ".join(case["expr"] for t in _promtool_cases()
                     for case in t.get("promql_expr_test", []))
    untested = sorted(r for r in records() if not re.search(rf"{re.escape(r)}(?![\w:])", exprs))
    assert not untested, f"recording rules without a promql_expr_test: {untested}"


@pytest.mark.parametrize("alert", [a["alert"] for a in alerts()])
def test_every_alert_has_a_firing_and_an_earlier_silent_case(alert: str) -> None:
    cases = [(t, c) for t in _promtool_cases() for c in t.get("alert_rule_test", [])
             if c["alertname"] == alert]
    firing = [(t, c) for t, c in cases if c.get("exp_alerts")]
    assert firing, f"{alert}: no case where it fires"
    for test, case in firing:
        fires_at = _duration(case["eval_time"])
        before = [c for t, c in cases if t is test and not c.get("exp_alerts")
                  and _duration(c["eval_time"]) == fires_at - _duration(
                      test.get("interval", "1m"))]
        assert before, (f"{alert} ({test['name']}): no silent case one evaluation before it "
                        f"fires at {case['eval_time']}")


def _duration(text: str) -> int:
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(int(n) * seconds[u] for n, u in parts)


# -- alerts -------------------------------------------------------------------------------------

def _runbook_anchors() -> set[str]:
    """GitHub's anchors for the headings of the runbook."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_has_for_severity_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    name = alert["alert"]
    assert _duration(alert.get("for", "")) > 0, f"{name}: no for"
    assert alert.get("labels", {}).get("severity") in SEVERITIES, name
    annotations = alert.get("annotations", {})
    for key in ("summary", "description"):
        assert annotations.get(key, "").strip(), f"{name}: no {key}"
    url = annotations.get("runbook_url", "")
    assert url.startswith(RUNBOOK_URL), f"{name}: runbook_url {url} is not under {RUNBOOK_URL}"
    anchor = url.removeprefix(RUNBOOK_URL)
    assert anchor == name.lower(), f"{name}: the runbook section is {name}"
    assert anchor in _runbook_anchors(), f"{name}: docs/runbook.md has no section #{anchor}"


def _served_anchors() -> set[str]:
    return set(re.findall(r'<h[1-6] id="([^"]+)"', runbook.page()[0].decode()))


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_runbook_url_is_a_section_of_the_served_runbook(alert: dict[str, Any]) -> None:
    """The page gpuwatch serve answers at /runbook has the section the alert links to, under
    the anchor GitHub gives it too."""
    anchor = alert["annotations"]["runbook_url"].removeprefix(RUNBOOK_URL)
    assert anchor in _served_anchors(), f"{alert['alert']}: /runbook has no #{anchor}"
    assert anchor == runbook.anchor(alert["alert"])


def test_the_runbook_url_is_one_setting_of_prometheus_yml() -> None:
    """An absolute URL, by default the runbook gpuwatch serve serves on its default port."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    url = config["global"]["external_labels"]["runbook_url"]
    assert url == f"http://localhost:{ports.RESERVATIONS_PORT}/runbook"
    assert exporter_main.RESERVATIONS_LISTEN_ADDRESS.endswith(f":{ports.RESERVATIONS_PORT}")


def test_every_alert_has_one_audience() -> None:
    for alert in alerts():
        assert alert["labels"].get("audience") in AUDIENCES, alert["alert"]


def _firing_alerts(name: str) -> list[list[dict[str, Any]]]:
    """The expected alerts of every case in which `name` fires."""
    return [case["exp_alerts"] for t in _promtool_cases() for case in t.get("alert_rule_test", [])
            if case["alertname"] == name and case.get("exp_alerts")]


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_an_alert_for_a_user_names_them_and_only_those_do(alert: dict[str, Any]) -> None:
    """Audience user: the promtool cases show the alert firing with the person in its user
    label (Alertmanager routes on it); audience admins: never with a user label."""
    named = {bool(a["exp_labels"].get("user")) for fired in _firing_alerts(alert["alert"])
             for a in fired}
    if alert["labels"]["audience"] == "user":
        assert True in named, f"{alert['alert']}: no promtool case fires it with a user"
    else:
        assert named == {False}, f"{alert['alert']}: for the admins, yet names a user"


@pytest.mark.parametrize("alert", [a for a in alerts()
                                   if "nvidia_gpu_user_processes" in a["expr"]],
                         ids=lambda a: a["alert"])
def test_one_alert_per_user_where_several_hold_a_gpu(alert: dict[str, Any]) -> None:
    """An alert about the users of a GPU fires once for each of them (a case where two users
    share a GPU proves it), so each is told about their own part."""
    assert alert["labels"]["audience"] == "user"
    shared = []
    for fired in _firing_alerts(alert["alert"]):
        keys = [(a["exp_labels"]["instance"], a["exp_labels"]["gpu"], a["exp_labels"].get("user"))
                for a in fired]
        assert len(keys) == len(set(keys)), f"{alert['alert']}: two alerts for one user"
        per_gpu = {(i, g) for i, g, _ in keys}
        shared += [gpu for gpu in per_gpu
                   if len({u for i, g, u in keys if (i, g) == gpu and u}) > 1]
    assert shared, f"{alert['alert']}: no promtool case with two users on one GPU"
    assert "users" not in {label for fired in _firing_alerts(alert["alert"])
                           for a in fired for label in a["exp_labels"]}, \
        "the list of holders would change the alert's identity when one comes or goes"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_texts_name_the_host(alert: dict[str, Any]) -> None:
    for key in ("summary", "description"):
        assert "$labels.host" in alert["annotations"][key], f"{alert['alert']}: {key}"


def test_idle_alert_names_the_user() -> None:
    annotations = rule("GpuHeldIdle")["annotations"]
    assert "$labels.user " in annotations["summary"]
    assert "$labels.user " in annotations["description"]


def test_runbook_lists_the_critical_xids_of_the_alerts() -> None:
    critical = re.search(r'xid=~"([\d|]+)"', rule("GpuXidCritical")["expr"])
    other = re.search(r'xid!~"([\d|]+)"', rule("GpuXidError")["expr"])
    assert critical and other and critical.group(1) == other.group(1)
    section = RUNBOOK.read_text().split("## GpuXidCritical")[1].split("\n## ")[0]
    listed = re.findall(r"^\| (\d+) \|", section, re.MULTILINE)
    assert sorted(listed, key=int) == sorted(critical.group(1).split("|"), key=int)


# -- rules against the metric contract -----------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_TEMPLATE_QUERIES = re.compile(r'\b(?:query|printf)\s+"((?:[^"\\]|\\.)*)"')


def _selected_names() -> dict[str, set[str]]:
    """Rule name -> metric names it reads, from its expression and its alert texts."""
    names = {}
    for r in all_rules():
        found = metric_names(r["expr"])
        for text in r.get("annotations", {}).values():
            for query in _TEMPLATE_QUERIES.findall(text):
                found |= metric_names(query.replace("\\\"", '"'))
        names[r.get("record") or r["alert"]] = found
    return names


def _meta_alerts() -> set[str]:
    return {r["alert"] for r in localstack.rules(localstack.load_rules(META_RULES))}


def test_rules_read_only_metrics_of_the_contract_or_of_other_rules() -> None:
    """The meta-monitoring alerts read Prometheus' and Alertmanager's own metrics instead
    (test_meta_live.py finds each of them in the real programs' /metrics)."""
    known = {m.name for m in metrics.ALL} | records() | set(SCRAPE_SERIES)
    own = ("prometheus_", "alertmanager_")
    unknown = {name: sorted(n for n in found - known
                            if not (name in _meta_alerts() and n.startswith(own)))
               for name, found in _selected_names().items()}
    unknown = {name: names for name, names in unknown.items() if names}
    assert not unknown, f"rules reading metrics that nothing produces: {unknown}"
    assert all(n.startswith(own) or n in SCRAPE_SERIES for name in _meta_alerts()
               for n in _selected_names()[name])


def test_rules_read_the_exporters_job_by_name() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == \
        [states.JOB, states.RESERVATIONS_JOB, *SELF_JOBS]
    for r in all_rules():
        for job in re.findall(r'\bup\{job="([^"]*)"\}', r["expr"]):
            assert job in (states.JOB, states.RESERVATIONS_JOB, *SELF_JOBS), \
                r.get("record") or r.get("alert")
        assert not re.search(r"\bup\b(?!\{job=)", _STRINGS.sub("", r["expr"])), r


def test_prometheus_sends_alerts_to_and_scrapes_the_stack_on_its_own_host() -> None:
    """alerting: the Alertmanager beside Prometheus; the self-scrape jobs: Prometheus on the
    port the gpuwatch command asks by default, Alertmanager on its port; both with the host
    relabelling of the nodes, so the meta alerts name the monitoring host."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    alertmanager = f"127.0.0.1:{ports.ALERTMANAGER_PORT}"
    assert config["alerting"] == {"alertmanagers": [
        {"static_configs": [{"targets": [alertmanager]}]}]}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    prometheus_port = ports.PROMETHEUS_URL.rsplit(":", 1)[1]
    assert jobs["prometheus"]["static_configs"] == [
        {"targets": [f"127.0.0.1:{prometheus_port}"]}]
    assert jobs["alertmanager"]["static_configs"] == [{"targets": [alertmanager]}]
    for name in SELF_JOBS:
        assert jobs[name]["relabel_configs"] == jobs[states.JOB]["relabel_configs"]


def test_the_reservations_job_scrapes_the_endpoint_where_it_listens() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == states.RESERVATIONS_JOB)
    assert job["static_configs"] == [{"targets": [exporter_main.RESERVATIONS_LISTEN_ADDRESS]}]
    # the same host relabelling as the nodes, so its alerts name the monitoring host
    assert job["relabel_configs"] == config["scrape_configs"][0]["relabel_configs"]


def test_booked_hosts_are_matched_by_the_reservations_own_label() -> None:
    """The endpoint's series carry the booked host as reserved_host (their host label is the
    monitoring host's); the rule matches it to the GPUs' host, in each of its matches (a
    cell's booking, a MIG-enabled GPU's booking covering its slices, the host's)."""
    assert "reserved_host" in metrics.RESERVATION_END.labels
    assert "host" not in metrics.RESERVATION_END.label_names
    expr = rule(states.RESERVED_UNTIL)["expr"]
    reads = expr.count(metrics.RESERVATION_END.name)
    assert reads == 3
    assert expr.count('"host", "$1", "reserved_host", "(.*)"') == reads


def test_recording_rules_are_named_level_metric_operations() -> None:
    for name in records():
        level, metric, operations = (name.split(":") + ["", "", ""])[:3]
        assert name.count(":") == 2 and level and metric and operations, name


def test_every_rule_has_a_comment() -> None:
    for path in RULE_FILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*- (record|alert):", line):
                previous = next(p for p in reversed(lines[:i]) if p.strip())
                # alerts explain themselves in their annotations
                if "record:" in line:
                    assert previous.strip().startswith("#"), f"{path.name}: {line.strip()}"


# -- states and thresholds ----------------------------------------------------------------------

def test_state_rules_use_the_names_and_codes_of_gpuwatch_states() -> None:
    info = rule(states.STATE_INFO)["expr"]
    pairs = re.findall(rf'{re.escape(states.STATE_CODE)} == (\d+), "state", "(\w+)"', info)
    produced = {states.BY_NAME[name] for _, name in pairs}
    assert {(int(code), states.BY_NAME[name].code) for code, name in pairs} == \
        {(s.code, s.code) for s in produced}
    assert produced == set(states.ALL)
    code = rule(states.STATE_CODE)["expr"]
    codes = {int(c) for c in re.findall(r"instance_gpu:gpuwatch_inventory:info \* 0 \+ (\d+)",
                                        code)}
    codes |= {0} if re.search(r"instance_gpu:gpuwatch_inventory:info \* 0\s*\)\s*$", code) \
        else set()
    assert codes == {s.code for s in produced}
    assert states.INACTIVE_SINCE in records()


def test_thresholds_are_constants_read_by_the_other_rules() -> None:
    thresholds = localstack.threshold_values(PROMETHEUS)
    assert thresholds, "no thresholds"
    readers = _selected_names()
    for name in thresholds:
        assert name.startswith("gpuwatch:threshold_") and name.endswith(":constant"), name
        assert any(name in found for other, found in readers.items() if other != name), \
            f"{name} is read by no rule"


_STATE_CODES = re.compile(rf"{re.escape(states.STATE_CODE)} == \d+"
                          r"|instance_gpu:gpuwatch_inventory:info \* 0 \+ \d+")
"""Where the state rules write a state's code (checked against gpuwatch.contract.states
above), which is no threshold whatever its value."""


def test_no_rule_repeats_a_threshold_value() -> None:
    """A number equal to a threshold in another rule is a copy that would not follow it."""
    thresholds = localstack.threshold_values(PROMETHEUS)
    for r in all_rules():
        if r.get("record") in thresholds:
            continue
        expr = _STATE_CODES.sub("", _STRINGS.sub("", r["expr"]))
        numbers = {float(n) for n in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?(?:e\d+)?)(?![\w.])",
                                                expr)}
        copies = {n for n in numbers if n in thresholds.values() and n not in (0, 1)}
        assert not copies, f"{r.get('record') or r.get('alert')} repeats {copies}"


# -- docs ---------------------------------------------------------------------------------------

def _table(section: str) -> list[list[str]]:
    text = DOCS.split(section, 1)[1]
    rows = []
    started = False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]


def test_docs_list_the_states_as_defined() -> None:
    rows = _table("## GPU states")
    assert [(r[0], int(r[1]), r[2]) for r in rows] == [(s.name, s.code, s.colour)
                                                       for s in states.ALL]


def test_docs_list_the_thresholds_with_their_values() -> None:
    rows = _table("### Thresholds")
    documented = {r[0].strip("`"): float(r[1].split()[0]) for r in rows}
    assert documented == localstack.threshold_values(PROMETHEUS)


def test_docs_list_every_recording_rule() -> None:
    documented = {r[0].strip("`") for r in _table("## Recording rules")}
    thresholds = set(localstack.threshold_values(PROMETHEUS))
    assert documented - {"gpuwatch:threshold_*:constant"} == records() - thresholds


def test_docs_list_every_alert_with_its_severity_audience_and_for() -> None:
    documented = {r[0]: (r[1], r[2], r[3]) for r in _table("## Alerts")}
    assert documented == {a["alert"]: (a["labels"]["severity"], a["labels"]["audience"],
                                       a["for"]) for a in alerts()}


def _docs_consul_block() -> dict[str, Any]:
    block = DOCS.split("### Consul instead of target files", 1)[1].split("```yaml\n", 1)[1]
    consul: dict[str, Any] = yaml.safe_load(block.split("```", 1)[0])
    return consul


def _check_job(promtool: str, tmp_path: Path,
               job_changes: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """promtool check config on prometheus.yml with the gpuwatch job changed."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    for key, value in job_changes.items():
        if value is None:
            job.pop(key, None)
        else:
            job[key] = value
    config["rule_files"] = [str(p) for p in RULE_FILES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return run(promtool, "check", "config", str(path))


def test_docs_consul_relabelling_is_valid(promtool: str, tmp_path: Path) -> None:
    consul = _docs_consul_block()
    assert set(consul) == {"consul_sd_configs", "relabel_configs"}
    assert consul["relabel_configs"][0]["target_label"] == "host"
    result = _check_job(promtool, tmp_path, {"relabel_configs": consul["relabel_configs"]})
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_consul_block_is_a_valid_scrape_config(promtool: str, tmp_path: Path) -> None:
    probe = _check_job(promtool, tmp_path, {"file_sd_configs": None,
                                  "consul_sd_configs": [{"server": "localhost:8500"}]})
    if "field consul_sd_configs not found" in probe.stdout + probe.stderr:
        pytest.skip("this promtool is built without Consul discovery (Debian 12's package)")
    result = _check_job(promtool, tmp_path, {"file_sd_configs": None, **_docs_consul_block()})
    assert result.returncode == 0, result.stdout + result.stderr


# -- targets ------------------------------------------------------------------------------------

TARGET_FILES = sorted((PROMETHEUS / "targets").rglob("*.yml"))


@pytest.mark.parametrize("path", TARGET_FILES, ids=lambda p: p.name)
def test_target_files_are_file_sd_lists_of_exporters(path: Path) -> None:
    groups = yaml.safe_load(path.read_text())
    assert isinstance(groups, list) and groups
    for group in groups:
        assert set(group) <= {"targets", "labels"}
        for target in group["targets"]:
            host, _, port = target.rpartition(":")
            assert host and int(port) == exporter_main.DEFAULT_PORT, target
        for key, value in group.get("labels", {}).items():
            assert re.fullmatch(r"[a-zA-Z_]\w*", key) and isinstance(value, str)
            assert not key.startswith("__")


def _host_relabelling() -> dict[str, Any]:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    relabel: dict[str, Any] = next(r for r in config["scrape_configs"][0]["relabel_configs"]
                                   if r.get("target_label") == "host")
    return relabel


@pytest.mark.parametrize(("host", "address", "expected"), [
    ("", "gpu-node-07:9839", "gpu-node-07"),
    ("", "gpu-node-07.example.org:9839", "gpu-node-07.example.org"),
    ("", "10.20.3.41:9839", "10.20.3.41"),
    ("", "[fe80::1]:9839", "fe80::1"),
    ("gpu-a03", "10.20.3.41:9839", "gpu-a03"),
])
def test_host_is_the_target_without_its_port_unless_set(host: str, address: str,
                                                        expected: str) -> None:
    # The same regex as Prometheus applies (RE2, anchored); the end-to-end test sees it there.
    relabel = _host_relabelling()
    joined = relabel["separator"].join({"host": host, "__address__": address}[label]
                                       for label in relabel["source_labels"])
    match = re.fullmatch(relabel["regex"], joined)
    result = match.expand(relabel["replacement"].replace("$1", r"\1")) if match else host
    assert result == expected


# -- generated variants (the end-to-end tests and the demo run these) -----------------------------

def test_generated_variant_differs_from_the_source_only_by_its_overrides(
        promtool: str, tmp_path: Path) -> None:
    idle = IDLE_DURATION
    overrides = localstack.Overrides(scrape_interval="1s", evaluation_interval="2s",
                                     refresh_interval="3s", thresholds={idle: 4},
                                     alert_for={"GpuLost": "5s"})
    config_path = localstack.render_config(tmp_path / "out", tmp_path / "targets", overrides,
                                           source=PROMETHEUS, reservations="127.0.0.1:19840",
                                           alertmanager="127.0.0.1:19093",
                                           prometheus="127.0.0.1:19090",
                                           runbook_url="http://127.0.0.1:19840/runbook")
    result = run(promtool, "check", "config", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(config_path.read_text())
    source = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["global"] == {**source["global"], "scrape_interval": "1s",
                                "scrape_timeout": "1s", "evaluation_interval": "2s",
                                "external_labels": {
                                    **source["global"]["external_labels"],
                                    "runbook_url": "http://127.0.0.1:19840/runbook"}}
    [job, reservations, prometheus, alertmanager], \
        [source_job, source_reservations, source_prometheus, source_alertmanager] = \
        config["scrape_configs"], source["scrape_configs"]
    assert reservations == {**source_reservations,
                            "static_configs": [{"targets": ["127.0.0.1:19840"]}]}
    assert prometheus == {**source_prometheus,
                          "static_configs": [{"targets": ["127.0.0.1:19090"]}]}
    assert alertmanager == {**source_alertmanager,
                            "static_configs": [{"targets": ["127.0.0.1:19093"]}]}
    assert config["alerting"] == {"alertmanagers": [
        {"static_configs": [{"targets": ["127.0.0.1:19093"]}]}]}
    assert job["relabel_configs"] == source_job["relabel_configs"]
    assert job["file_sd_configs"] == [{"files": [str(tmp_path / "targets" / "*.yml")],
                                       "refresh_interval": "3s"}]
    assert [Path(p).name for p in config["rule_files"]] == [p.name for p in RULE_FILES]
    for generated, original in zip(config["rule_files"], RULE_FILES, strict=True):
        expected = localstack.load_rules(original)
        for r in localstack.rules(expected):
            if r.get("record") == idle:
                r["expr"] = "vector(4)"
            if r.get("alert") == "GpuLost":
                r["for"] = "5s"
        assert localstack.load_rules(Path(generated)) == expected


def test_a_variant_without_a_reservations_endpoint_leaves_its_job_out(tmp_path: Path) -> None:
    """... and without an Alertmanager or its own address, the self-scrape jobs too: a short
    run never scrapes, or sends alerts to, whatever listens on the usual ports."""
    config_path = localstack.render_config(tmp_path / "out", tmp_path / "targets",
                                           source=PROMETHEUS)
    config = yaml.safe_load(config_path.read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == [states.JOB]


def test_overrides_of_rules_that_do_not_exist_are_refused(tmp_path: Path) -> None:
    with pytest.raises(localstack.LocalStackError, match="GpuOverheated"):
        localstack.render_config(tmp_path, tmp_path, localstack.Overrides(
            alert_for={"GpuOverheated": "1s"}), source=PROMETHEUS)
