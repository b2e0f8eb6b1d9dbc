"""Facts written in more than one place, kept in step: the threshold rule names, the scrape
interval Grafana is told, run-grafana's exit statuses, each alert's `for` and the value of a
reservation of every GPU. Each is defined once where code can import it, or checked here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from paths import REPO

from gpuwatch.cells import Cell
from gpuwatch.contract import states, thresholds
from tools import localstack

PROMETHEUS = REPO / "prometheus"
GRAFANA = REPO / "grafana"
RUN_GRAFANA = GRAFANA / "run-grafana"
ALERT_FILE = PROMETHEUS / "rules" / "alerts.yml"


def rules(path: Path) -> list[dict[str, Any]]:
    return localstack.rules(localstack.load_rules(path))


def all_rules() -> list[dict[str, Any]]:
    return [r for path in localstack.rule_files(PROMETHEUS) for r in rules(path)]


def alerts() -> list[dict[str, Any]]:
    return [r for r in all_rules() if "alert" in r]


def seconds(duration: str) -> float:
    """A Prometheus duration (1h30m, 15s) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(int(n) * units[u] for n, u in parts)


# -- the threshold rules ------------------------------------------------------------------------

THRESHOLD_NAME = re.compile(r"gpuwatch:threshold_\w+:constant")
_SKIPPED = {"node_modules", ".venv", ".git", "__pycache__", ".demo"}


