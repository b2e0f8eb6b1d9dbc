"""The Ansible deployment: syntax, ansible-lint (production profile, offline), and a real run of
site.yml against this machine (connection: local) with every path redirected into a temporary
directory, then a second run that must change nothing.

The run deploys the exporter, Prometheus and reservations roles completely and the Grafana
role's configuration (Grafana itself cannot be installed here). Services are not started (systemd
is not PID 1 here); instead the test starts the exporter and the reservations endpoint with their
units' own ExecStart= (as unprivileged users where the venv's interpreter lets it), scrapes the
exporter over TLS with basic auth, books a GPU as a member of the booking group, and points a real
Prometheus with the rendered prometheus.yml at both. Nothing leaves 127.0.0.1: the wheels come
from a wheelhouse prepared before the run, and the playbook runs in a network namespace without
network where the machine allows one.

Only the system-wide parts touch the machine: the exporter's system user and group (created once,
harmless; the group is also the booking group here) and apt, which the run never calls because the
packages it needs are already there.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_provisioning import provisioned
from paths import REPO

from tools.localstack import end_process

ANSIBLE_DIR = REPO / "ansible"
ROLES = ANSIBLE_DIR / "roles"
VENV_BIN = Path(sys.executable).parent
EXPORTER_USER = "gpuwatch-exporter"
EXPORTER_GROUP = "gpuwatch-exporter"
SCRAPE_USER = "prometheus"
# The workstation scenario's GPU model, given a short name through the role's config.
SCENARIO_MODEL = "NVIDIA GeForce RTX 3090"
DISPLAY_NAME = "3090"
RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)", re.MULTILINE)


def _tool(name: str) -> str:
    """A tool of this venv (ansible-playbook, ansible-lint), else from PATH."""
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `make test` installs it from pyproject's test extra")
    return found


def _ansible_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(home / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(home / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
        # The venv's tools first, as when the venv is activated (ansible-lint warns otherwise).
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def _without_network() -> list[str]:
    """A command prefix that runs in a fresh network namespace (no interface up), where allowed.

    Proves that what runs inside contacts nothing; containers without the privilege run as is.
    """
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return []
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True)
    return [unshare, "--net"] if probe.returncode == 0 else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recap(output: str) -> dict[str, int]:
    matches = list(RECAP.finditer(output))
    assert len(matches) == 1, f"expected one host in PLAY RECAP:\n{output[-3000:]}"
    return {k: int(v) for k, v in matches[0].groupdict().items() if k != "host"}


def _changed_tasks(output: str) -> list[str]:
    """The tasks of a run that reported a change, for failure messages."""
    changed, task = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.rstrip(" *")
        elif line.startswith("changed:"):
            changed.append(f"{task}: {line}")
    return changed


# --- static checks -----------------------------------------------------------------------------

def test_site_yml_passes_syntax_check(tmp_path: Path) -> None:
    result = subprocess.run(
        [_tool("ansible-playbook"), "--syntax-check", "-i", "inventory/example/hosts.yml",
         "site.yml"],
        cwd=ANSIBLE_DIR, env=_ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_passes_production_profile_offline(tmp_path: Path) -> None:
    config = yaml.safe_load((ANSIBLE_DIR / ".ansible-lint").read_text())
    assert config["profile"] == "production"
    assert config["offline"] is True, "ansible-lint must never download collections or roles"
    result = subprocess.run(
        [*_without_network(), _tool("ansible-lint"), "--nocolor"],
        cwd=ANSIBLE_DIR, env=_ansible_env(tmp_path), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output


def _roles() -> list[Path]:
    return sorted(p for p in ROLES.iterdir() if p.is_dir())


def _entry_points(role: Path) -> dict[str, Any]:
    """The argument spec of every entry point of a role: main, or tasks_from names."""
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    entry_points: dict[str, Any] = spec["argument_specs"]
    return entry_points


# Roles that playbooks do not name: other roles import their entry points (tasks_from).
INTERNAL_ROLES = {"gpuwatch_common"}


def test_every_role_documents_every_default() -> None:
    """defaults/main.yml and meta/argument_specs.yml list the same variables, all role-prefixed."""
    for role in _roles():
        entry_points = _entry_points(role)
        for name, entry in entry_points.items():
            options = entry.get("options", {})
            assert all(o.startswith(role.name + "_") for o in options), (role.name, name)
            assert all("description" in o and "type" in o for o in options.values()), \
                (role.name, name)
        if role.name in INTERNAL_ROLES:
            assert "main" not in entry_points, f"{role.name} is internal: no main entry point"
            assert not (role / "defaults").exists(), \
                f"{role.name} is internal: its callers pass every parameter"
            assert "(internal)" in (role / "README.md").read_text().splitlines()[0], role.name
            continue
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
        options = entry_points["main"]["options"]
        # Only variables without a default on purpose (the Grafana admin password) are spec-only.
        assert set(defaults) <= set(options), (role.name, set(defaults) - set(options))
        for name, value in defaults.items():
            if "{{" not in str(value):
                assert options[name].get("default") == value, (role.name, name)
        readme = (role / "README.md").read_text()
        undocumented = [name for name in options if f"`{name}`" not in readme]
        assert not undocumented, f"{role.name}/README.md does not mention {undocumented}"


# What a role may read of another role's variables, and why: the Prometheus role scrapes every
# GPU node where that node's inventory says its exporter listens (hostvars of the node); the
# roles of the monitoring host follow the stack's one access choice and take their passwords from
# its users (docs/security.md), each only as the default of a variable of its own.
STACK_ACCESS = {"gpuwatch_prometheus_access", "gpuwatch_prometheus_basic_auth_users"}
INVENTORY_READS = {
    "gpuwatch_prometheus": {"gpuwatch_exporter_web_listen_address",
                            "gpuwatch_exporter_web_telemetry_path",
                            "gpuwatch_exporter_tls_server_config"},
    "gpuwatch_alertmanager": STACK_ACCESS,
    "gpuwatch_grafana": STACK_ACCESS,
    "gpuwatch_reservations": STACK_ACCESS,
}
_IMPORT_ROLE = {"import_role", "include_role", "ansible.builtin.import_role",
                "ansible.builtin.include_role"}


def _code_strings(node: object, role_params: dict[str, set[str]], file: str) -> Iterator[str]:
    """Every key and value of a tasks/handlers/vars file, except the parameters passed to an
    imported role (checked here against that role's argument spec instead)."""
    if isinstance(node, list):
        for item in node:
            yield from _code_strings(item, role_params, file)
    elif isinstance(node, dict):
        imported = next((node[k] for k in _IMPORT_ROLE if k in node), None)
        passed: set[str] = set()
        if isinstance(imported, dict) and imported.get("name") in role_params:
            entry = str(imported.get("tasks_from", "main")).removesuffix(".yml")
            documented = role_params[imported["name"]].get(entry)
            passed = set(node.get("vars", {}))
            assert documented is not None, f"{file}: {imported['name']} has no entry point {entry}"
            assert passed <= documented, \
                f"{file}: parameters {sorted(passed - documented)} are not in " \
                f"{imported['name']}'s argument spec ({entry})"
        for key, value in node.items():
            if key == "vars" and passed:
                yield from _code_strings(list(value.values()), role_params, file)
                continue
            yield str(key)
            yield from _code_strings(value, role_params, file)
    elif node is not None:
        yield str(node)


def test_no_role_reads_another_roles_variables() -> None:
    """A role's tasks, handlers, vars, defaults and templates name no variable of another role
    (public or private), except the parameters of an entry point it imports, as documented in
    that role's argument spec, and the inventory reads listed in INVENTORY_READS."""
    roles = [role.name for role in _roles()]
    role_params = {name: {entry: set(spec.get("options", {}))
                          for entry, spec in _entry_points(ROLES / name).items()}
                   for name in roles}
    found: dict[str, set[str]] = {}
    for role in roles:
        alternatives = "|".join(r for r in roles if r != role)
        others = re.compile(rf"(?<![\w])_?(?:{alternatives})_\w+")
        for path in sorted((ROLES / role).rglob("*")):
            kind = path.relative_to(ROLES / role).parts[0]
            if not path.is_file() or kind not in {"tasks", "handlers", "vars", "defaults",
                                                  "templates"}:
                continue
            if kind == "templates":
                strings = [re.sub(r"\{#.*?#\}", "", path.read_text(), flags=re.S)]
            else:
                strings = list(_code_strings(yaml.safe_load(path.read_text()), role_params,
                                             str(path.relative_to(ROLES))))
            for text in strings:
                for name in others.findall(text):
                    found.setdefault(role, set()).add(name)
                    assert name in INVENTORY_READS.get(role, set()), \
                        f"{path.relative_to(ROLES)} reads {name}, another role's variable"
    assert found == INVENTORY_READS, "INVENTORY_READS lists reads that no longer happen"
    public = set().union(*(params.get("main", set()) for params in role_params.values()))
    for role, names in INVENTORY_READS.items():
        assert names <= public, names - public  # public, documented
        readme = (ROLES / role / "README.md").read_text()
        assert all(f"`{name}`" in readme for name in names), role
    # The stack's access settings are read only as defaults, with a fallback of their own.
    for role in INVENTORY_READS.keys() - {"gpuwatch_prometheus"}:
        defaults = (ROLES / role / "defaults/main.yml").read_text()
        for name in STACK_ACCESS:
            assert re.findall(rf"{name} \| default\(", defaults), (role, name)


def _common_filters() -> Any:
    """The gpuwatch_common role's filter plugin, as the roles' templates call it."""
    import importlib.util

    path = ROLES / "gpuwatch_common/filter_plugins/gpuwatch_common.py"
    spec = importlib.util.spec_from_file_location("gpuwatch_common_filters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("word", "quoted"), [
    ("--log.level=info", "--log.level=info"),
    ("--reservations.file=/srv/lab book/r.yml", '"--reservations.file=/srv/lab book/r.yml"'),
    ("100%", "100%%"),
    ("$HOME", "$$HOME"),
    ('say "hi"', '"say \\"hi\\""'),
    ("a\\b", '"a\\\\b"'),
    ("a;b", '"a;b"'),
    ("", '""'),
])
def test_systemd_quoting_is_what_systemd_reads_back(word: str, quoted: str) -> None:
    assert _common_filters().systemd_quote(word) == quoted


