"""gpuwatch-exporter as a program: flags and bad input (tests/e2e/test_exporter_process.py runs
it as a process)."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpuwatch.exporter.collectors.process import ProcessOptions
from gpuwatch.exporter.main import (
    FlagError,
    build_parser,
    main,
    options_from_args,
    parse_flags,
)
from gpuwatch.exporter.options import ExporterOptions
from gpuwatch.sim import load_scenario


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_no_flags_are_the_options_defaults() -> None:
    """The flags' defaults and ExporterOptions' are one set of defaults."""
    assert options_from_args(build_parser().parse_args([])) == ExporterOptions()


def test_the_flags_become_options_in_one_place(tmp_path: Path) -> None:
    options = options_from_args(build_parser().parse_args([
        "--web.listen-address", "127.0.0.1:9100", "--web.telemetry-path", "/m",
        "--web.max-connections", "7", "--web.read-timeout", "3", "--collection.timeout", "2",
        "--no-collector.xid", "--reservations.file", str(tmp_path / "r.yml"),
        "--process.command", "none", "--no-process.pid", "--process.max-per-gpu", "3",
        "--log.level", "warn", "--simulate", "server"]))
    assert options == replace(
        ExporterOptions(), listen_address="127.0.0.1:9100", telemetry_path="/m",
        max_connections=7, read_timeout=3.0, collection_timeout=2.0,
        collectors=frozenset({"gpu", "process", "reservation"}),
        reservations_file=tmp_path / "r.yml",
        process=ProcessOptions(command="none", pid=False, max_per_gpu=3), log_level="warn",
        simulate="server")


def test_a_tool_passing_exporter_flags_gets_an_error_not_an_exit() -> None:
    assert parse_flags(["--no-process.pid"]).process.pid is False
    for flags in (["--no-such-flag"], ["--process.max-per-gpu", "-1"]):
        with pytest.raises(FlagError):
            parse_flags(flags)


def test_options_name_only_collectors_that_exist() -> None:
    with pytest.raises(ValueError, match="no such collector: gpus"):
        ExporterOptions(collectors=frozenset({"gpus"}))


@pytest.mark.parametrize("flags", [
    ["--web.listen-address", "nonsense"],
    ["--process.command", "everything"],
    ["--process.max-per-gpu", "-1"],
    ["--collection.timeout", "0"],
    ["--log.level", "chatty"],
    ["--no-such-flag"],
])
def test_a_malformed_flag_exits_2(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    code, err = run_main(capsys, *flags)
    assert code == 2
    assert "error:" in err


@pytest.mark.parametrize(("text", "message"), [
    ("display_names: [1, 2]\n", "display_names: expected a mapping"),
    ("display_name: {}\n", "unknown key 'display_name'"),
    ("display_names: {a: [\n", "not valid YAML"),
])
def test_a_malformed_config_file_is_one_line_naming_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "gpuwatch.yml"
    config.write_text(text)
    code, err = run_main(capsys, "--config.file", str(config), "--simulate", "workstation")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and message in lines[0]


@pytest.mark.parametrize(("text", "message"), [
    ("gpus: 3\n", "gpus: expected a list"),
    ("gpus:\n  - {load: 2}\n", "gpus[0].load: must be between 0 and 1"),
    ("gpus:\n  - {lod: 2}\n", "unknown key 'lod'"),
    ("gpus:\n  - {errors: {nvmlDeviceGetFanSpeed: Broken}}\n", "unknown error 'Broken'"),
    ("gpus:\n  - {hang: [nvmlDeviceDoesNotExist]}\n", "not an NVML function"),
    ("gpus:\n  - processes: [{user: ann}]\n", "missing key 'pid'"),
    ("process_api: v9\ngpus: []\n", "'v9' is not one of"),
    ("gpus: [\n", "not valid YAML"),
])
def test_a_malformed_scenario_is_one_line_naming_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    code, err = run_main(capsys, "--simulate", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], err


def test_an_unknown_scenario_name_lists_the_shipped_ones(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    code, err = run_main(capsys, "--simulate", "mainframe")
    assert code == 2 and "lost-gpu, mig, server, workstation" in err


def test_the_help_names_every_shipped_scenario() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "a shipped scenario (lost-gpu, mig, server, workstation)" in text


def test_a_scenario_name_works_from_a_directory_it_cannot_look_into(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A service user started in a directory it may not enter (stat() of the relative name
    fails with EACCES) still gets the shipped scenario of that name."""
    shipped = load_scenario("workstation")
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(path) == "workstation":
            raise PermissionError(13, "Permission denied", "workstation")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert load_scenario("workstation") == shipped


def test_a_port_in_use_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(capsys, "--simulate", "workstation", "--web.listen-address",
                             f"127.0.0.1:{port}")
    assert code == 2 and "cannot listen on" in err


BROKEN_HASH = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7z"  # one short


@pytest.mark.parametrize(("text", "message"), [
    (f"basic_auth_users:\n  prometheus: '{BROKEN_HASH}'\n",
     "basic_auth_users.prometheus: not a bcrypt hash"),
    ("http_server_config:\n  headers: [X-Frame-Options: deny]\n",
     "http_server_config.headers: expected a mapping"),
    ("http_server_config:\n  http2: true\n", "http_server_config.http2: gpuwatch-exporter serves "
                                             "HTTP/1.1 only"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: RequireAnyClientCert\n", "client_auth_type: RequireAnyClientCert"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
     "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: server.key\n",
     "client_ca_file: "),
])
def test_a_web_config_the_exporter_cannot_honour_is_one_line_naming_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        text: str, message: str) -> None:
    from certs import self_signed

    def serve(*_: object) -> None:
        raise AssertionError("the exporter started with a web config it cannot honour")

    monkeypatch.setattr("gpuwatch.exporter.main.serve", serve)
    self_signed(tmp_path)
    config = tmp_path / "web.yml"
    config.write_text(text)
    code, err = run_main(capsys, "--web.config.file", str(config), "--simulate", "workstation",
                         "--web.listen-address", "127.0.0.1:0")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and message in lines[0], err
