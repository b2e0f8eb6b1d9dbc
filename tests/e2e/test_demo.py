"""make demo: the fleet comes up, the grid shows every node, the `gpuwatch run` command it
prints gets a free GPU that the grid shows claimed, the booking command it prints (through
`gpuwatch serve`, as the demo's user) shows in the grid, firing alerts show in the
Alertmanager it prints (with runbook links to the lab page's service), a node added to its
targets file joins the grid, Ctrl-C stops every process; a quick restart finds its ports
again."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_provisioning import provisioned

from gpuwatch.contract import states
from gpuwatch.fleet import GpuStatus, read_fleet
from gpuwatch.fleet.prometheus import Prometheus, PrometheusError
from gpuwatch.sim import load_scenario
from tools import demo, localstack
from tools.localstack import free_port

WAIT = 90.0
"""A bound on how long the demo may take to show its grid, not a timing assertion."""


def _listening(url: str) -> bool:
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()  # type: ignore[union-attr]
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _firing(alertmanager: str) -> list[dict[str, Any]]:
    """The alerts Alertmanager shows as active (firing, neither silenced nor inhibited)."""
    with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts?silenced=false&inhibited=false",
                                timeout=10) as answer:
        found: list[dict[str, Any]] = json.load(answer)
    return found


def _as_a_background_job() -> None:
    """What a shell does to a job started with &: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_demo_shows_the_grid_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--dir", str(tmp_path / "demo"),
         "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_as_a_background_job)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []],
                              daemon=True)
    reader.start()
    # the cells: each GPU without MIG, each slice of one with MIG (at the start)
    every = [gpu for _, scenario in demo.NODES for gpu in load_scenario(scenario).gpus]
    slices = sum(1 for gpu in every for m in gpu.mig if m.created_after_seconds <= 0)
    gpus = sum(1 for gpu in every if not gpu.mig)
    summary = f"{gpus} GPUs and {slices} MIG slices on {len(demo.NODES)} hosts: "
    seen: list[str] = []

    def wait_for_line(pattern: re.Pattern[str], since: int = 0) -> None:
        """Until a line the demo printed (its `since`th line or a later one) matches."""
        deadline = time.monotonic() + WAIT
        while not any(pattern.match(line) for line in seen[since:]):
            assert time.monotonic() < deadline, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)

    try:
        wait_for_line(re.compile(re.escape(summary)))
        urls = sorted({m.group(0) for m in re.finditer(r"http://[\d.:]+", "".join(seen))})
        # the exporters, gpuwatch serve (the lab page is its /), Alertmanager, Prometheus
        assert len(urls) == len(demo.NODES) + 3
        assert all(_listening(url) for url in urls)
        grid = "".join(seen)
        for host, _ in demo.NODES:
            assert re.search(rf"^{re.escape(host)} ", grid, re.MULTILINE), host

        # the booking it starts with (the service may be scraped after the first grid)
        wait_for_line(re.compile(r"^\s+\d+\s+reserved\s.* frank until "))

        # the settings it prints reach gpuwatch serve as the demo's user, whose password
        # is in a file, never in the output
        def printed(label: str) -> str:
            (line,) = [line for line in seen if line.startswith(f"{label}: ")]
            return line.rstrip("\n").split(": ", 1)[1]

        settings = printed("in another terminal")
        assert settings.startswith("export ")
        env = dict(word.split("=", 1) for word in shlex.split(settings)[1:])
        assert {"GPUWATCH_SERVER", "GPUWATCH_USER", "GPUWATCH_PASSWORD"} <= set(env)
        user = env["GPUWATCH_USER"]
        (password_file,) = re.findall(r"\$\(cat (/\S+)\)", settings)
        assert Path(password_file).read_text() not in "".join(seen)

        def as_printed(command: str, **kwargs: Any) -> subprocess.Popen[str]:
            return subprocess.Popen(["sh", "-c", f"{settings} && exec {command}"], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)

        # the gpuwatch run command it prints, run as printed: the UUID of a GPU that was free
        run = printed("run on a free GPU")
        assert f" run -n 1 --host {demo.RUN_HOST} -- " in run and run.endswith(demo.RUN_COMMAND)
        prometheus = Prometheus(printed("prometheus").split(" ", 1)[0])
        free = {g.uuid: g.gpu for g in read_fleet(prometheus)
                if g.host == demo.RUN_HOST and g.state == "free"}
        assert free, "the demo's run host has free GPUs"
        out, err = as_printed(run).communicate(timeout=60)
        assert out.strip() in free, (out, err)
        # the run on a MIG slice it prints: the MIG UUID of a free slice of that profile
        mig_host, profile = demo.MIG_RUN
        run_mig = printed("run on a free MIG slice")
        assert f" run -n 1 --host {mig_host} --model {profile} -- " in run_mig
        free_slices = {g.mig_uuid for g in read_fleet(prometheus) if g.host == mig_host
                       and g.state == "free" and g.profile == profile}
        assert free_slices, "the demo's MIG host has free slices of the profile"
        out, err = as_printed(run_mig).communicate(timeout=60)
        assert out.strip().startswith("MIG-") and out.strip() in free_slices, (out, err)
        # held while the command runs (cat, until the test closes its stdin): the grid shows it
        # claimed by the demo's user, and free again once the command has ended
        held = as_printed(run.replace(demo.RUN_COMMAND,
                                      "sh -c 'echo $CUDA_VISIBLE_DEVICES; cat >/dev/null'"),
                          stdin=subprocess.PIPE)
        try:
            assert held.stdout is not None and held.stdin is not None
            uuid = held.stdout.readline().strip()
            assert uuid in free, uuid
            claimed = free[uuid]
            wait_for_line(re.compile(rf"^(\S+)?\s+{claimed}\s+claimed\s.* claimed by "
                                     rf"{re.escape(user)} until "))
            ended = len(seen)
            held.stdin.close()
            assert held.wait(timeout=60) == 0, held.stderr.read() if held.stderr else ""
        finally:
            if held.poll() is None:
                held.kill()
                held.wait()
        wait_for_line(re.compile(rf"^(\S+)?\s+{claimed}\s+free\s"), since=ended)

        # the booking command it prints, run as printed, through the service
        command = printed("book a GPU")
        target, until, comment = demo.TRY
        assert f"reserve {target} --until {until}" in command and "--file" not in command
        booked = as_printed(command)
        out, err = booked.communicate(timeout=60)
        assert booked.returncode == 0, err
        assert f" for {user} until " in out + err
        index = target.split(":")[1]
        wait_for_line(re.compile(rf"^\s+{index}\s+reserved\s.*{re.escape(user)} until .* "
                                 rf"\({re.escape(comment)}\)$"))

        # the firing alerts show in the Alertmanager it prints, their runbook links on the
        # lab page's service
        server = env["GPUWATCH_SERVER"]
        assert printed("lab page").split(" ", 1)[0] == f"{server}/"
        alertmanager = printed("alertmanager").split(" ", 1)[0]
        deadline = time.monotonic() + WAIT
        while not (lost := [a for a in _firing(alertmanager)
                            if a["labels"]["alertname"] == "GpuLost"]):
            assert time.monotonic() < deadline, "the lost GPU's alert not in Alertmanager"
            time.sleep(1)
        assert [(a["labels"]["host"], a["receivers"]) for a in lost] == [
            (host, [{"name": "admins"}]) for host, scenario in demo.NODES
            if scenario == "lost-gpu"]
        assert lost[0]["annotations"]["runbook_url"] == f"{server}/runbook#gpulost"

        # a node of one's own, added to the targets file the demo names, as
        # docs/prometheus.md teaches: it joins the grid and the demo goes on
        (targets_file,) = re.findall(r"\(targets: (/\S+), add a node there", "".join(seen))
        added = localstack.exporter("workstation", free_port(), tmp_path / "added.log")
        with added:
            groups = yaml.safe_load(Path(targets_file).read_text())
            groups.append({"targets": [added.ready_url.split("/")[2]],
                           "labels": {"host": "my-node"}})
            localstack.write_targets(Path(targets_file), groups)
            wait_for_line(re.compile(r"^my-node "))
            assert process.poll() is None, "".join(seen)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
        while not lines.empty():
            seen.append(lines.get())
        assert "stopped everything" in "".join(seen)
        assert not any(_listening(url) for url in urls)
    finally:
        if process.poll() is None:  # failed midway: let the demo stop its processes
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- Grafana beside the demo -------------------------------------------------------------------