def test_systemd_command_puts_one_quoted_word_per_line() -> None:
    assert _common_filters().systemd_command(["/opt/v/bin/x", "--a=b c", "--d"]) == \
        '/opt/v/bin/x \\\n    "--a=b c" \\\n    --d'


@pytest.mark.parametrize(("address", "parts"), [
    (":9839", {"valid": True, "host": "", "port": 9839, "probe_host": "127.0.0.1"}),
    ("0.0.0.0:9839", {"valid": True, "host": "0.0.0.0", "port": 9839, "probe_host": "127.0.0.1"}),
    ("10.0.0.5:9839", {"valid": True, "host": "10.0.0.5", "port": 9839, "probe_host": "10.0.0.5"}),
    ("[::]:9840", {"valid": True, "host": "::", "port": 9840, "probe_host": "127.0.0.1"}),
    ("[fe80::1]:1", {"valid": True, "host": "fe80::1", "port": 1, "probe_host": "fe80::1"}),
    ("node07:65535", {"valid": True, "host": "node07", "port": 65535, "probe_host": "node07"}),
])
def test_listen_addresses_are_taken_apart(address: str, parts: dict[str, object]) -> None:
    assert _common_filters().listen_address(address) == parts


@pytest.mark.parametrize("address", ["9839", "host:", ":0", ":65536", "fe80::1:9839",
                                     "a b:9839", ":98390"])
def test_bad_listen_addresses_are_not_valid(address: str) -> None:
    assert _common_filters().listen_address(address)["valid"] is False


def test_role_defaults_match_the_exporter() -> None:
    """The port and the collector names are the exporter's, not copies that drift."""
    from gpuwatch.exporter import main as exporter_main

    def load(path: str) -> dict[str, object]:
        return yaml.safe_load((ROLES / path).read_text())

    exporter_defaults = load("gpuwatch_exporter/defaults/main.yml")
    assert exporter_defaults["gpuwatch_exporter_web_listen_address"] == \
        exporter_main.DEFAULT_LISTEN_ADDRESS
    assert load("gpuwatch_prometheus/defaults/main.yml")["gpuwatch_prometheus_exporter_port"] == \
        exporter_main.DEFAULT_PORT
    assert load("gpuwatch_exporter/vars/main.yml")["_gpuwatch_exporter_collectors"] == \
        [c.name for c in exporter_main.COLLECTORS]
    assert load("gpuwatch_reservations/defaults/main.yml")[
        "gpuwatch_reservations_web_listen_address"] == exporter_main.RESERVATIONS_LISTEN_ADDRESS


def test_the_roles_install_the_gpuwatch_distribution() -> None:
    """`gpuwatch` on PyPI is an unrelated project: index mode installs gpuwatch.DISTRIBUTION, and
    no hint or document in ansible/ tells pip to fetch `gpuwatch`."""
    import gpuwatch

    for role in ("gpuwatch_exporter", "gpuwatch_reservations"):
        defaults = yaml.safe_load((ROLES / role / "defaults/main.yml").read_text())
        assert defaults[f"{role}_package_name"] == gpuwatch.DISTRIBUTION, role
        (install,) = yaml.safe_load((ROLES / role / "tasks/install.yml").read_text())[:1]
        assert install["vars"]["gpuwatch_common_package_name"] == \
            f"{{{{ {role}_package_name }}}}", role
    common = yaml.safe_load((ROLES / "gpuwatch_common/vars/main.yml").read_text())
    assert "else gpuwatch_common_package_name" in common["_gpuwatch_common_requirement"]
    hint = (ROLES / "gpuwatch_common/tasks/install.yml").read_text()
    assert "pip download -d DIR {{ gpuwatch_common_package_name }}" in hint
    stranger = re.compile(r"pip3? +(?:download|install)\b[^\n`]*?(?<![\w./-])gpuwatch(?![\w-])")
    for path in sorted(ANSIBLE_DIR.rglob("*")):
        if path.is_file() and path.suffix in {".md", ".yml", ".j2", ".py"}:
            assert not stranger.search(path.read_text()), f"{path} tells pip to fetch `gpuwatch`"


def _prometheus_config_plugin() -> Any:
    from tools import localstack

    return localstack.prometheus_config_plugin()


def test_prometheus_yml_has_one_rendering_for_the_role_and_the_local_stack(
        tmp_path: Path) -> None:
    """The role's template and tools/localstack.py both call the role's filter plugin on the
    repository's prometheus/prometheus.yml; neither rewrites the configuration itself."""
    from gpuwatch.contract import states
    from tools import localstack

    plugin = ROLES / "gpuwatch_prometheus/filter_plugins/gpuwatch_prometheus.py"
    assert plugin == localstack.PROMETHEUS_CONFIG_PLUGIN
    template = (ROLES / "gpuwatch_prometheus/templates/prometheus.yml.j2").read_text()
    assert "| gpuwatch_prometheus_config(" in template
    assert "combine" not in template and "regex_replace" not in template and "{%" not in template
    overrides = localstack.Overrides(scrape_interval="1s", evaluation_interval="2s",
                                     refresh_interval="3s")
    rendered = localstack.render_config(tmp_path / "out", tmp_path / "targets", overrides,
                                        reservations="127.0.0.1:19840")
    source = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    plugin = _prometheus_config_plugin()
    expected = plugin.prometheus_config(
        source, rules_dir=str(tmp_path / "out/rules"), file_sd_dir=str(tmp_path / "targets"),
        global_settings={"scrape_interval": "1s", "scrape_timeout": "1s",
                         "evaluation_interval": "2s"},
        file_sd_settings={"refresh_interval": "3s"},
        scrape_config_overrides={states.RESERVATIONS_JOB: {
            "static_configs": [{"targets": ["127.0.0.1:19840"]}]}},
        # no Alertmanager and no address of its own given: alerts go nowhere, no self-scrape
        alertmanagers=[], without_jobs=[plugin.ALERTMANAGER_JOB, plugin.PROMETHEUS_JOB])
    assert yaml.safe_load(rendered.read_text()) == expected


def test_prometheus_rendering_changes_only_what_it_is_told() -> None:
    render = _prometheus_config_plugin().prometheus_config
    source = {"global": {"scrape_interval": "15s", "external_labels": {"a": "1"}},
              "rule_files": ["rules/x.yml", "/abs/y.yml"],
              "scrape_configs": [
                  {"job_name": "j", "scrape_interval": "5s",
                   "file_sd_configs": [{"files": ["targets/*.yml"], "refresh_interval": "1m"}]},
                  {"job_name": "k", "static_configs": [{"targets": ["h:1"]}]}]}
    kept = yaml.safe_dump(source)
    config = render(source, rules_dir="/r", file_sd_dir="/t/",
                    scrape_config_overrides={"k": {"static_configs": [{"targets": ["h:2"]}],
                                                   "basic_auth": {"username": "u"}}},
                    global_settings={"external_labels": {"b": "2"}},
                    remote_write=[{"url": "http://vm/api/v1/write"}])
    assert yaml.safe_dump(source) == kept  # the source is not changed
    assert config == {
        "global": {"scrape_interval": "15s", "external_labels": {"a": "1", "b": "2"}},
        "rule_files": ["/r/x.yml", "/abs/y.yml"],
        "scrape_configs": [
            {"job_name": "j", "scrape_interval": "5s",
             "file_sd_configs": [{"files": ["/t/*.yml"], "refresh_interval": "1m"}]},
            {"job_name": "k", "static_configs": [{"targets": ["h:2"]}],
             "basic_auth": {"username": "u"}}],
        "remote_write": [{"url": "http://vm/api/v1/write", "write_relabel_configs": [
            {"action": "labeldrop", "regex": "runbook_url"}]}]}
    faster = render(source, rules_dir="/r", file_sd_dir="/t", without_jobs=["k"],
                    global_settings={"scrape_interval": "1s"})
    assert [job["job_name"] for job in faster["scrape_configs"]] == ["j"]
    assert "scrape_interval" not in faster["scrape_configs"][0]
    with pytest.raises(ValueError, match="no scrape job nope"):
        render(source, rules_dir="/r", file_sd_dir="/t", scrape_config_overrides={"nope": {}})