def _text_files(*roots: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix in suffixes and path.is_file() and \
                    not _SKIPPED & set(path.relative_to(REPO).parts):
                yield path


def test_thresholds_yml_records_the_contracts_names_in_order() -> None:
    recorded = [r["record"] for r in rules(PROMETHEUS / "rules" / "thresholds.yml")]
    assert recorded == list(thresholds.ALL)
    assert set(localstack.threshold_values(PROMETHEUS)) == set(thresholds.ALL)


def test_every_threshold_named_anywhere_is_one_the_rules_record() -> None:
    """Rules, alert texts, promtool tests, dashboards, docs and code name a threshold only by
    one of the names thresholds.yml records: a renamed one leaves no stale reader."""
    known = set(thresholds.ALL)
    checked = 0
    for path in _text_files(PROMETHEUS, GRAFANA, REPO / "docs", REPO / "README.md",
                            REPO / "src", REPO / "tools", REPO / "tests", REPO / "ansible",
                            suffixes=(".yml", ".yaml", ".json", ".md", ".py", ".j2")):
        named = set(THRESHOLD_NAME.findall(path.read_text(errors="replace")))
        assert named <= known, f"{path.relative_to(REPO)} names {sorted(named - known)}"
        checked += bool(named)
    assert checked >= 5, "the rules, the alerts, their tests and the docs name thresholds"


def test_python_names_a_threshold_through_the_contract() -> None:
    """Python code imports gpuwatch.contract.thresholds instead of spelling a name out."""
    home = REPO / "src" / "gpuwatch" / "contract" / "thresholds.py"
    for path in _text_files(REPO / "src", REPO / "tools", REPO / "tests", suffixes=(".py",)):
        if path != home:
            spelled = THRESHOLD_NAME.findall(path.read_text())
            assert not spelled, f"{path.relative_to(REPO)} spells out {spelled}: import " \
                                "it from gpuwatch.contract.thresholds"


# -- the scrape interval Grafana is told --------------------------------------------------------

def _prometheus_datasources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml")):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            if source.get("type") == "prometheus":
                yield path, source


def test_grafana_time_interval_is_the_scrape_interval() -> None:
    """Grafana's timeInterval is the smallest step it asks for and a quarter of
    $__rate_interval: it must be the interval Prometheus scrapes the exporters at."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    interval = config["global"]["scrape_interval"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == states.JOB]
    assert seconds(job.get("scrape_interval", interval)) == seconds(interval), \
        f"the {states.JOB} job's own scrape_interval differs from the global one"
    sources = list(_prometheus_datasources())
    assert sources, "the shipped datasource"
    for path, source in sources:
        told = source.get("jsonData", {}).get("timeInterval")
        assert told is not None and seconds(told) == seconds(interval), \
            f"{path.relative_to(REPO)}: timeInterval {told}, but prometheus/prometheus.yml " \
            f"scrapes every {interval}"


def test_the_ansible_roles_take_both_intervals_from_the_checkout() -> None:
    """The roles install prometheus.yml and the datasource from the checkout, setting neither
    interval: a role that sets one must set the other from it (and this test must read it)."""
    names = ("scrape_interval", "timeInterval", "evaluation_interval")
    for path in _text_files(REPO / "ansible" / "roles", suffixes=(".yml", ".yaml", ".j2")):
        text = path.read_text()
        for name in names:
            assert name not in text, f"{path.relative_to(REPO)} sets {name}"
    values = yaml.safe_load((REPO / "ansible/roles/gpuwatch_grafana/vars/main.yml").read_text())
    assert set(values["_gpuwatch_grafana_provisioning_values"]["datasources"]) == {"url"}


# -- run-grafana's exit statuses ----------------------------------------------------------------

def _documented_statuses(lines: list[str], start: str, row: str) -> dict[int, str]:
    found: dict[int, str] = {}
    begun = False
    for line in lines:
        if line.startswith(start):
            begun = True
        elif begun:
            match = re.match(row, line)
            if match:
                found[int(match.group(1))] = match.group(2).replace("`", "").strip()
            elif found:
                break
    return found


def script_statuses() -> dict[int, str]:
    """The table in run-grafana's header."""
    return _documented_statuses(RUN_GRAFANA.read_text().splitlines(), "# Exit status",
                                r"#\s+(\d+)\s+(.+)$")


def test_run_grafana_documents_each_status_it_exits_with() -> None:
    text = RUN_GRAFANA.read_text()
    documented = script_statuses()
    assert sorted(documented) == [0, 1, 2, 3, 4, 5]
    named = {name: int(value) for name, value in re.findall(r"^(\w+)=(\d+)$", text, re.M)}
    code_lines = "\n".join(line for line in text.splitlines()
                           if not line.lstrip().startswith("#"))
    exits = re.findall(r"\bexit\s+(\$?\w+)", code_lines)
    assert exits, "run-grafana exits somewhere"
    for status in exits:
        code = int(status) if status.isdigit() else named.get(status.removeprefix("$"))
        assert code in documented, f"run-grafana exits with {status}, not in its header"
    assert localstack.GRAFANA_MISSING in documented
    assert "no Grafana" in documented[localstack.GRAFANA_MISSING], \
        "tools/localstack.GRAFANA_MISSING is run-grafana's status for a missing Grafana"
    guide = (REPO / "docs" / "grafana.md").read_text().splitlines()
    assert _documented_statuses(guide, "| status | meaning |",
                                r"\|\s*(\d+)\s*\|\s*(.+?)\s*\|$") == documented, \
        "docs/grafana.md lists run-grafana's exit statuses as its header does"


_TOOLS = ("sh", "dirname", "cat", "readlink", "mkdir", "sed", "grep", "mv")


@pytest.fixture
def bare_path(tmp_path: Path) -> Path:
    """A PATH folder with only the programs run-grafana uses, and no Grafana."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in _TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (folder / tool).symlink_to(found)
    return folder


def fake_grafana(folder: Path, home: Path | None, status: int = 0) -> Path:
    """A `grafana` in `folder` that leaves a file behind and exits with `status`; with a home
    (conf/defaults.ini) beside it as Grafana's tarball has."""
    started = folder.parent / "started"
    binary = folder / "grafana"
    binary.write_text(f'#!/bin/sh\n: > "{started}"\nexit {status}\n')
    binary.chmod(0o755)
    if home is not None:
        (home / "conf").mkdir(parents=True)
        (home / "conf" / "defaults.ini").write_text("")
    return started


def run_grafana(path: Path, tmp_path: Path, *args: str, script: Path = RUN_GRAFANA,
                **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("GPUWATCH_", "GF_", "GRAFANA_"))}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=tmp_path,
                          env={**base, "PATH": str(path),
                               "GPUWATCH_GRAFANA_STATE": str(tmp_path / "state"), **env})


def _meaning(status: int) -> str:
    return script_statuses()[status]