FAKE_GRAFANA = """
import http.server, json, os, sys
json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, open(sys.argv[0] + ".json", "w"))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"database": "ok"}')
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["GF_SERVER_HTTP_ADDR"], int(os.environ["GF_SERVER_HTTP_PORT"])),
                       Health).serve_forever()
"""


def _fake_grafana(tmp_path: Path) -> Path:
    """A `grafana` laid out like Grafana's tarball (bin/, conf/defaults.ini) that answers
    /api/health where run-grafana tells it to listen and records how it was started."""
    home = tmp_path / "grafana-home"
    (home / "conf").mkdir(parents=True)
    (home / "conf" / "defaults.ini").write_text("")
    (home / "bin").mkdir()
    (home / "bin" / "server.py").write_text(FAKE_GRAFANA)
    binary = home / "bin" / "grafana"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} "{home / "bin" / "server.py"}" "$@"\n')
    binary.chmod(0o755)
    return home / "bin"


def test_demo_starts_grafana_beside_its_prometheus(tmp_path: Path, monkeypatch: Any,
                                                   capsys: Any) -> None:
    bindir = _fake_grafana(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    prometheus = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "demo").mkdir()
    with ExitStack() as stack:
        demo._start_grafana(stack, tmp_path / "demo", prometheus)
        out = capsys.readouterr().out
        (url,) = re.findall(r"^grafana:  (http://127\.0\.0\.1:\d+)/d/gpuwatch-fleet ", out,
                            re.MULTILINE)
        with urllib.request.urlopen(f"{url}/api/health", timeout=5) as answer:
            assert answer.status == 200
        started = json.loads((bindir / "server.py.json").read_text())
        provisioning = Path(started["env"]["GF_PATHS_PROVISIONING"])
        source, _ = provisioned(provisioning)
        assert source["url"] == prometheus
        assert source["jsonData"]["timeInterval"] == demo.OVERRIDES.scrape_interval
        assert provisioning.is_relative_to(tmp_path / "demo" / "grafana")
    assert not _listening(url), "stopped with the demo"