def test_prometheus_rendering_points_at_the_alertmanagers_with_their_credentials() -> None:
    """Alertmanager targets and client settings reach both the alerting block and the
    alertmanager job; Prometheus' own address and credentials its self-scrape job; the runbook
    URL the external label the alerts' runbook_url annotations start with."""
    plugin = _prometheus_config_plugin()
    render = plugin.prometheus_config
    source = {"global": {"external_labels": {"site": "lab"}},
              "alerting": {"alertmanagers": [
                  {"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]},
              "scrape_configs": [
                  {"job_name": "prometheus", "static_configs": [{"targets": ["127.0.0.1:9090"]}]},
                  {"job_name": "alertmanager",
                   "static_configs": [{"targets": ["127.0.0.1:9093"]}]}]}
    alertmanager_auth = {"basic_auth": {"username": "prometheus",
                                        "password_file": "/etc/prometheus/am-password"}}
    prometheus_auth = {"scheme": "https", "tls_config": {"ca_file": "/etc/prometheus/ca.pem"},
                       "basic_auth": {"username": "prometheus",
                                      "password_file": "/etc/prometheus/self-password"}}
    config = render(source, rules_dir="/r", file_sd_dir="/t",
                    alertmanagers=["am1:9093", "[fe80::1]:9093"],
                    alertmanager_client=alertmanager_auth,
                    prometheus_address="prom.lab:9090", prometheus_client=prometheus_auth,
                    runbook_url="https://gpus.lab:9840/runbook")
    am_targets = {"static_configs": [{"targets": ["am1:9093", "[fe80::1]:9093"]}]}
    assert config["alerting"] == {"alertmanagers": [{**am_targets, **alertmanager_auth}]}
    assert config["scrape_configs"] == [
        {"job_name": "prometheus", "static_configs": [{"targets": ["prom.lab:9090"]}],
         **prometheus_auth},
        {"job_name": "alertmanager", **am_targets, **alertmanager_auth}]
    assert config["global"]["external_labels"] == {
        "site": "lab", plugin.RUNBOOK_URL_LABEL: "https://gpus.lab:9840/runbook"}
    # Without them, the source's alerting block and jobs are kept as they are.
    assert render(source, rules_dir="/r", file_sd_dir="/t")["alerting"] == source["alerting"]
    # A scrape override still wins over the rendering's own settings.
    overridden = render(source, rules_dir="/r", file_sd_dir="/t", alertmanagers=["am1:9093"],
                        scrape_config_overrides={"alertmanager": {"scheme": "https"}})
    assert overridden["scrape_configs"][1]["scheme"] == "https"
    with pytest.raises(ValueError, match="'am1' is not HOST:PORT"):
        render(source, rules_dir="/r", file_sd_dir="/t", alertmanagers=["am1"])
    bare = {"scrape_configs": [{"job_name": "gpuwatch"}]}
    with pytest.raises(ValueError, match="no scrape job alertmanager"):
        render(bare, rules_dir="/r", file_sd_dir="/t", alertmanagers=["am1:9093"])
    with pytest.raises(ValueError, match=r"no alerting\.alertmanagers block"):
        render({**bare, "scrape_configs": source["scrape_configs"]}, rules_dir="/r",
               file_sd_dir="/t", alertmanagers=["am1:9093"])


def test_the_repositorys_prometheus_yml_has_what_the_rendering_changes() -> None:
    """The jobs and the block the role points at the deployment's Prometheus and Alertmanagers
    are in prometheus/prometheus.yml, and the alerts' runbook URLs start with the label."""
    plugin = _prometheus_config_plugin()
    source = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    config = plugin.prometheus_config(
        source, rules_dir="/r", file_sd_dir="/t", alertmanagers=["am:9093"],
        alertmanager_client={"basic_auth": {"username": "u", "password_file": "/p"}},
        prometheus_address="prom:9090", runbook_url="http://serve:9840/runbook")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[plugin.ALERTMANAGER_JOB]["basic_auth"]["username"] == "u"
    assert jobs[plugin.PROMETHEUS_JOB]["static_configs"] == [{"targets": ["prom:9090"]}]
    label = source["global"]["external_labels"][plugin.RUNBOOK_URL_LABEL]
    assert label.startswith("http")


def test_role_plugins_pass_ruff_and_mypy() -> None:
    """The roles' filter plugins are Python outside src/ and tools/: held to the same rules."""
    plugins = [str(p) for p in sorted(ROLES.glob("*/filter_plugins/*.py"))]
    assert len(plugins) == 3, plugins
    for command in ([_tool("ruff"), "check", *plugins],
                    [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *plugins]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr


def test_reservations_unit_passes_the_optional_flags_of_gpuwatch_serve(tmp_path: Path) -> None:
    """The role's configure step alone, with admins, a web config and a proxy header set: the
    unit's ExecStart= gives `gpuwatch serve` each of them, quoted as systemd reads them back."""
    if os.geteuid() != 0:
        pytest.skip("the configure step sets root:GROUP on the file's directory")
    booking = tmp_path / "lab book/reservations.yml"
    variables = {
        "gpuwatch_reservations_file": str(booking),
        "gpuwatch_reservations_booking_group": "root",
        "gpuwatch_reservations_install_dir": "/opt/gv",
        "gpuwatch_reservations_profile_script": "",
        "gpuwatch_reservations_command_link": "",
        "gpuwatch_reservations_systemd_unit_dir": str(tmp_path),
        "gpuwatch_reservations_prometheus_url": "http://prom.lab:9090",
        "gpuwatch_reservations_admins": ["root", "ops"],
        "gpuwatch_reservations_web_config_file": "/etc/gpuwatch/web config.yml",
        "gpuwatch_reservations_auth_header": "X-Forwarded-User",
        "gpuwatch_reservations_trusted_proxies": ["127.0.0.1", "10.0.0.0/8"],
        "gpuwatch_reservations_prometheus_password": "pw",
        "gpuwatch_reservations_credentials_file": str(tmp_path / "creds/serve.env"),
        "_gpuwatch_reservations_systemd_running": False,
    }
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(variables))
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [{"ansible.builtin.import_role": {"name": "gpuwatch_reservations",
                                                   "tasks_from": "configure"}}]}]))
    shutil.copytree(ROLES, tmp_path / "roles")
    result = subprocess.run(
        [_tool("ansible-playbook"), "-i", "localhost,", "-e", f"@{tmp_path / 'vars.yml'}",
         "-e", f"ansible_python_interpreter={sys.executable}", str(tmp_path / "play.yml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**_ansible_env(tmp_path), "ANSIBLE_ROLES_PATH": str(tmp_path / "roles"),
             # what importing gpuwatch_common's install step loads in site.yml
             "ANSIBLE_FILTER_PLUGINS": str(tmp_path / "roles/gpuwatch_common/filter_plugins")})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    text = (tmp_path / "gpuwatch-reservations.service").read_text()
    assert f'ReadWritePaths="{booking.parent}"' in text
    service = _unit(tmp_path / "gpuwatch-reservations.service")["Service"]
    assert service["EnvironmentFile"] == [str(tmp_path / "creds/serve.env")]
    (command,) = service["ExecStart"]
    assert " ".join(command.split()) == " ".join([  # the words, one space apart
        "/opt/gv/venv/bin/gpuwatch", "serve", "--web.listen-address=127.0.0.1:9840",
        f'"--reservations.file={booking}"', "--prometheus=http://prom.lab:9090",
        "--log.level=info", "--admins=root,ops",
        '"--web.config.file=/etc/gpuwatch/web config.yml"',
        "--web.auth-header=X-Forwarded-User", "--web.trusted-proxies=127.0.0.1,10.0.0.0/8"])


# --- a real deployment to this machine ---------------------------------------------------------

@dataclass(frozen=True)
class Deployment:
    root: Path
    source: Path
    port: int
    reservations_port: int
    password: str
    cert: Path
    unit: Path
    runs: tuple[str, str, str]
    """The first run, the second run, and a --check --diff run after them."""
    python_usable_by_others: bool

    @property
    def venv(self) -> Path:
        return self.root / "opt/gpuwatch-exporter/venv"

    @property
    def reservations_venv(self) -> Path:
        return self.root / "opt/gpuwatch-reservations/venv"

    @property
    def exporter_config_dir(self) -> Path:
        return self.root / "etc/gpuwatch-exporter"

    @property
    def prometheus_dir(self) -> Path:
        return self.root / "etc/prometheus"

    @property
    def reservations_file(self) -> Path:
        return self.root / "var/lib/gpuwatch/reservations/reservations.yml"

    @property
    def reservations_unit(self) -> Path:
        return self.root / "etc/systemd/system/gpuwatch-reservations.service"

    @property
    def client_password_file(self) -> Path:
        return self.prometheus_dir / "gpuwatch-client-password"

    @property
    def credentials_file(self) -> Path:
        return self.root / "etc/gpuwatch/reservations-prometheus.env"


def _readable_by_others(path: Path) -> bool:
    """Whether a user outside the owner and group can reach and execute this file."""
    real = path.resolve()
    if not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)


