"""End to end: `gpuwatch` and `gpuwatch serve` against a real Prometheus behind basic auth
and TLS (issue 15).

Prometheus (Debian's) runs this repository's prometheus.yml and rules (tools.localstack,
short intervals) with a --web.config.file of the exporter-toolkit kind the Ansible role
deploys: a bcrypt basic_auth_users entry and a self-signed certificate (tests/certs.py),
scraping one simulated exporter on 127.0.0.1. `gpuwatch status` works with the credentials
from a netrc file, from the environment and from the URL, given the CA with
--prometheus.ca-file; without credentials, with a wrong password or without the CA it fails
with one line, exit 1, and no secret anywhere in what it printed. `gpuwatch serve` with the
credentials answers /api/v1/fleet; with a wrong password its 503 names no secret either.
(tests/unit/test_prometheus_auth.py checks the order, the redirects and the messages.)
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from certs import self_signed
from cli_run import run

from gpuwatch import credentials
from gpuwatch.contract import states
from gpuwatch.fleet.prometheus import ENV_PASSWORD, ENV_TOKEN, ENV_USER, Prometheus
from gpuwatch.sim import load_scenario
from tools import localstack

USER = "grafana"
PASSWORD = "e2e-pr0m-s3cret"
WRONG = "e2e-wr0ng-s3cret"
SECRETS = (PASSWORD, WRONG)
HOST = "ws-auth"
SCENARIO = "workstation"
DEADLINE = 30.0


@dataclass(frozen=True)
class Protected:
    url: str
    """https://127.0.0.1:PORT, no credentials."""
    ca_file: Path
    gpus: int
    workdir: Path

    def with_user(self, password: str = PASSWORD) -> str:
        return self.url.replace("//", f"//{USER}:{password}@")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Protected]:
    workdir = tmp_path_factory.mktemp("auth")
    cert, key = self_signed(workdir)
    targets = workdir / "targets"
    targets.mkdir()
    exporter_port, port = localstack.free_port(), localstack.free_port()
    web_config = workdir / "web.yml"
    web_config.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(cert), "key_file": str(key)},
        "basic_auth_users": {USER: bcrypt.hashpw(PASSWORD.encode(),
                                                 bcrypt.gensalt(rounds=4)).decode()}}))
    config = localstack.render_config(
        workdir / "prometheus", targets,
        localstack.Overrides(scrape_interval="1s", evaluation_interval="1s",
                             refresh_interval="1s"))
    localstack.write_targets(targets / "nodes.yml", [
        {"targets": [f"{localstack.LOCALHOST}:{exporter_port}"], "labels": {"host": HOST}}])
    context = ssl.create_default_context(cafile=str(cert))
    authorization = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    exporter = localstack.exporter(SCENARIO, exporter_port, workdir / "exporter.log",
                                   ["--log.level", "warn"])
    server = localstack.prometheus(config, workdir / "data", port, workdir / "prometheus.log",
                                   web_config=web_config,
                                   ready_headers={"Authorization": authorization},
                                   ready_context=context)
    with exporter, server:
        url = f"https://{localstack.LOCALHOST}:{port}"
        api = Prometheus(url, basic_auth=(USER, PASSWORD), ssl_context=context)
        gpus = len(load_scenario(SCENARIO).gpus)
        deadline = time.monotonic() + DEADLINE
        while api.query_value(f"count({states.STATE_INFO})") != gpus:
            assert time.monotonic() < deadline, f"no GPU states: {server.log_tail()}"
            time.sleep(0.25)
        yield Protected(url, cert, gpus, workdir)


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment without Prometheus credentials; $NETRC names a file the test may write."""
    for name in (ENV_USER, ENV_PASSWORD, ENV_TOKEN, "GPUWATCH_PROMETHEUS",
                 "GPUWATCH_PROMETHEUS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv(credentials.ENV_NETRC, str(netrc))
    return netrc


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def gpuwatch(capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    """The command in process, in the test's environment (tests/cli_run.py), with what it
    wrote; `process=True` runs it as people do, as a process (slower)."""
    def run_it(*argv: str, process: bool = False) -> Done:
        if process:
            done = subprocess.run([sys.executable, "-m", "gpuwatch.cli", *argv],
                                  capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL, check=False)
            return Done(done.returncode, done.stdout, done.stderr)
        code, out = run(*argv)
        captured = capsys.readouterr()
        return Done(code, out + captured.out, captured.err)
    return run_it


def fleet_of(done: Done, gpus: int) -> None:
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(g["host"], g["gpu"]) for g in listed] == [(HOST, i) for i in range(gpus)]


def fails_in_one_line(done: Done) -> str:
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpuwatch: error: "), \
        done.stderr
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr
    return done.stderr


def test_status_with_the_credentials_of_a_netrc_file(
        prometheus: Protected, clean: Path, gpuwatch: Callable[..., Done]) -> None:
    clean.write_text(f"machine {localstack.LOCALHOST} login {USER} password {PASSWORD}\n")
    fleet_of(gpuwatch("--prometheus", prometheus.url, "--prometheus.ca-file",
                      str(prometheus.ca_file), "status", "--json", process=True),
             prometheus.gpus)
    grid = gpuwatch("status", "--prometheus", prometheus.url, "--prometheus.ca-file",
                    str(prometheus.ca_file), "--color", "never")
    assert grid.returncode == 0 and grid.stdout.startswith("HOST "), grid
    assert f"{prometheus.gpus} GPUs on 1 host" in grid.stdout


def test_status_with_the_credentials_of_the_environment_or_the_url(
        prometheus: Protected, clean: Path, monkeypatch: pytest.MonkeyPatch,
        gpuwatch: Callable[..., Done]) -> None:
    monkeypatch.setenv("GPUWATCH_PROMETHEUS_CA_FILE", str(prometheus.ca_file))
    fleet_of(gpuwatch("--prometheus", prometheus.with_user(), "status", "--json"),
             prometheus.gpus)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    monkeypatch.setenv("GPUWATCH_PROMETHEUS", prometheus.url)
    fleet_of(gpuwatch("status", "--json"), prometheus.gpus)


def test_without_credentials_or_with_a_wrong_password_one_line_and_no_secret(
        prometheus: Protected, clean: Path, monkeypatch: pytest.MonkeyPatch,
        gpuwatch: Callable[..., Done]) -> None:
    ca = ["--prometheus.ca-file", str(prometheus.ca_file)]
    err = fails_in_one_line(gpuwatch("--prometheus", prometheus.url, *ca, "status",
                                     process=True))
    assert f"Prometheus at {prometheus.url} asks for credentials (HTTP 401): set {ENV_USER}" \
        in err
    shown = credentials.shown(prometheus.with_user(WRONG))
    err = fails_in_one_line(gpuwatch("--prometheus", prometheus.with_user(WRONG), *ca,
                                     "status"))
    assert f"Prometheus at {shown} refused the credentials of {USER} (from the URL) " \
        "(HTTP 401)" in err
    clean.write_text(f"machine {localstack.LOCALHOST} login {USER} password {WRONG}\n")
    err = fails_in_one_line(gpuwatch("--prometheus", prometheus.url, *ca, "pick", "1"))
    assert f"refused the credentials of {USER} (from {clean})" in err
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, WRONG)
    err = fails_in_one_line(gpuwatch("--prometheus", prometheus.url, *ca, "status", "--json"))
    assert f"refused the credentials of {USER} (from {ENV_USER})" in err


def test_without_the_ca_the_password_is_not_sent(
        prometheus: Protected, clean: Path, gpuwatch: Callable[..., Done]) -> None:
    err = fails_in_one_line(gpuwatch("--prometheus", prometheus.with_user(), "status"))
    assert f"cannot reach Prometheus at {credentials.shown(prometheus.with_user())}: " in err
    assert "certificate verify failed" in err and "--prometheus.ca-file" in err


def ask(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def serve(prometheus: Protected, name: str, url: str,
          env: dict[str, str]) -> localstack.Service:
    port = localstack.free_port()
    return localstack.Service(
        f"gpuwatch serve ({name})",
        [sys.executable, "-m", "gpuwatch.cli", "serve", "--reservations.file",
         str(prometheus.workdir / f"{name}.yml"), "--web.listen-address",
         f"{localstack.LOCALHOST}:{port}", "--prometheus", url, "--prometheus.ca-file",
         str(prometheus.ca_file)],
        f"http://{localstack.LOCALHOST}:{port}/-/healthy", prometheus.workdir / f"{name}.log",
        env=env)


def test_serve_reads_the_fleet_with_the_credentials(prometheus: Protected, clean: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}
    good = serve(prometheus, "good", prometheus.with_user(), env)
    wrong = serve(prometheus, "wrong", prometheus.url,
                  {**env, ENV_USER: USER, ENV_PASSWORD: WRONG})
    with good, wrong:
        status, answer = ask(good.ready_url.replace("/-/healthy", "/api/v1/fleet"))
        assert status == 200, answer
        assert [(g["host"], g["gpu"]) for g in answer["gpus"]] == \
            [(HOST, i) for i in range(prometheus.gpus)]
        status, answer = ask(wrong.ready_url.replace("/-/healthy", "/api/v1/fleet"))
        assert status == 503 and "refused the credentials" in answer["error"], answer
        assert not any(s in json.dumps(answer) for s in SECRETS)
    log = good.log.read_text()
    assert credentials.shown(prometheus.with_user()) in log, log
    for secret in SECRETS:
        assert secret not in log + wrong.log.read_text()
