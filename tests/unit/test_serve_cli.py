"""`gpuwatch serve`'s flags: each lands in its option, a bad one or a bad file is one line and
exit 2; the command serves until SIGTERM; the exporter's old reservations mode says it goes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gpuwatch import cli
from gpuwatch.cli import serve as serve_command
from gpuwatch.contract import ports
from gpuwatch.exporter.main import build_parser as exporter_parser
from gpuwatch.exporter.main import deprecation
from gpuwatch.exporter.main import options_from_args as exporter_options
from gpuwatch.serve.options import ServeOptions, parse_networks

READY_SECONDS = 60.0


def options(*argv: str) -> ServeOptions:
    args = cli.build_parser().parse_args(["serve", *argv])
    return serve_command.options_from_args(args)


def test_the_defaults_are_the_contract(tmp_path: Path) -> None:
    got = options("--reservations.file", str(tmp_path / "r.yml"))
    assert got == ServeOptions(reservations_file=tmp_path / "r.yml",
                               prometheus=got.prometheus)
    assert got.listen_address == f":{ports.RESERVATIONS_PORT}"


def test_every_flag_lands_in_its_option(tmp_path: Path) -> None:
    got = options("--reservations.file", "r.yml", "--web.listen-address", "127.0.0.1:9999",
                  "--web.config.file", "web.yml", "--prometheus", "http://prom:9090",
                  "--admins", "root, ops", "--web.auth-header", "X-Forwarded-User",
                  "--web.trusted-proxies", "127.0.0.1,10.0.0.0/8", "--users.map", "u.yml",
                  "--web.max-connections", "10", "--web.read-timeout", "5",
                  "--log.level", "debug", "--timeout", "3")
    assert got == ServeOptions(
        reservations_file=Path("r.yml"), listen_address="127.0.0.1:9999",
        web_config_file=Path("web.yml"), prometheus="http://prom:9090", prometheus_timeout=3,
        admins=frozenset({"root", "ops"}), auth_header="X-Forwarded-User",
        trusted_proxies=parse_networks(["127.0.0.1", "10.0.0.0/8"]), users_map=Path("u.yml"),
        max_connections=10, read_timeout=5, log_level="debug")


def test_the_file_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUWATCH_RESERVATIONS", "/srv/r.yml")
    assert options().reservations_file == Path("/srv/r.yml")


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpuwatch serve: error: "), err
    return err


@pytest.mark.parametrize("argv, says", [
    ((), "--reservations.file"),
    (("--web.auth-header", "X-User"), "--web.trusted-proxies"),
    (("--web.auth-header", " ", "--web.trusted-proxies", "127.0.0.1"), "header"),
    (("--web.auth-header", "X-User", "--web.trusted-proxies", "10.0.0.0/33"), "10.0.0.0/33"),
    (("--web.listen-address", "9840"), "HOST:PORT"),
])
def test_a_bad_flag_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch,
                                           argv: tuple[str, ...], says: str) -> None:
    monkeypatch.delenv("GPUWATCH_RESERVATIONS", raising=False)
    file = () if argv == () else ("--reservations.file", str(tmp_path / "r.yml"))
    assert says in _fails(capsys, *file, *argv)


@pytest.mark.parametrize("text, says", [
    ("alice: [1\n", "not valid YAML"),
    ("- alice\n", "mapping"),
    ("alice: bob smith\n", "Unix user name"),
    ("'a b': alice\n", "login"),
])
def test_a_bad_users_map_is_one_line_naming_it(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               text: str, says: str) -> None:
    users = tmp_path / "users.yml"
    users.write_text(text)
    err = _fails(capsys, "--reservations.file", str(tmp_path / "r.yml"), "--users.map",
                 str(users), "--web.listen-address", "127.0.0.1:0")
    assert str(users) in err and says in err


def test_a_missing_users_map_or_web_config_or_directory_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--reservations.file", str(tmp_path / "r.yml"), "--web.listen-address",
            "127.0.0.1:0")
    assert "nothing.yml" in _fails(capsys, *base, "--users.map", str(tmp_path / "nothing.yml"))
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users: [alice]\n")
    assert str(bad) in _fails(capsys, *base, "--web.config.file", str(bad))
    assert "does not exist" in _fails(capsys, "--reservations.file",
                                      str(tmp_path / "no" / "r.yml"))


def test_a_taken_address_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _fails(capsys, "--reservations.file", str(tmp_path / "r.yml"),
                     "--web.listen-address", f"127.0.0.1:{port}")
    assert "cannot listen" in err


def test_the_command_serves_until_sigterm(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch.cli", "serve", "--reservations.file",
         str(tmp_path / "r.yml"), "--web.listen-address", f"127.0.0.1:{port}",
         "--prometheus", "http://127.0.0.1:1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": "src"})
    try:
        # a bound on the start on a busy machine (imports, the loop), not a timing assertion:
        # 200 quick tries (10 s) were too few under the full suite on two cores
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy",
                                            timeout=2) as answer:
                    assert answer.read() == b"OK\n"
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"gpuwatch serve did not answer: {process.communicate()[1]}")
                time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/reservations",
                                    timeout=5) as answer:
            assert answer.read() == b'{"reservations": []}\n'
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "listening on 127.0.0.1" in err and "Traceback" not in err


def test_the_exporters_reservations_mode_says_it_goes() -> None:
    old = exporter_options(exporter_parser().parse_args(
        ["--collector.disable-defaults", "--reservations.file", "/srv/r.yml"]))
    warning = deprecation(old)
    assert warning is not None and "gpuwatch serve --reservations.file /srv/r.yml" in warning
    assert deprecation(exporter_options(exporter_parser().parse_args([]))) is None