def test_demo_says_how_to_get_grafana_when_there_is_none(tmp_path: Path, monkeypatch: Any,
                                                         capsys: Any) -> None:
    bindir = tmp_path / "bin-without-grafana"
    bindir.mkdir()
    for tool in ("sh", "dirname", "cat"):
        found = shutil.which(tool)
        assert found is not None
        (bindir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bindir))
    (tmp_path / "demo").mkdir()
    with ExitStack() as stack:
        demo._start_grafana(stack, tmp_path / "demo", "http://127.0.0.1:9090")
    out = capsys.readouterr().out
    assert out.startswith("grafana: not installed, so the demo runs without it.\n")
    assert "apt.grafana.com" in out and "grafana.com/grafana/download" in out
    assert list((tmp_path / "demo").iterdir()) == [], "nothing started, nothing written"


# -- when the grid is printed -------------------------------------------------------------------

def _gpus(*hosts: str, state: str = "free") -> list[GpuStatus]:
    return [GpuStatus(host=host, instance=f"{host}:9839", gpu=0, uuid=f"GPU-{host}",
                      state=state, users=(), model="NVIDIA H100 80GB HBM3",
                      display_name="H100 80GB HBM3", memory_used_bytes=0.0,
                      memory_total_bytes=1.0, utilization_ratio=0.0, inactive_since=None)
            for host in hosts]