def test_run_grafana_without_grafana(bare_path: Path, tmp_path: Path) -> None:
    assert "no Grafana" in _meaning(3)
    for args in ((), ("--check",)):
        done = run_grafana(bare_path, tmp_path, *args)
        assert done.returncode == 3 == localstack.GRAFANA_MISSING, done.stderr
        assert "apt.grafana.com" in done.stderr


def test_run_grafana_bad_arguments(bare_path: Path, tmp_path: Path) -> None:
    assert "bad arguments" in _meaning(2)
    done = run_grafana(bare_path, tmp_path, "--chek")
    assert done.returncode == 2 and "usage:" in done.stderr
    started = fake_grafana(bare_path, bare_path.parent)
    done = run_grafana(bare_path, tmp_path, GPUWATCH_SCRAPE_INTERVAL="5 seconds")
    assert done.returncode == 2 and "GPUWATCH_SCRAPE_INTERVAL" in done.stderr
    assert not started.exists()


def _written_datasource(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "state/provisioning/datasources/gpuwatch.yml"
    (source,) = yaml.safe_load(path.read_text())["datasources"]
    return dict(source)


def test_run_grafana_tells_grafana_the_scrape_interval(bare_path: Path,
                                                       tmp_path: Path) -> None:
    """A Prometheus that scrapes faster than the shipped one (the demo's) gets a datasource
    with its own timeInterval; without one, the shipped (prometheus.yml's) stays."""
    started = fake_grafana(bare_path, bare_path.parent)
    (_, shipped), = _prometheus_datasources()
    done = run_grafana(bare_path, tmp_path)
    assert done.returncode == 0, done.stderr
    assert _written_datasource(tmp_path) == shipped
    done = run_grafana(bare_path, tmp_path, GPUWATCH_SCRAPE_INTERVAL="5s",
                       GPUWATCH_PROMETHEUS_URL="http://127.0.0.1:19090")
    assert done.returncode == 0, done.stderr
    assert started.exists()
    written = _written_datasource(tmp_path)
    assert written["jsonData"] == {**shipped["jsonData"], "timeInterval": "5s"}
    assert written == {**shipped, "url": "http://127.0.0.1:19090",
                       "jsonData": written["jsonData"]}
    assert not list((tmp_path / "state/provisioning/datasources").glob("*.new"))


def test_run_grafana_check_finds_grafana_and_starts_nothing(bare_path: Path,
                                                            tmp_path: Path) -> None:
    assert "--check" in _meaning(0)
    started = fake_grafana(bare_path, bare_path.parent)
    done = run_grafana(bare_path, tmp_path, "--check")
    assert done.returncode == 0, done.stderr
    assert not started.exists()


def test_run_grafana_without_grafanas_home(bare_path: Path, tmp_path: Path) -> None:
    assert "GRAFANA_HOME" in _meaning(4)
    started = fake_grafana(bare_path, None)
    done = run_grafana(bare_path, tmp_path, GRAFANA_HOME=str(tmp_path / "nowhere"))
    assert done.returncode == 4 and "GRAFANA_HOME" in done.stderr
    assert not started.exists()


@pytest.mark.parametrize("key", ["url", "timeInterval"])
def test_run_grafana_with_provisioning_it_cannot_set(bare_path: Path, tmp_path: Path,
                                                     key: str) -> None:
    """The shipped datasource without a line run-grafana sets: the error names that file
    (not the copy it writes) and Grafana does not start."""
    assert "provisioning" in _meaning(5) and f"{key}:" in _meaning(5)
    started = fake_grafana(bare_path, bare_path.parent)
    checkout = tmp_path / "checkout"
    shutil.copytree(GRAFANA, checkout / "grafana")
    broken = checkout / "grafana/provisioning/datasources/gpuwatch.yml"
    broken.write_text(broken.read_text().replace(f" {key}: ", " renamed: "))
    done = run_grafana(bare_path, tmp_path, script=checkout / "grafana/run-grafana",
                       GPUWATCH_SCRAPE_INTERVAL="5s")
    assert done.returncode == 5, done.stderr
    (line,) = done.stderr.splitlines()
    assert str(broken) in line and f"`{key}:`" in line
    assert not started.exists()


def test_run_grafana_that_cannot_write_its_state(bare_path: Path, tmp_path: Path) -> None:
    fake_grafana(bare_path, bare_path.parent)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    done = run_grafana(bare_path, tmp_path, GPUWATCH_GRAFANA_STATE=str(blocked / "state"))
    assert done.returncode == 1, done.stderr


def test_run_grafana_exits_as_grafana_does_once_it_runs(bare_path: Path,
                                                        tmp_path: Path) -> None:
    started = fake_grafana(bare_path, bare_path.parent, status=7)
    done = run_grafana(bare_path, tmp_path)
    assert done.returncode == 7, done.stderr
    assert started.exists()


# -- each alert's `for` ---------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{.*?\}\}", re.S)
_DURATION = re.compile(r"\b(\d+|an?|one)\s*(seconds?|minutes?|hours?|days?)\b"
                       r"|\b\d+(ms|[smhd])\b", re.I)
_RUNBOOK_FOR = re.compile(r"\bfor (\d+|an?) (second|minute|hour|day)s?\b")
_WORD_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: str(a["alert"]))
def test_alert_texts_do_not_repeat_a_duration(alert: dict[str, Any]) -> None:
    """A template cannot read the rule's `for`, and the end-to-end tests shorten it: a
    number in the text would be a copy that does not follow it."""
    for key in ("summary", "description"):
        text = _ACTION.sub("", str(alert.get("annotations", {}).get(key, "")))
        found = _DURATION.search(text)
        assert found is None, f"{alert['alert']} {key} says {found.group(0)!r}" \
                              f" (for: {alert.get('for')})"