def _venv_python() -> tuple[str, bool]:
    """The interpreter for the deployed venv: one of this Python's version (the wheelhouse is
    built for it) that can make venvs, preferably one the service user may execute."""
    candidates = ["/usr/bin/python3", sys.executable]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    usable = []
    for candidate in candidates:
        if not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys, venv, ensurepip; "
             "print(f'{sys.version_info.major}.{sys.version_info.minor}')"],
            capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            usable.append(candidate)
    assert usable, f"no Python {version} with venv and ensurepip among {candidates}"
    for candidate in usable:
        # The venv's python links to the base interpreter, which the service user must reach.
        base = subprocess.run([candidate, "-c", "import sys; print(sys._base_executable)"],
                              capture_output=True, text=True, check=True).stdout.strip()
        if _readable_by_others(Path(base)):
            return candidate, True
    return usable[0], False


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    # Test-only key in a throwaway directory: readable by the service user, whose group the
    # playbook only creates later.
    cert_file.chmod(0o644)
    key_file.chmod(0o644)
    return cert_file, key_file


def _snapshot(destination: Path) -> Path:
    """A copy of what the roles read from the checkout: the package source, prometheus/ and
    grafana/. The runs compared for idempotence then see the same files even while someone
    edits the working tree."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("src", "prometheus", "grafana"):
        shutil.copytree(REPO / name, destination / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, destination / name)
    return destination


def _dpkg_installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    result = subprocess.run(["dpkg-query", "--show", "--showformat=${db:Status-Status}", package],
                            capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() == "installed"


def _playbook_argv(root: Path, extra: list[str]) -> list[str]:
    return [*_without_network(), _tool("ansible-playbook"), "-i", str(root / "inventory.yml"),
            "-e", f"@{root / 'vars.yml'}", "site.yml", *extra]


def _playbook(root: Path, extra: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_playbook_argv(root, extra), cwd=ANSIBLE_DIR, env=_ansible_env(root),
                          capture_output=True, text=True, timeout=timeout)


# The vault of the deployment: the users of Prometheus and Alertmanager with their passwords,
# which reach the hosts only as bcrypt hashes (and, for the clients, in files only they read).
# Grafana's holds a $ (Grafana expands $NAME in provisioning values), gpuwatch serve's the
# characters an EnvironmentFile= line escapes.
WEB_USERS = {"prometheus": "pw-prometheus-" + os.urandom(9).hex(),
             "grafana": "pw-grafana-$HOME-" + os.urandom(9).hex(),
             "gpuwatch-serve": 'pw serve "$x" \\ `y` ' + os.urandom(9).hex()}
ALERT_USERS = {"alice": {"email": "alice@example.org"},
               "bob": {"webhook_url": "http://127.0.0.1:9/hooks/bob"}}
ALERT_ADMINS = {"email": "gpu-admins@example.org"}
SMTP = {"smtp_smarthost": "127.0.0.1:25", "smtp_from": "gpuwatch@example.org",
        "smtp_auth_username": "gpuwatch", "smtp_auth_password": "pw-smtp-" + os.urandom(6).hex()}

# Grafana cannot be installed or started here: its configuration is deployed all the same.
SKIP_GRAFANA_INSTALL = ["--skip-tags", "gpuwatch_grafana_install,gpuwatch_grafana_run"]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    if os.geteuid() != 0:
        pytest.skip("the localhost deployment needs root (it creates the exporter's system user)")
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: scripts/ensure-prometheus installs it (make test runs it)")

    root = Path(tempfile.mkdtemp(prefix="gpuwatch-ansible-"))
    root.chmod(0o755)  # the service user reaches the venv and its configuration below it
    try:
        # Everything pip needs, fetched before the playbook runs (pip's cache makes it quick), so
        # that the playbook itself installs with --no-index.
        source = _snapshot(root / "checkout")
        wheelhouse = root / "wheelhouse"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                        "--disable-pip-version-check", "-d", str(wheelhouse), str(source),
                        "setuptools>=68", "wheel"],
                       check=True, capture_output=True, text=True, timeout=300)
        python, usable_by_others = _venv_python()
        tls_dir = root / "tls"
        tls_dir.mkdir(mode=0o755)
        tls_dir.chmod(0o755)
        cert, key = _self_signed_cert(tls_dir)
        password = base64.urlsafe_b64encode(os.urandom(12)).decode()
        password_file = tls_dir / "scrape-password"
        password_file.write_text(password)
        import bcrypt
        port = _free_port()
        reservations_port = _free_port()

        inventory = {"all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "gpu_nodes": {"hosts": {"localhost": {"cluster": "ci", "rack": "r00"}}},
                "monitoring": {"hosts": {"localhost": None}},
            }}}
        etc = root / "etc"
        variables = {
            # exporter
            "gpuwatch_exporter_checkout_dir": str(source),
            "gpuwatch_exporter_install_dir": str(root / "opt/gpuwatch-exporter"),
            "gpuwatch_exporter_config_dir": str(etc / "gpuwatch-exporter"),
            "gpuwatch_exporter_systemd_unit_dir": str(etc / "systemd/system"),
            "gpuwatch_exporter_python": python,
            "gpuwatch_exporter_system_packages": [],
            "gpuwatch_exporter_build_pip_args": ["--no-index", "--find-links", str(wheelhouse)],
            "gpuwatch_exporter_wheelhouse_dir": str(wheelhouse),
            "gpuwatch_exporter_web_listen_address": f"127.0.0.1:{port}",
            "gpuwatch_exporter_tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
            "gpuwatch_exporter_basic_auth_users": {
                SCRAPE_USER: bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()},
            "gpuwatch_exporter_display_names": {SCENARIO_MODEL: DISPLAY_NAME},
            "gpuwatch_exporter_simulate": "workstation",
            # prometheus
            "gpuwatch_prometheus_source_dir": str(source / "prometheus"),
            "gpuwatch_prometheus_packages": ["prometheus"] if _dpkg_installed("prometheus") else [],
            "gpuwatch_prometheus_config_dir": str(etc / "prometheus"),
            "gpuwatch_prometheus_defaults_file": str(etc / "default/prometheus"),
            "gpuwatch_prometheus_scrape_config_overrides": {
                "gpuwatch": {
                    "tls_config": {"ca_file": str(cert)},
                    "basic_auth": {"username": SCRAPE_USER, "password_file": str(password_file)}},
                "gpuwatch-reservations": {
                    "static_configs": [{"targets": [f"127.0.0.1:{reservations_port}"]}]}},
            "gpuwatch_prometheus_external_labels": {"site": "ci"},
            # access: basic_auth (the default) with the vault's users and passwords
            "gpuwatch_prometheus_basic_auth_users": WEB_USERS,
            "gpuwatch_prometheus_runbook_url": f"http://localhost:{reservations_port}/runbook",
            # alertmanager, in the same configuration directory as Prometheus (as Debian has it)
            "gpuwatch_alertmanager_source_dir": str(source / "prometheus/alertmanager"),
            "gpuwatch_alertmanager_packages":
                ["prometheus-alertmanager"] if _dpkg_installed("prometheus-alertmanager") else [],
            "gpuwatch_alertmanager_config_dir": str(etc / "prometheus"),
            "gpuwatch_alertmanager_defaults_file": str(etc / "default/prometheus-alertmanager"),
            "gpuwatch_alertmanager_users": ALERT_USERS,
            "gpuwatch_alertmanager_admins": ALERT_ADMINS,
            "gpuwatch_alertmanager_smtp": SMTP,
            # reservations: installed as the exporter is, in a venv of its own; the booking group
            # is the exporter's, so no other group is created
            "gpuwatch_reservations_checkout_dir": str(source),
            "gpuwatch_reservations_install_dir": str(root / "opt/gpuwatch-reservations"),
            "gpuwatch_reservations_python": python,
            "gpuwatch_reservations_system_packages": [],
            "gpuwatch_reservations_build_pip_args": ["--no-index", "--find-links", str(wheelhouse)],
            "gpuwatch_reservations_wheelhouse_dir": str(wheelhouse),
            "gpuwatch_reservations_file":
                str(root / "var/lib/gpuwatch/reservations/reservations.yml"),
            "gpuwatch_reservations_booking_group": EXPORTER_GROUP,
            "gpuwatch_reservations_web_listen_address": f"127.0.0.1:{reservations_port}",
            "gpuwatch_reservations_profile_script": str(etc / "profile.d/gpuwatch.sh"),
            "gpuwatch_reservations_command_link": str(root / "usr/local/bin/gpuwatch"),
            "gpuwatch_reservations_systemd_unit_dir": str(etc / "systemd/system"),
            "gpuwatch_reservations_credentials_file":
                str(etc / "gpuwatch/reservations-prometheus.env"),
            # grafana (configuration only)
            "gpuwatch_grafana_source_dir": str(source / "grafana"),
            "gpuwatch_grafana_admin_password": "test-only-" + password,
            "gpuwatch_grafana_system_group": "root",
            "gpuwatch_grafana_provisioning_dir": str(etc / "grafana/provisioning"),
            "gpuwatch_grafana_dashboards_dir": str(root / "var/lib/grafana/dashboards/gpuwatch"),
            "gpuwatch_grafana_systemd_dropin_dir":
                str(etc / "systemd/system/grafana-server.service.d"),
            "gpuwatch_grafana_admin_password_file": str(etc / "grafana/gpuwatch-admin-password"),
            # Never touch the services of the machine running the tests, even where systemd is
            # PID 1: the roles' own detection says no here, these extra vars say it everywhere.
            "_gpuwatch_exporter_systemd_running": False,
            "_gpuwatch_prometheus_systemd_running": False,
            "_gpuwatch_reservations_systemd_running": False,
            "_gpuwatch_grafana_systemd_running": False,
            "_gpuwatch_alertmanager_systemd_running": False,
        }
        for directory in ("systemd/system", "default", "grafana", "profile.d"):
            (etc / directory).mkdir(parents=True, exist_ok=True)
        (root / "usr/local/bin").mkdir(parents=True)
        (root / "inventory.yml").write_text(yaml.safe_dump(inventory))
        (root / "vars.yml").write_text(yaml.safe_dump(variables))

        first = _playbook(root, SKIP_GRAFANA_INSTALL)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        second = _playbook(root, SKIP_GRAFANA_INSTALL)
        assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
        check = _playbook(root, [*SKIP_GRAFANA_INSTALL, "--check", "--diff"])
        assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-3000:]
        yield Deployment(root=root, source=source, port=port,
                         reservations_port=reservations_port, password=password, cert=cert,
                         unit=etc / "systemd/system/gpuwatch-exporter.service",
                         runs=(first.stdout, second.stdout, check.stdout),
                         python_usable_by_others=usable_by_others)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_first_run_installs_everything(deployment: Deployment) -> None:
    recap = _recap(deployment.runs[0])
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    assert recap["changed"] > 0
    # The exporter, Prometheus, Alertmanager and reservations roles say they started nothing
    # (Grafana's run tasks are skipped).
    assert deployment.runs[0].count("systemd is not PID 1") == 4


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    recap = _recap(deployment.runs[1])
    assert recap["failed"] == 0
    assert recap["changed"] == 0, "\n".join(_changed_tasks(deployment.runs[1]))


def test_check_mode_after_a_deployment_predicts_no_change(deployment: Deployment) -> None:
    """`--check --diff` is how the README previews a change: it must not cry wolf."""
    recap = _recap(deployment.runs[2])
    assert recap["failed"] == 0
    assert recap["changed"] == 0, "\n".join(_changed_tasks(deployment.runs[2]))


def test_service_user_is_unprivileged_and_may_open_the_gpus(deployment: Deployment) -> None:
    user = pwd.getpwnam(EXPORTER_USER)
    assert 0 < user.pw_uid < 1000
    assert user.pw_shell == "/usr/sbin/nologin"
    assert grp.getgrgid(user.pw_gid).gr_name == EXPORTER_GROUP
    assert EXPORTER_USER in grp.getgrnam("video").gr_mem
    unit = _unit(deployment.unit)
    assert unit["Service"]["SupplementaryGroups"] == ["video"]


def test_configuration_files_are_rendered_from_the_variables(deployment: Deployment) -> None:
    config_dir = deployment.exporter_config_dir
    config = yaml.safe_load((config_dir / "config.yml").read_text())
    assert config == {"display_names": {SCENARIO_MODEL: DISPLAY_NAME}}
    web = yaml.safe_load((config_dir / "web-config.yml").read_text())
    assert web["tls_server_config"] == {"cert_file": str(deployment.cert),
                                        "key_file": str(deployment.cert.with_name("key.pem"))}
    assert list(web["basic_auth_users"]) == [SCRAPE_USER]
    assert web["basic_auth_users"][SCRAPE_USER].startswith("$2")
    for name in ("config.yml", "web-config.yml"):
        st = (config_dir / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, name
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0, EXPORTER_GROUP), name
    assert (deployment.venv / "bin/gpuwatch-exporter").is_file()


def test_both_venvs_hold_the_gpuwatch_distribution(deployment: Deployment) -> None:
    import gpuwatch

    for venv in (deployment.venv, deployment.reservations_venv):
        shown = subprocess.run([str(venv / "bin/python"), "-m", "pip", "show", "--no-input",
                                "--disable-pip-version-check", gpuwatch.DISTRIBUTION],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"Name: {gpuwatch.DISTRIBUTION}" in shown.stdout


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> values (keys may repeat), continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value.strip())
    return sections


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze not found: scripts/ensure-systemd-analyze installs it")
    return found


def test_exporter_unit_passes_systemd_analyze_verify(deployment: Deployment) -> None:
    result = subprocess.run([_systemd_analyze(), "verify", "--man=no", str(deployment.unit)],
                            capture_output=True, text=True, timeout=60)
    # verify only warns about unknown or unparsable settings: any output is a mistake.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_exporter_unit_exposure_stays_low(deployment: Deployment) -> None:
    """systemd's own score (0 best, 10 worst); what is left open is what NVML and /proc need."""
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", "--threshold=20", "--no-pager",
         str(deployment.unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_exporter_unit_is_hardened_but_sees_gpus_and_processes(deployment: Deployment) -> None:
    service = _unit(deployment.unit)["Service"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "ProtectKernelModules": "yes",
                       "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
                       "CapabilityBoundingSet": "", "DevicePolicy": "closed",
                       "User": EXPORTER_USER}.items():
        assert service.get(key) == [value], key
    # PrivateDevices= hides /dev/nvidia*; PrivateUsers= and ProtectProc=invisible hide other
    # users' processes, which the exporter attributes GPU memory to.
    assert "PrivateDevices" not in service and "PrivateUsers" not in service
    assert service["ProtectProc"] == ["default"] and service["ProcSubset"] == ["all"]
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(service["DeviceAllow"])


def test_grafana_dropin_passes_systemd_analyze_verify(
        deployment: Deployment, tmp_path: Path) -> None:
    """The drop-in next to a stand-in grafana-server.service (Grafana is not installed here)."""
    unit_dir = tmp_path / "units"
    shutil.copytree(deployment.root / "etc/systemd/system/grafana-server.service.d",
                    unit_dir / "grafana-server.service.d")
    (unit_dir / "grafana-server.service").write_text(
        "[Unit]\nDescription=stand-in\n[Service]\nExecStart=/bin/true\n")
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:")
    result = subprocess.run([_systemd_analyze(), "verify", "--man=no", "grafana-server.service"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr
    dropin = (unit_dir / "grafana-server.service.d/gpuwatch.conf").read_text()
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE=" in dropin and "test-only-" not in dropin


def test_grafana_provisioning_is_the_checkouts_with_the_deployments_places(
        deployment: Deployment) -> None:
    """The shipped files, every line and comment kept, with the datasource URL and the
    dashboards directory of the deployment (the URL is the role's default here)."""
    deployed = deployment.root / "etc/grafana/provisioning"
    shipped = deployment.source / "grafana/provisioning"
    source, provider = provisioned(deployed)
    shipped_source, shipped_provider = provisioned(shipped)
    # The same datasource, with the basic auth of the default access added (tested below).
    added = {"basicAuth", "basicAuthUser", "secureJsonData"}
    assert {k: v for k, v in source.items() if k not in added} == shipped_source, \
        "the role's default URL is the shipped one"
    dashboards = Path(provider["options"]["path"])
    assert dashboards == deployment.root / "var/lib/grafana/dashboards/gpuwatch"
    assert sorted(p.name for p in dashboards.glob("*.json")) == \
        sorted(p.name for p in (deployment.source / "grafana/dashboards").glob("*.json"))
    assert provider == {**shipped_provider,
                        "options": {**shipped_provider["options"], "path": str(dashboards)}}
    for path in sorted(shipped.glob("*/*.yml")):
        copy = (deployed / path.parent.name / path.name).read_text().splitlines()
        kept = [line for line in path.read_text().splitlines()
                if not re.match(r" +(url|path): ", line)]
        assert [line for line in copy if line in kept] == kept, path


@pytest.mark.parametrize("url", ["https://prom.example.org:9443/prometheus?a=1&b=2",
                                 'http://127.0.0.1:9090/x\\1"y\'z#w'])
def test_grafana_datasource_gets_any_prometheus_url(
        deployment: Deployment, tmp_path: Path, url: str) -> None:
    variables = yaml.safe_load((deployment.root / "vars.yml").read_text())
    variables.update(gpuwatch_grafana_prometheus_url=url,
                     gpuwatch_grafana_provisioning_dir=str(tmp_path / "provisioning"))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(variables))
    shutil.copy(deployment.root / "inventory.yml", tmp_path / "inventory.yml")
    result = _playbook(tmp_path, ["--tags", "gpuwatch_grafana_configure"])
    assert result.returncode == 0, result.stdout[-4000:]
    source, _ = provisioned(tmp_path / "provisioning")
    assert source["url"] == url


def test_rendered_prometheus_config_passes_promtool(deployment: Deployment) -> None:
    config = deployment.prometheus_dir / "prometheus.yml"
    result = subprocess.run(["promtool", "check", "config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(config.read_text())
    source = yaml.safe_load((deployment.source / "prometheus/prometheus.yml").read_text())
    assert [Path(f).name for f in rendered["rule_files"]] == \
        [Path(f).name for f in source["rule_files"]]
    assert all(Path(f).is_file() for f in rendered["rule_files"])
    runbook = f"http://localhost:{deployment.reservations_port}/runbook"
    assert rendered["global"]["external_labels"] == {"site": "ci", "runbook_url": runbook}
    assert "remote_write" not in rendered  # off unless asked for
    variables = yaml.safe_load((deployment.root / "vars.yml").read_text())
    # Prometheus reaches itself and Alertmanager as its client user, with the password in a file.
    client = {"basic_auth": {"username": "prometheus",
                             "password_file": str(deployment.client_password_file)}}
    assert rendered == _prometheus_config_plugin().prometheus_config(
        source, rules_dir=str(deployment.prometheus_dir / "rules"),
        file_sd_dir=str(deployment.prometheus_dir / "targets"),
        scrape_config_overrides=variables["gpuwatch_prometheus_scrape_config_overrides"],
        global_settings={"external_labels": {"site": "ci"}},
        alertmanagers=["127.0.0.1:9093"], alertmanager_client=client,
        prometheus_address="127.0.0.1:9090", prometheus_client=client, runbook_url=runbook)


def _flags(defaults_file: Path) -> list[str]:
    """The flags in ARGS="..." of a Debian service's /etc/default file."""
    (line,) = [line for line in defaults_file.read_text().splitlines()
               if line.startswith("ARGS=")]
    return shlex.split(line.removeprefix("ARGS="))[0].split()


def _owner(path: Path) -> tuple[int, str, str]:
    st = path.stat()
    return (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
            grp.getgrgid(st.st_gid).gr_name)


def test_web_configs_hold_bcrypt_hashes_of_the_vault_passwords_and_no_password(
        deployment: Deployment) -> None:
    """basic_auth access (the default): Prometheus and Alertmanager each get a web configuration
    with one bcrypt hash per user of the vault, and the flag that reads it."""
    import bcrypt

    for name, flags in (("web-config.yml", "default/prometheus"),
                        ("alertmanager-web-config.yml", "default/prometheus-alertmanager")):
        path = deployment.prometheus_dir / name
        text = path.read_text()
        web = yaml.safe_load(text)
        assert set(web) == {"basic_auth_users"}, name  # no TLS asked for
        assert web["basic_auth_users"].keys() == WEB_USERS.keys(), name
        for user, password in WEB_USERS.items():
            hashed = web["basic_auth_users"][user]
            assert hashed.startswith("$2b$10$"), (name, user)
            assert bcrypt.checkpw(password.encode(), hashed.encode()), (name, user)
            assert password not in text, (name, user)
        assert _owner(path) == (0o640, "root", "prometheus"), name
        assert f"--web.config.file={path}" in _flags(deployment.root / "etc" / flags)
    check = subprocess.run(["promtool", "check", "web-config",
                            str(deployment.prometheus_dir / "web-config.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # Prometheus' own password, for its requests to itself and to Alertmanager.
    assert deployment.client_password_file.read_text() == WEB_USERS["prometheus"]
    assert _owner(deployment.client_password_file) == (0o640, "root", "prometheus")
    # In no other file the run wrote is any password of the vault in the clear, except in the
    # files of the clients that send it.
    clients = {deployment.client_password_file, deployment.credentials_file,
               deployment.root / "etc/grafana/provisioning/datasources/gpuwatch.yml"}
    for path in sorted((deployment.root / "etc").rglob("*")):
        if path.is_file() and path not in clients:
            text = path.read_text(errors="replace")
            assert not [u for u, pw in WEB_USERS.items() if pw in text], path


def test_alertmanager_config_is_the_inventorys_routing_and_passes_amtool(
        deployment: Deployment) -> None:
    """The rendered alertmanager.yml is the filter's rendering of the checkout's base with the
    inventory's users, admins and SMTP settings; amtool accepts it and routes each user's alert
    to their receiver, hardware alerts and unknown users to the admins."""
    import importlib.util

    config = deployment.prometheus_dir / "alertmanager.yml"
    check = subprocess.run(["amtool", "check-config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    plugin = ROLES / "gpuwatch_alertmanager/filter_plugins/gpuwatch_alertmanager.py"
    spec = importlib.util.spec_from_file_location("gpuwatch_alertmanager_filter", plugin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = yaml.safe_load((deployment.source / "prometheus/alertmanager/alertmanager.yml")
                          .read_text())
    assert yaml.safe_load(config.read_text()) == module.alertmanager_config(
        base, ALERT_USERS, ALERT_ADMINS, global_settings=SMTP)
    assert _owner(config) == (0o640, "root", "prometheus")  # it holds the SMTP password

    def receiver(*labels: str) -> str:
        result = subprocess.run(["amtool", "config", "routes", "test",
                                 f"--config.file={config}", *labels],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    assert receiver("alertname=GpuHeldIdle", "audience=user", "user=alice") == "user-alice"
    assert receiver("alertname=GpuHeldIdle", "audience=user", "user=bob") == "user-bob"
    assert receiver("alertname=GpuHeldIdle", "audience=user", "user=carol") == "admins"
    assert receiver("alertname=GpuXid", "audience=admins", "host=localhost") == "admins"
    args = _flags(deployment.root / "etc/default/prometheus-alertmanager")
    assert f"--config.file={config}" in args
    assert "--cluster.listen-address=" in args  # no gossip port for a single Alertmanager
    assert "--web.listen-address=0.0.0.0:9093" in args


@contextlib.contextmanager
def _service(argv: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that answers `url` (any HTTP status), stopped afterwards."""
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield process
    finally:
        end_process(process, 20)


def _status(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_prometheus_and_alertmanager_ask_for_the_vaults_passwords(
        deployment: Deployment, tmp_path: Path) -> None:
    """The real Prometheus and Alertmanager with the rendered configurations and web
    configurations on 127.0.0.1: each refuses a request without the password or with a wrong
    one and answers the vault's; Prometheus scrapes itself and Alertmanager and finds
    Alertmanager for its alerts with its client user's password file."""
    if shutil.which("prometheus-alertmanager") is None:
        pytest.fail("prometheus-alertmanager not found: scripts/ensure-alertmanager installs it")
    prometheus_port, alertmanager_port = _free_port(), _free_port()
    dirs = deployment.prometheus_dir
    config = yaml.safe_load((dirs / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = []  # alerts are not this test's subject
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    for job in config["scrape_configs"]:
        port = {"prometheus": prometheus_port, "alertmanager": alertmanager_port}.get(
            job["job_name"])
        if port is not None:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    fast = tmp_path / "prometheus.yml"
    fast.write_text(yaml.safe_dump(config))
    am_url = f"http://127.0.0.1:{alertmanager_port}"
    prom_url = f"http://127.0.0.1:{prometheus_port}"
    with _service(["prometheus-alertmanager", f"--config.file={dirs / 'alertmanager.yml'}",
                   f"--web.config.file={dirs / 'alertmanager-web-config.yml'}",
                   f"--web.listen-address=127.0.0.1:{alertmanager_port}",
                   "--cluster.listen-address=", f"--storage.path={tmp_path / 'am'}"],
                  am_url + "/-/ready", tmp_path / "alertmanager.log"), \
         _service(["prometheus", f"--config.file={fast}",
                   f"--web.config.file={dirs / 'web-config.yml'}",
                   f"--storage.tsdb.path={tmp_path / 'data'}",
                   f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                  prom_url + "/-/ready", tmp_path / "prometheus.log"):
        for url in (am_url + "/-/ready", prom_url + "/-/ready"):
            assert _status(url)[0] == 401, url
            assert _status(url, ("grafana", WEB_USERS["prometheus"]))[0] == 401, url
            for user, password in WEB_USERS.items():
                assert _status(url, (user, password))[0] == 200, (url, user)
        auth = ("grafana", WEB_USERS["grafana"])
        query = prom_url + "/api/v1/query?" + urllib.parse.urlencode({"query": (
            'sum(up{job=~"prometheus|alertmanager"})'
            ' + sum(prometheus_notifications_alertmanagers_discovered)')})
        deadline = time.monotonic() + 60
        while True:
            status, body = _status(query, auth)
            assert status == 200, body
            result = json.loads(body)["data"]["result"]
            if result and result[0]["value"][1] == "3":  # both jobs up, one Alertmanager
                break
            assert time.monotonic() < deadline, (result, (tmp_path / "prometheus.log").read_text())
            time.sleep(0.5)


def test_grafana_datasource_logs_in_with_the_vaults_password(deployment: Deployment) -> None:
    """The provisioned datasource (never the repository's file) carries basic auth, the
    password in secureJsonData, $ doubled as Grafana's provisioning reads it back."""
    deployed = deployment.root / "etc/grafana/provisioning/datasources/gpuwatch.yml"
    (source,) = yaml.safe_load(deployed.read_text())["datasources"]
    assert source["basicAuth"] is True and source["basicAuthUser"] == "grafana"
    stored = source["secureJsonData"]["basicAuthPassword"]
    assert stored.replace("$$", "$") == WEB_USERS["grafana"] and "$$HOME" in stored
    assert "password" not in json.dumps(source.get("jsonData", {})).lower()
    assert _owner(deployed) == (0o640, "root", "root")  # the test's Grafana group is root
    shipped = (deployment.source / "grafana/provisioning/datasources/gpuwatch.yml").read_text()
    assert "basicAuth" not in shipped and "secureJsonData" not in shipped


def test_gpuwatch_serve_gets_its_prometheus_credentials_from_a_root_only_file(
        deployment: Deployment) -> None:
    """GPUWATCH_PROMETHEUS_USER/_PASSWORD in an EnvironmentFile= only root reads, never on
    the command line; the values as systemd reads them back (shell double-quote rules)."""
    path = deployment.credentials_file
    assert _owner(path) == (0o600, "root", "root")
    service = _unit(deployment.reservations_unit)["Service"]
    assert service["EnvironmentFile"] == [str(path)]
    assert WEB_USERS["gpuwatch-serve"] not in deployment.reservations_unit.read_text()
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, quoted = line.partition("=")
            assert quoted.startswith('"') and quoted.endswith('"'), line
            values[key] = re.sub(r'\\([\\"$`])', r"\1", quoted[1:-1])
    assert values == {"GPUWATCH_PROMETHEUS_USER": "gpuwatch-serve",
                      "GPUWATCH_PROMETHEUS_PASSWORD": WEB_USERS["gpuwatch-serve"]}


def test_targets_come_from_the_inventory(deployment: Deployment) -> None:
    targets = yaml.safe_load((deployment.prometheus_dir / "targets/gpu_nodes.yml").read_text())
    assert targets == [{"targets": [f"localhost:{deployment.port}"],
                        "labels": {"cluster": "ci", "rack": "r00", "__scheme__": "https"}}]


def test_remote_write_is_added_when_asked_for(deployment: Deployment, tmp_path: Path) -> None:
    remote_write = [{"url": "http://127.0.0.1:8428/api/v1/write",
                     "queue_config": {"max_samples_per_send": 10000}}]
    variables = yaml.safe_load((deployment.root / "vars.yml").read_text())
    variables.update(gpuwatch_prometheus_remote_write=remote_write,
                     gpuwatch_prometheus_config_dir=str(tmp_path / "prometheus"),
                     gpuwatch_prometheus_defaults_file=str(tmp_path / "prometheus.default"))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(variables))
    shutil.copy(deployment.root / "inventory.yml", tmp_path / "inventory.yml")
    result = _playbook(tmp_path, ["--tags", "gpuwatch_prometheus_configure"])
    assert result.returncode == 0, result.stdout[-4000:]
    config = tmp_path / "prometheus/prometheus.yml"
    # the runbook_url external label is for the alerts' links, not for every series sent
    assert yaml.safe_load(config.read_text())["remote_write"] == [
        {**block, "write_relabel_configs": [{"action": "labeldrop", "regex": "runbook_url"}]}
        for block in remote_write]
    check = subprocess.run(["promtool", "check", "config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_localhost_access_binds_prometheus_and_alertmanager_to_loopback_without_passwords(
        deployment: Deployment, tmp_path: Path) -> None:
    """The other access choice, configure steps only: both services on 127.0.0.1 (the ports of
    their listen addresses), no web configuration, no password file, no basic auth in
    prometheus.yml or the Grafana datasource."""
    variables = yaml.safe_load((deployment.root / "vars.yml").read_text())
    variables.update(gpuwatch_prometheus_access="localhost",
                     gpuwatch_prometheus_config_dir=str(tmp_path / "prometheus"),
                     gpuwatch_prometheus_defaults_file=str(tmp_path / "prometheus.default"),
                     gpuwatch_alertmanager_config_dir=str(tmp_path / "prometheus"),
                     gpuwatch_alertmanager_defaults_file=str(tmp_path / "alertmanager.default"),
                     gpuwatch_alertmanager_web_listen_address="0.0.0.0:19093",
                     gpuwatch_grafana_provisioning_dir=str(tmp_path / "provisioning"))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(variables))
    shutil.copy(deployment.root / "inventory.yml", tmp_path / "inventory.yml")
    result = _playbook(tmp_path, ["--tags", "gpuwatch_prometheus_configure,"
                                  "gpuwatch_alertmanager_configure,gpuwatch_grafana_configure"])
    assert result.returncode == 0, result.stdout[-4000:]
    prometheus = _flags(tmp_path / "prometheus.default")
    assert "--web.listen-address=127.0.0.1:9090" in prometheus
    alertmanager = _flags(tmp_path / "alertmanager.default")
    assert "--web.listen-address=127.0.0.1:19093" in alertmanager
    assert not [f for f in prometheus + alertmanager if f.startswith("--web.config.file")]
    assert sorted(p.name for p in (tmp_path / "prometheus").iterdir() if p.is_file()) == \
        ["alertmanager.yml", "prometheus.yml"]
    config = yaml.safe_load((tmp_path / "prometheus/prometheus.yml").read_text())
    assert config["alerting"]["alertmanagers"] == [
        {"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "basic_auth" not in jobs["prometheus"] and "basic_auth" not in jobs["alertmanager"]
    source, _ = provisioned(tmp_path / "provisioning")
    assert "basicAuth" not in source and "secureJsonData" not in source


# --- the deployed exporter, started with the unit's command line --------------------------------

def _exec_start(unit: Path) -> list[str]:
    (command,) = _unit(unit)["Service"]["ExecStart"]
    return command.split()


def _get(url: str, cafile: Path, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(cafile))
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.fixture(scope="module")
def exporter(deployment: Deployment) -> Iterator[str]:
    """The installed exporter, run with its unit's ExecStart= as the service user where possible."""
    command = _exec_start(deployment.unit)
    if deployment.python_usable_by_others:
        user = pwd.getpwnam(EXPORTER_USER)
        command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                   *command]
    log = deployment.root / "exporter.log"
    with log.open("w") as out:
        # As systemd starts a system unit: in /, not in the test's (maybe private) directory.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd="/",
                                   env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    base = f"https://localhost:{deployment.port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if _get(base + "/-/healthy", deployment.cert)[0] in (200, 401):
                    break
            except (OSError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield base
    finally:
        end_process(process, 10)


def test_deployed_exporter_serves_metrics_over_tls_with_basic_auth(
        deployment: Deployment, exporter: str) -> None:
    status, _ = _get(exporter + "/metrics", deployment.cert)
    assert status == 401
    status, body = _get(exporter + "/metrics", deployment.cert, (SCRAPE_USER, "wrong"))
    assert status == 401
    status, body = _get(exporter + "/metrics", deployment.cert, (SCRAPE_USER, deployment.password))
    assert status == 200
    info = [line for line in body.splitlines() if line.startswith("nvidia_gpu_info{")]
    assert len(info) == 4, body[:2000]  # the workstation scenario's four GPUs
    assert all(f'display_name="{DISPLAY_NAME}"' in line for line in info)
    assert 'user="alice"' in body


def test_deployed_exporter_runs_as_the_service_user(deployment: Deployment, exporter: str) -> None:
    if not deployment.python_usable_by_others:
        pytest.skip("this machine's Python for venvs lives where the service user cannot run it")
    status, _ = _get(exporter + "/metrics", deployment.cert, (SCRAPE_USER, deployment.password))
    assert status == 200  # it read its root:gpuwatch-exporter 0640 configuration


@contextlib.contextmanager
def _prometheus(deployment: Deployment, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A real Prometheus with the rendered prometheus.yml (scraping every second); yields a
    function that waits for an instant query to give a result and returns it."""
    port = _free_port()
    config = deployment.prometheus_dir / "prometheus.yml"
    # The repository's 15 s scrape interval; a faster copy keeps the test short.
    fast = yaml.safe_load(config.read_text())
    fast["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    fast_config = tmp_path / "prometheus.yml"
    fast_config.write_text(yaml.safe_dump(fast))
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={fast_config}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT)

    def query(expr: str) -> Any:
        url = f"http://127.0.0.1:{port}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        deadline = time.monotonic() + 60
        result: list[dict[str, Any]] = []
        while not result:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (expr, log.read_text())
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.load(response)["data"]["result"]
            except OSError:
                continue
        return result

    try:
        yield query
    finally:
        end_process(process, 20)


def test_prometheus_with_the_rendered_config_scrapes_the_exporter(
        deployment: Deployment, exporter: str, tmp_path: Path) -> None:
    with _prometheus(deployment, tmp_path) as query:
        (series,) = query('up{job="gpuwatch"}')
        assert series["value"][1] == "1", series
        assert series["metric"] == {"__name__": "up", "job": "gpuwatch", "host": "localhost",
                                    "instance": f"localhost:{deployment.port}",
                                    "cluster": "ci", "rack": "r00"}


# --- the deployed reservations: the file, the endpoint, a booking ------------------------------

def test_the_reservations_file_waits_in_a_directory_the_booking_group_may_write(
        deployment: Deployment) -> None:
    from gpuwatch import reservations

    directory = deployment.reservations_file.parent
    st = directory.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2775  # setgid, not sticky: bookers replace the file
    assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0, EXPORTER_GROUP)
    assert stat.S_IMODE(deployment.reservations_file.stat().st_mode) == 0o644
    now = datetime.datetime.now(datetime.timezone.utc)
    assert reservations.load(deployment.reservations_file, now) == []
    profile = (deployment.root / "etc/profile.d/gpuwatch.sh").read_text()
    assert f"export GPUWATCH_RESERVATIONS={deployment.reservations_file}" in profile
    link = deployment.root / "usr/local/bin/gpuwatch"
    assert link.is_symlink() and \
        link.resolve() == (deployment.reservations_venv / "bin/gpuwatch").resolve()


def test_reservations_unit_passes_systemd_analyze_verify_and_exposes_little(
        deployment: Deployment) -> None:
    unit = deployment.reservations_unit
    result = subprocess.run([_systemd_analyze(), "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr
    # It needs no GPU, no other process and no identity: it may expose less than the exporter.
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", "--threshold=15", "--no-pager",
         str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    service = _unit(unit)["Service"]
    assert service["DynamicUser"] == ["yes"] and service["PrivateDevices"] == ["yes"]
    # It writes in the file's directory (the file, its audit log), as a member of the booking group.
    directory = deployment.reservations_file.parent
    assert service["SupplementaryGroups"] == [EXPORTER_GROUP]
    assert service["ReadWritePaths"] == [str(directory)]
    (command,) = service["ExecStart"]
    assert command.split() == [
        str(deployment.reservations_venv / "bin/gpuwatch"), "serve",
        f"--web.listen-address=127.0.0.1:{deployment.reservations_port}",
        f"--reservations.file={deployment.reservations_file}",
        "--prometheus=http://127.0.0.1:9090", "--log.level=info"]
    for name, mode in ((".lock", 0o644), (".audit.jsonl", 0o664)):
        st = deployment.reservations_file.with_name(deployment.reservations_file.name + name).stat()
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert grp.getgrgid(st.st_gid).gr_name == EXPORTER_GROUP, name


def _as_nobody(command: list[str], groups: str = "") -> list[str]:
    """The command as an unprivileged user (and, with `groups`, in those groups)."""
    user = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
            f"--groups={groups}" if groups else "--clear-groups", *command]


def test_a_booking_by_a_member_of_the_booking_group_reaches_prometheus(
        deployment: Deployment, tmp_path: Path) -> None:
    """A person in the booking group books with the deployed gpuwatch; the endpoint, started
    with its unit's command line as another unprivileged user, serves it to Prometheus."""
    if not deployment.python_usable_by_others:
        pytest.skip("this machine's Python for venvs lives where other users cannot run it")
    group = str(grp.getgrnam(EXPORTER_GROUP).gr_gid)
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}
    booked = subprocess.run(
        _as_nobody([str(deployment.root / "usr/local/bin/gpuwatch"), "reserve", "localhost:1",
                    "--user", "alice", "--until", "+2d", "--comment", "deployed",
                    "--file", str(deployment.reservations_file)], group),
        capture_output=True, text=True, env=env, timeout=60)
    assert booked.returncode == 0, booked.stderr
    assert deployment.reservations_file.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    # Outside the booking group the same person may not write: the file's directory refuses.
    refused = subprocess.run(
        _as_nobody([str(deployment.reservations_venv / "bin/gpuwatch"), "reserve", "localhost:0",
                    "--until", "+1d", "--file", str(deployment.reservations_file)]),
        capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "Permission denied" in refused.stderr, refused.stderr

    (command,) = _unit(deployment.reservations_unit)["Service"]["ExecStart"]
    log = tmp_path / "endpoint.log"
    with log.open("w") as out:
        endpoint = subprocess.Popen(_as_nobody(command.split()), stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        with _prometheus(deployment, tmp_path) as query:
            (up,) = query('up{job="gpuwatch-reservations"} == 1')
            assert up["metric"]["instance"] == f"127.0.0.1:{deployment.reservations_port}"
            (series,) = query("nvidia_gpu_reservation_end_timestamp_seconds")
            labels = series["metric"]
            assert (labels["reserved_host"], labels["gpu"], labels["user"], labels["comment"]) \
                == ("localhost", "1", "alice", "deployed"), log.read_text()
    finally:
        end_process(endpoint, 10)
    assert "nvml" not in log.read_text().lower()


# --- preflight ---------------------------------------------------------------------------------

def test_preflight_stops_a_provisioning_file_the_role_cannot_set(
        deployment: Deployment, tmp_path: Path) -> None:
    checkout = tmp_path / "grafana"
    shutil.copytree(deployment.source / "grafana", checkout)
    broken = checkout / "provisioning/datasources/gpuwatch.yml"
    broken.write_text(broken.read_text().replace("    url: ", "    address: "))
    variables = yaml.safe_load((deployment.root / "vars.yml").read_text())
    variables.update(gpuwatch_grafana_source_dir=str(checkout))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(variables))
    shutil.copy(deployment.root / "inventory.yml", tmp_path / "inventory.yml")
    result = _playbook(tmp_path, ["--tags", "gpuwatch_grafana_configure"])
    assert result.returncode != 0
    assert f"{broken} needs exactly one line for each of url for the role to set; " \
        f"restore it with git checkout -- {broken}" in " ".join(result.stdout.split()), \
        result.stdout[-4000:]
    assert _recap(result.stdout)["changed"] == 0


@pytest.mark.parametrize(("override", "tags", "message"), [
    ({"gpuwatch_grafana_admin_password": ""}, "gpuwatch_grafana_configure",
     "gpuwatch_grafana_admin_password is not set"),
    ({"gpuwatch_exporter_basic_auth_users": {"prometheus": "plain-text"}},
     "gpuwatch_exporter_configure", "maps user names to bcrypt hashes, not to passwords"),
    ({"gpuwatch_exporter_web_listen_address": "9839"}, "gpuwatch_exporter_configure",
     "it must be HOST:PORT or :PORT"),
    ({"gpuwatch_exporter_tls_server_config": {"cert_file": "/nonexistent/node.crt",
                                               "key_file": "/nonexistent/node.key"}},
     "gpuwatch_exporter_configure", "names files that do not exist on localhost: "
     "/nonexistent/node.crt, /nonexistent/node.key"),
    ({"gpuwatch_prometheus_remote_write": [{"name": "vm"}]}, "gpuwatch_prometheus_configure",
     "gpuwatch_prometheus_remote_write holds entries without a url"),
    ({"gpuwatch_prometheus_basic_auth_users": {"grafana": "pw-g", "gpuwatch-serve": "pw-s"}},
     "gpuwatch_prometheus_configure", "gpuwatch_prometheus_access is basic_auth (the default), "
     "but gpuwatch_prometheus_basic_auth_users has no password for prometheus "
     "(gpuwatch_prometheus_client_user"),
    ({"gpuwatch_prometheus_basic_auth_users": {"prometheus": "pw-p"}},
     "gpuwatch_reservations_configure",
     "but gpuwatch_reservations_prometheus_password is empty (or holds a line break): add "
     "gpuwatch-serve (gpuwatch_reservations_prometheus_user, no ':' or spaces) and a password "
     "to gpuwatch_prometheus_basic_auth_users"),
])
def test_preflight_stops_bad_variables_with_the_fix(
        deployment: Deployment, tmp_path: Path, override: dict[str, object], tags: str,
        message: str) -> None:
    variables = yaml.safe_load((deployment.root / "vars.yml").read_text())
    variables.update(override)
    (tmp_path / "vars.yml").write_text(yaml.safe_dump(variables))
    shutil.copy(deployment.root / "inventory.yml", tmp_path / "inventory.yml")
    result = _playbook(tmp_path, ["--tags", tags])
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split()), result.stdout[-4000:]
    assert _recap(result.stdout)["changed"] == 0