DEMO_HOSTS = [host for host, _ in demo.NODES]


def test_the_grid_waits_for_the_demos_nodes_until_the_deadline() -> None:
    watch = demo.Watch("http://127.0.0.1:9090", deadline=100.0)
    assert not watch.should_show(_gpus(*DEMO_HOSTS[:-1]), now=50.0)
    with pytest.raises(PrometheusError, match="after 60 s; see the logs"):
        watch.should_show(_gpus(*DEMO_HOSTS[:-1]), now=101.0)


def test_a_node_added_to_the_targets_file_is_shown_not_the_end_of_the_demo() -> None:
    watch = demo.Watch("http://127.0.0.1:9090", deadline=100.0)
    assert watch.should_show(_gpus(*DEMO_HOSTS), now=10.0)
    assert not watch.should_show(_gpus(*DEMO_HOSTS), now=20.0), "nothing changed"
    assert watch.should_show(_gpus(*DEMO_HOSTS, "my-node"), now=500.0)
    assert not watch.should_show(_gpus(*DEMO_HOSTS, "my-node"), now=501.0)
    assert watch.should_show(_gpus(*DEMO_HOSTS[1:], "my-node"), now=502.0), \
        "a node removed from the targets file is a change too"
    assert watch.should_show(_gpus(*DEMO_HOSTS[1:], "my-node", state="busy"), now=503.0)


# -- a quick restart gets the usual ports ------------------------------------------------------

def _port_in_time_wait() -> int:
    """A port nothing listens on with a connection in TIME_WAIT, as right after the demo's
    Prometheus stopped: the server's end closed first, so it is the one left waiting."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            server, _ = listener.accept()
            server.close()
            assert client.recv(1) == b""
    return port


def test_a_port_in_time_wait_is_still_the_demos() -> None:
    port = _port_in_time_wait()
    # what the probe saw without SO_REUSEADDR
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    assert demo._port(port) == port


def test_a_port_someone_listens_on_is_not_the_demos() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        assert demo._port(port) != port


# -- Prometheus scrapes the demo's gpuwatch serve with a user of its own ---------------------

def test_the_reservations_job_scrapes_with_basic_auth(tmp_path: Path) -> None:
    (tmp_path / "targets").mkdir()
    config = localstack.render_config(tmp_path / "prometheus", tmp_path / "targets",
                                      demo.OVERRIDES, reservations="127.0.0.1:9840")
    password_file = tmp_path / "prometheus-password"
    localstack.scrape_with_basic_auth(config, states.RESERVATIONS_JOB, demo.SCRAPER,
                                      password_file)
    jobs = {job["job_name"]: job for job in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert jobs[states.RESERVATIONS_JOB]["basic_auth"] == {
        "username": demo.SCRAPER, "password_file": str(password_file)}
    assert jobs[states.RESERVATIONS_JOB]["static_configs"] == [{"targets": ["127.0.0.1:9840"]}]
    assert all("basic_auth" not in job for name, job in jobs.items()
               if name != states.RESERVATIONS_JOB), "the nodes' jobs are as they were"


def test_basic_auth_for_a_job_the_configuration_lacks_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "targets").mkdir()
    config = localstack.render_config(tmp_path / "prometheus", tmp_path / "targets")
    with pytest.raises(localstack.LocalStackError,
                       match=rf"^{re.escape(str(config))}: no scrape config "
                             rf"'{states.RESERVATIONS_JOB}' to give basic_auth$"):
        localstack.scrape_with_basic_auth(config, states.RESERVATIONS_JOB, "prometheus",
                                          tmp_path / "password")