def _runbook_sections() -> dict[str, str]:
    text = (REPO / "docs" / "runbook.md").read_text()
    return {m.group(1): m.group(2)
            for m in re.finditer(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.M | re.S)}


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: str(a["alert"]))
def test_runbook_says_the_alerts_for_as_the_rule_has_it(alert: dict[str, Any]) -> None:
    section = _runbook_sections()[alert["alert"]]
    fired = section.split("**What fired:**", 1)[1].split("\n\n", 1)[0]
    for number, unit in _RUNBOOK_FOR.findall(" ".join(fired.split())):
        said = (1 if not number.isdigit() else int(number)) * _WORD_SECONDS[unit]
        assert said == seconds(alert["for"]), \
            f"docs/runbook.md#{alert['alert'].lower()} says for {number} {unit}(s), " \
            f"the rule has for: {alert['for']}"


def test_runbook_names_some_alerts_for() -> None:
    """The check above reads the runbook's phrasing: it must still find what it checks."""
    fired = " ".join(s.split("**What fired:**", 1)[1].split("\n\n", 1)[0]
                     for s in _runbook_sections().values() if "**What fired:**" in s)
    assert len(_RUNBOOK_FOR.findall(" ".join(fired.split()))) >= 5


# -- a reservation of every GPU -------------------------------------------------------------------

_GPU_MATCHER = re.compile(r"\bgpu\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")


def test_rules_match_a_reservation_of_every_gpu_by_the_contracts_value() -> None:
    """The rules tell a reservation of every GPU (gpu="all") from one of some GPUs by the
    value the reservation collector writes."""
    values = {value for r in all_rules() for _, value in _GPU_MATCHER.findall(str(r["expr"]))}
    assert values == {states.ALL_GPUS}


def test_promtool_tests_book_every_gpu_with_the_contracts_value() -> None:
    series = [s["series"] for path in sorted((PROMETHEUS / "tests").glob("*_test.yml"))
              for test in yaml.safe_load(path.read_text())["tests"]
              for s in test.get("input_series", [])
              if s["series"].startswith("nvidia_gpu_reservation_end_timestamp_seconds")]
    gpus = {value for s in series for _, value in _GPU_MATCHER.findall(s)}
    assert states.ALL_GPUS in gpus
    # the rest are cells as the reservation collector writes them: "0", a MIG slice "0/7"
    assert all(str(Cell.parse(g)) == g for g in gpus - {states.ALL_GPUS}), gpus
    assert any(Cell.parse(g).is_slice for g in gpus - {states.ALL_GPUS}), gpus
