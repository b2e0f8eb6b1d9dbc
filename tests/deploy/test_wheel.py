"""The wheel a GPU node installs, as the node gets it: built from this checkout, installed into
a fresh venv in a temporary directory, and every command it ships run from there with no
way back to the source tree (the working directory is the temporary one, PYTHONPATH unset).

What the wheel ships is checked against what the tests run: a console script or `python -m`
entry added without a test here fails the listing tests.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpfake
import pytest
from paths import REPO
from wheelhouse import Wheelhouse, build

from gpuwatch import DISTRIBUTION

CONSOLE_SCRIPTS = {"gpuwatch-exporter": "gpuwatch.exporter", "gpuwatch": "gpuwatch.cli"}
"""Each console script the wheel ships -> the `python -m` entry that does the same."""
SCENARIOS = sorted(p.name for p in (REPO / "src/gpuwatch/sim/scenarios").glob("*.yaml"))
RUN_TIMEOUT = 60.0
"""A bound on one command of an installed wheel, not a timing assertion."""


@dataclass(frozen=True)
class Installed:
    wheelhouse: Wheelhouse
    venv: Path
    home: Path
    """The working directory of every command: outside the checkout."""

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self) -> dict[str, str]:
        """This environment without what would lead Python back to the checkout or to
        another site (tests/conftest.py puts the checkout on PYTHONPATH for the tests'
        own processes)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        env.update(PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", HOME=str(self.home),
                   PATH=f"{self.bin}{os.pathsep}/usr/bin:/bin")
        return env

    def argv(self, entry: str) -> list[str]:
        """The command line of a console script, or of `python -m` for a module entry."""
        if entry in CONSOLE_SCRIPTS:
            return [str(self.bin / entry)]
        return [str(self.bin / "python"), "-m", entry]

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=self.home, env=self.env(), capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT,
                              check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    wheelhouse = build(root / "wheelhouse")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=RUN_TIMEOUT)
    # This venv's pip installs into the fresh one; the fresh one has no pip of its own.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--disable-pip-version-check", *wheelhouse.pip_args(), str(wheelhouse.wheel)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    home = root / "home"
    home.mkdir()
    return Installed(wheelhouse, venv, home)


def _names(installed: Installed) -> list[str]:
    with zipfile.ZipFile(installed.wheelhouse.wheel) as wheel:
        return wheel.namelist()


def _dist_info(installed: Installed, name: str) -> str:
    with zipfile.ZipFile(installed.wheelhouse.wheel) as wheel:
        (path,) = [n for n in wheel.namelist()
                   if re.fullmatch(rf"[^/]+\.dist-info/{re.escape(name)}", n)]
        return wheel.read(path).decode()


def _version(installed: Installed) -> str:
    return str(email.parser.Parser().parsestr(_dist_info(installed, "METADATA"))["Version"])


# -- what the wheel holds -----------------------------------------------------------------------

def test_wheel_is_the_gpuwatch_stack_distribution(installed: Installed) -> None:
    metadata = email.parser.Parser().parsestr(_dist_info(installed, "METADATA"))
    assert metadata["Name"] == DISTRIBUTION == "gpuwatch-stack"


def test_wheel_holds_the_package_its_scenarios_and_types_only(installed: Installed) -> None:
    names = _names(installed)
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"gpuwatch", f"gpuwatch_stack-{_version(installed)}.dist-info"}, tops
    assert "gpuwatch/py.typed" in names
    assert sorted(n.rsplit("/", 1)[1] for n in names
                  if n.startswith("gpuwatch/sim/scenarios/")) == SCENARIOS
    files = [n.rsplit("/", 1)[-1] for n in names]
    assert not [n for n in names if n.startswith(("tools/", "tests/")) or "/tools/" in n]
    assert not [f for f in files if f.startswith("test_") or f == "conftest.py"]


def test_wheel_ships_exactly_the_entries_tested_here(installed: Installed) -> None:
    scripts = {}
    section = None
    for line in _dist_info(installed, "entry_points.txt").splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "console_scripts" and "=" in line:
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[name] = target
    assert set(scripts) == set(CONSOLE_SCRIPTS), scripts
    modules = {n[: -len("/__main__.py")].replace("/", ".") for n in _names(installed)
               if n.endswith("/__main__.py")}
    assert modules == set(CONSOLE_SCRIPTS.values())


def test_the_package_comes_from_the_venv_not_the_checkout(installed: Installed) -> None:
    done = installed.run(str(installed.bin / "python"), "-c",
                         "import gpuwatch, sys; print(gpuwatch.__file__); print(sys.path)")
    assert done.returncode == 0, done.stderr
    where, path = done.stdout.splitlines()
    assert Path(where).is_relative_to(installed.venv), where
    assert str(REPO) not in path, path
    assert installed.run(str(installed.bin / "python"), "-c", "import tools").returncode != 0


# -- every command it ships ---------------------------------------------------------------------

ENTRIES = [*CONSOLE_SCRIPTS, *CONSOLE_SCRIPTS.values()]
PROG = {**{s: s for s in CONSOLE_SCRIPTS}, **{m: s for s, m in CONSOLE_SCRIPTS.items()}}
"""The name an entry gives itself in --help and --version."""


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_and_version(installed: Installed, entry: str) -> None:
    helped = installed.run(*installed.argv(entry), "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {PROG[entry]} "), helped.stdout[:200]
    versioned = installed.run(*installed.argv(entry), "--version")
    assert versioned.returncode == 0, versioned.stderr
    assert versioned.stdout.strip() == f"{PROG[entry]} {_version(installed)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("entry", [e for e in ENTRIES if PROG[e] == "gpuwatch-exporter"])
def test_exporter_serves_a_simulated_node(installed: Installed, entry: str) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    process = subprocess.Popen(
        [*installed.argv(entry), "--simulate", "workstation",
         "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=installed.home, env=installed.env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = ""
        deadline = time.monotonic() + RUN_TIMEOUT
        while not body:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, f"{url} did not answer"
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    body = answer.read().decode()
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        assert re.search(r'^nvidia_gpu_info\{.*gpu="0"', body, re.MULTILINE), body[:2000]
        assert re.search(r"^nvidia_gpu_up\{.*\} 1\.0$", body, re.MULTILINE), body[:2000]
    finally:
        process.terminate()
        output = process.communicate(timeout=RUN_TIMEOUT)[0]
    assert "Traceback" not in output, output


class _EmptyPrometheus(httpfake.QuietHandler):
    """A Prometheus whose every query finds nothing."""

    def _answer(self) -> None:
        body = json.dumps({"status": "success",
                           "data": {"resultType": "vector", "result": []}}).encode()
        self.reply(200, body, [("Content-Type", "application/json")])

    do_GET = do_POST = _answer


@pytest.fixture
def empty_prometheus() -> Iterator[str]:
    url, stop = httpfake.start(_EmptyPrometheus)
    try:
        yield url
    finally:
        stop()


@pytest.mark.parametrize("entry", [e for e in ENTRIES if PROG[e] == "gpuwatch"])
def test_status_says_in_one_line_what_prometheus_lacks(installed: Installed, entry: str,
                                                       empty_prometheus: str) -> None:
    unreachable = f"http://127.0.0.1:{_free_port()}"
    for url, says in ((empty_prometheus, "knows no GPUs"), (unreachable, "cannot reach")):
        done = installed.run(*installed.argv(entry), "--prometheus", url, "status")
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith("gpuwatch: error: ") and says in line and url in line, line


# -- what the Makefile installs -----------------------------------------------------------------

def _make_dry_run(target: str, venv: Path) -> list[str]:
    done = subprocess.run(["make", "-n", "-B", target, f"VENV={venv}"], cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_make_demo_installs_the_runtime_dependencies_only(tmp_path: Path) -> None:
    """A fresh `make demo` installs the package and what it runs on, no extra (no pytest,
    mypy, Ansible, Grafana's SDK) and none of the test machine's tools (nginx, Caddy)."""
    lines = _make_dry_run("demo", tmp_path / "venv")
    installs = [line for line in lines if " pip install " in line and "--upgrade pip" not in line]
    assert installs == [f"{tmp_path / 'venv'}/bin/python -m pip install -q -e ."], lines
    # what the demo runs: Prometheus and Alertmanager (Debian's packages), nothing else
    demo_programs = ("ensure-prometheus", "ensure-alertmanager")
    assert not [line for line in lines
                if "ensure-" in line and not any(name in line for name in demo_programs)]
    test = _make_dry_run("test", tmp_path / "venv")
    assert f"{tmp_path / 'venv'}/bin/python -m pip install -q -e '.[test]'" in test, test
