"""The gpuwatch command against a small Prometheus API server on 127.0.0.1.

The server holds plain series and answers instant queries for metric names and
{__name__=~"a|b"} selectors, which is all the command asks; everything the command prints is
derived from those series. The end-to-end test runs it against a real Prometheus.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpfake
import pytest
from cli_run import run

from gpuwatch import cli, fleet
from gpuwatch.cli import common, status
from gpuwatch.contract import metrics, states
from tools.localstack import free_port

GIB = 1 << 30


@dataclass
class FakePrometheus:
    series: list[tuple[dict[str, str], float]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    url: str = ""

    def add(self, metric: str, value: float, **labels: str) -> None:
        self.series.append(({"__name__": metric, **labels}, value))

    def answer(self, query: str) -> dict[str, Any]:
        selector = re.fullmatch(r'\{__name__=~"([^"]*)"\}', query)
        stamp = re.fullmatch(r"timestamp\(([a-zA-Z_:][\w:]*)\)", query)
        if stamp:  # when each series was written: now, for these
            moment = time.time()
            result = [{"metric": {k: v for k, v in labels.items() if k != "__name__"},
                       "value": [moment, str(moment)]}
                      for labels, _ in self.series if labels["__name__"] == stamp.group(1)]
            return {"status": "success", "data": {"resultType": "vector", "result": result}}
        if selector:
            names = set(selector.group(1).split("|"))
        elif re.fullmatch(r"[a-zA-Z_:][\w:]*", query):
            names = {query}
        else:
            return {"status": "error", "errorType": "bad_data", "error": f"cannot parse {query}"}
        result = [{"metric": labels, "value": [time.time(), str(value)]}
                  for labels, value in self.series if labels["__name__"] in names]
        return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()

    class Handler(httpfake.QuietHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query).get("query", [""])[0]
            fake.queries.append(query)
            time.sleep(fake.delay)
            if url.path != "/api/v1/query":
                self.send_error(404)
                return
            body = fake.body if fake.body is not None else json.dumps(
                fake.answer(query)).encode()
            self.reply(fake.status, body, [("Content-Type", "application/json")])

    fake.url, stop = httpfake.start(Handler)
    try:
        yield fake
    finally:
        stop()


def add_gpu(fake: FakePrometheus, host: str, gpu: int, state: states.State, users: str = "",
            model: str = "NVIDIA H100 80GB HBM3", used_gib: float | None = None,
            util: float | None = None, port: int = 9839,
            inactive_since: float | None = None,
            reservation: tuple[str, str, float, str] | None = None) -> None:
    """A GPU as the rules and the exporter publish it; `reservation`: (user, until as it was
    written, its Unix time, comment)."""
    ids = {"job": states.JOB, "instance": f"{host}:{port}", "host": host, "gpu": str(gpu),
           "uuid": f"GPU-{host}-{gpu}"}
    fake.add(states.STATE_INFO, 1, **ids, state=state.name, model=model,
             **({"users": users} if users else {}))
    if reservation is not None:
        user, until, end, comment = reservation
        fake.add(states.RESERVED_UNTIL, end, **ids, model=model, user=user, until=until,
                 **({"comment": comment} if comment else {}))
    if state is not states.DOWN:
        fake.add(metrics.INFO.name, 1, **ids, name=model,
                 display_name=model.removeprefix("NVIDIA "))
        fake.add(metrics.MEMORY_TOTAL.name, 80 * GIB, **ids)
    if used_gib is not None:
        fake.add(metrics.MEMORY_USED.name, used_gib * GIB, **ids)
    if util is not None:
        fake.add(metrics.UTILIZATION.name, util, **ids)
    if inactive_since is not None:
        fake.add(states.INACTIVE_SINCE, inactive_since, **ids)
    fake.add(states.STATE_CODE, state.code, **ids)  # the CLI reads the info series, not this
    fake.add(metrics.UP.name, 0 if state is states.DOWN else 1, **ids)


@pytest.fixture
def fleet_of_two(prom: FakePrometheus) -> FakePrometheus:
    now = time.time()
    add_gpu(prom, "node-b", 1, states.IDLE, "erin", used_gib=38, util=0.0,
            inactive_since=now - 7500)
    add_gpu(prom, "node-b", 0, states.FREE, used_gib=0.002, util=0.0)
    add_gpu(prom, "node-a", 10, states.BUSY, "alice,bob", used_gib=20.5, util=0.92)
    add_gpu(prom, "node-a", 2, states.FREE, used_gib=0.0, util=0.0)
    add_gpu(prom, "node-a", 3, states.DOWN)
    add_gpu(prom, "node-a", 4, states.BUSY, used_gib=12, util=0.5)  # no process visible
    add_gpu(prom, "node-a", 5, states.FREE, used_gib=0.0, util=0.0)
    return prom


# -- status -------------------------------------------------------------------------------------

def test_status_json_has_one_object_per_gpu_sorted_by_host_and_index(
        fleet_of_two: FakePrometheus) -> None:
    code, out = run("--prometheus", fleet_of_two.url, "status", "--json")
    assert code == 0
    gpus = json.loads(out)
    assert [(g["host"], g["gpu"]) for g in gpus] == [
        ("node-a", 2), ("node-a", 3), ("node-a", 4), ("node-a", 5), ("node-a", 10),
        ("node-b", 0), ("node-b", 1)]
    by = {(g["host"], g["gpu"]): g for g in gpus}
    busy = by["node-a", 10]
    assert busy["state"] == "busy" and busy["users"] == ["alice", "bob"]
    assert busy["instance"] == "node-a:9839" and busy["uuid"] == "GPU-node-a-10"
    assert busy["model"] == "NVIDIA H100 80GB HBM3" and busy["display_name"] == "H100 80GB HBM3"
    assert busy["memory_used_bytes"] == 20.5 * GIB and busy["memory_total_bytes"] == 80 * GIB
    assert busy["utilization_ratio"] == 0.92 and busy["inactive_since"] is None
    assert by["node-b", 1]["state"] == "idle" and by["node-b", 1]["users"] == ["erin"]
    assert by["node-b", 1]["inactive_since"] is not None
    assert by["node-a", 3]["state"] == "down" and by["node-a", 3]["users"] == []
    assert by["node-a", 3]["memory_used_bytes"] is None
    assert by["node-a", 4]["users"] == []
    assert {g["state"] for g in gpus} <= set(states.BY_NAME)


def test_status_free_lists_only_free_gpus(fleet_of_two: FakePrometheus) -> None:
    code, out = run("status", "--free", "--json", "--prometheus", fleet_of_two.url)
    assert code == 0
    assert [(g["host"], g["gpu"]) for g in json.loads(out)] == [
        ("node-a", 2), ("node-a", 5), ("node-b", 0)]
    code, out = run("--prometheus", fleet_of_two.url, "status", "--free")
    lines = out.splitlines()
    assert [line.split()[:3] for line in lines[1:-1]] == [
        ["node-a", "2", "free"], ["5", "free", "-"], ["node-b", "0", "free"]]


def test_status_grid_names_each_host_once_with_state_users_memory_and_utilisation(
        fleet_of_two: FakePrometheus) -> None:
    code, out = run("--prometheus", fleet_of_two.url, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "GPU", "STATE", "USERS", "MODEL", "MEMORY", "UTIL"]
    assert len(lines) == 1 + 7 + 1
    assert sum(line.startswith("node-a") for line in lines) == 1
    assert sum(line.startswith("node-b") for line in lines) == 1
    busy = next(line for line in lines if " 10 " in line)
    assert "busy" in busy and "alice,bob" in busy and "H100 80GB HBM3" in busy
    assert "20.5/80.0 GiB" in busy and "92%" in busy
    assert "idle 2h05m" in next(line for line in lines if "erin" in line)
    unseen = next(line for line in lines if line.split()[:2] == ["4", "busy"])
    assert unseen.split()[2] == "?"
    assert lines[-1] == "7 GPUs on 2 hosts: 3 free, 2 busy, 1 idle, 1 down"
    assert "\033[" not in out  # not a terminal


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_colours_states_on_a_terminal_only(fleet_of_two: FakePrometheus,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = Terminal()
    assert cli.main(["--prometheus", fleet_of_two.url, "status"], out=terminal) == 0
    painted = terminal.getvalue()
    assert "\033[32mfree" in painted and "\033[31mdown" in painted
    assert "\033[33mbusy" in painted and "\033[35midle" in painted
    monkeypatch.setenv("NO_COLOR", "1")
    quiet = Terminal()
    assert cli.main(["--prometheus", fleet_of_two.url, "status"], out=quiet) == 0
    assert "\033[" not in quiet.getvalue()
    assert run("--prometheus", fleet_of_two.url, "status", "--color", "always")[1].count(
        "\033[32mfree") == 3


def test_status_when_two_exporters_share_a_host_names_them_by_target(
        prom: FakePrometheus) -> None:
    add_gpu(prom, "10.0.0.5", 0, states.FREE, port=9839)
    add_gpu(prom, "10.0.0.5", 0, states.BUSY, "alice", port=9840)
    code, out = run("--prometheus", prom.url, "status")
    assert code == 0
    assert "10.0.0.5:9839" in out and "10.0.0.5:9840" in out
    assert out.splitlines()[-1] == "2 GPUs on 2 hosts: 1 free, 1 busy"


def test_prometheus_url_comes_from_the_environment_unless_given(
        fleet_of_two: FakePrometheus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(common.ENV_PROMETHEUS, fleet_of_two.url)
    code, out = run("status", "--json")
    assert code == 0 and len(json.loads(out)) == 7
    assert fleet_of_two.queries[0] == states.STATE_INFO
    monkeypatch.setenv(common.ENV_PROMETHEUS, f"http://127.0.0.1:{free_port()}")
    code, out = run("status", "--prometheus", fleet_of_two.url, "--json")
    assert code == 0 and len(json.loads(out)) == 7


def test_default_prometheus_is_localhost_9090(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(common.ENV_PROMETHEUS, raising=False)
    args = cli.build_parser().parse_args(["status"])
    assert args.prometheus == "http://localhost:9090"


# -- errors: one line, exit 1 -------------------------------------------------------------------

def _one_error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out = run(*argv)
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpuwatch: error: "), err
    return err


def test_unreachable_prometheus_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    err = _one_error_line(capsys, "--prometheus", url, "status")
    assert f"cannot reach Prometheus at {url}" in err
    err = _one_error_line(capsys, "--prometheus", url, "pick", "1")
    assert f"cannot reach Prometheus at {url}" in err


def test_prometheus_errors_are_one_line_and_exit_1(prom: FakePrometheus,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    prom.status, prom.body = 503, b'{"status":"error","error":"too many queries"}'
    err = _one_error_line(capsys, "--prometheus", prom.url, "status", "--json")
    assert "HTTP 503: too many queries" in err
    prom.status, prom.body = 200, b"<html>a login page</html>"
    err = _one_error_line(capsys, "--prometheus", prom.url, "status")
    assert "did not answer like the Prometheus HTTP API" in err
    prom.body = None
    err = _one_error_line(capsys, "--prometheus", prom.url + "/", "status")
    assert "knows no GPUs" in err and states.STATE_INFO in err
    err = _one_error_line(capsys, "--prometheus", "localhost:9090", "status")
    assert "not a Prometheus URL" in err


def test_a_slow_prometheus_is_one_line_and_exit_1(fleet_of_two: FakePrometheus,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fleet_of_two.delay = 2.0
    err = _one_error_line(capsys, "--prometheus", fleet_of_two.url, "--timeout", "0.2",
                          "status")
    assert "did not answer within 0.2 s" in err


# -- pick ---------------------------------------------------------------------------------------

def test_pick_prints_the_lowest_free_indices_of_the_host(fleet_of_two: FakePrometheus) -> None:
    assert run("--prometheus", fleet_of_two.url, "pick", "2", "--host", "node-a") == (0, "2,5\n")
    assert run("--prometheus", fleet_of_two.url, "pick", "1", "--host", "node-a:9839") == \
        (0, "2\n")
    assert run("--prometheus", fleet_of_two.url, "pick", "1", "--host", "node-b") == (0, "0\n")


def test_a_gpu_without_a_fresh_reading_is_down_and_never_picked(
        fleet_of_two: FakePrometheus) -> None:
    # GPU 2 hangs: the exporter says nvidia_gpu_up 0, while the state rule, evaluated before
    # that scrape (or by rules older than the exporter), still says free
    fleet_of_two.series = [(labels, 0.0 if labels["__name__"] == metrics.UP.name
                            and labels["gpu"] == "2" and labels["host"] == "node-a" else value)
                           for labels, value in fleet_of_two.series]
    # GPU 5: the rule says free, but no nvidia_gpu_up for it at all
    fleet_of_two.series = [(labels, value) for labels, value in fleet_of_two.series
                           if not (labels["__name__"] == metrics.UP.name
                                   and labels["gpu"] == "5")]
    code, out = run("--prometheus", fleet_of_two.url, "status", "--json")
    by = {(g["host"], g["gpu"]): g["state"] for g in json.loads(out)}
    assert (by["node-a", 2], by["node-a", 5], by["node-b", 0]) == ("down", "down", "free")
    assert run("--prometheus", fleet_of_two.url, "pick", "1", "--host", "node-b") == (0, "0\n")
    code, _ = run("--prometheus", fleet_of_two.url, "pick", "1", "--host", "node-a")
    assert code != 0


def test_pick_without_enough_free_gpus_says_which_are(fleet_of_two: FakePrometheus,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_error_line(capsys, "--prometheus", fleet_of_two.url, "pick", "3", "--host",
                          "node-a")
    assert "node-a has 2 free GPUs (of 5), 3 wanted: 2, 5" in err


def test_pick_finds_this_machine_by_its_host_names(fleet_of_two: FakePrometheus,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fleet.socket, "gethostname", lambda: "node-b")
    monkeypatch.setattr(fleet.socket, "getfqdn", lambda: "node-b.example.org")
    assert run("--prometheus", fleet_of_two.url, "pick", "1") == (0, "0\n")
    monkeypatch.setattr(fleet.socket, "gethostname", lambda: "laptop")
    monkeypatch.setattr(fleet.socket, "getfqdn", lambda: "laptop")
    err = _one_error_line(capsys, "--prometheus", fleet_of_two.url, "pick", "1")
    assert "not among the hosts Prometheus knows (node-a, node-b); pass --host" in err


def test_local_names_include_loopback_only_when_prometheus_runs_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.socket, "gethostname", lambda: "ws1.lab")
    monkeypatch.setattr(fleet.socket, "getfqdn", lambda: "ws1.lab.example.org")
    assert fleet.local_names("http://prometheus.example.org:9090") == [
        "ws1.lab.example.org", "ws1.lab", "ws1"]
    for url in ("http://localhost:9090", "http://127.0.0.1:9090", "http://[::1]:9090",
                "http://ws1:9090"):
        assert "localhost" in fleet.local_names(url), url
        assert fleet.local_names(url)[:3] == ["ws1.lab.example.org", "ws1.lab", "ws1"]


def test_pick_refuses_a_host_with_two_exporters(prom: FakePrometheus,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    add_gpu(prom, "10.0.0.5", 0, states.FREE, port=9839)
    add_gpu(prom, "10.0.0.5", 0, states.FREE, port=9840)
    err = _one_error_line(capsys, "--prometheus", prom.url, "pick", "1", "--host", "10.0.0.5")
    assert "10.0.0.5:9839, 10.0.0.5:9840" in err
    assert run("--prometheus", prom.url, "pick", "1", "--host", "10.0.0.5:9840") == (0, "0\n")


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "nan"])
def test_timeout_must_be_positive(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["status", "--timeout", timeout])
    assert exit.value.code == 2
    assert "--timeout" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_pick_wants_a_positive_count(count: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["pick", count])
    assert exit.value.code == 2
    assert "argument N" in capsys.readouterr().err


# -- pieces -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h00m"), (7500, "2h05m"),
    (86400 + 4 * 3600 + 59, "1d04h"), (-5, "0s")])
def test_duration(seconds: float, text: str) -> None:
    assert status.duration(seconds) == text


def test_commands_are_subcommands_for_later_ones_to_join() -> None:
    parser = cli.build_parser()
    names = [c.name for c in cli.COMMANDS]
    assert names[:5] == ["status", "pick", "reserve", "release", "reservations"]
    assert "run" in names and len(set(names)) == len(names)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert parser.parse_args(["status", "--json"]).run is not None


def test_a_reader_that_goes_away_ends_the_output_quietly(prom: FakePrometheus) -> None:
    for index in range(2000):  # far more JSON than a pipe buffers
        add_gpu(prom, f"node-{index // 8:03d}", index % 8, states.FREE, used_gib=0, util=0)
    process = subprocess.Popen([sys.executable, "-m", "gpuwatch.cli", "--prometheus", prom.url,
                                "status", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # `gpuwatch status --json | head -0`
    assert process.wait(timeout=60) == 1
    assert process.stderr.read() == b""


# -- reservations in the grid --------------------------------------------------------------------

END = 4_102_444_800.0  # 2100-01-01T00:00:00Z


@pytest.fixture
def booked_fleet(prom: FakePrometheus) -> FakePrometheus:
    add_gpu(prom, "node-a", 0, states.RESERVED, used_gib=0, util=0,
            reservation=("alice", "2100-01-01 01:00+01:00", END, "NeurIPS deadline"))
    add_gpu(prom, "node-a", 1, states.BUSY, "bob", used_gib=30, util=0.0,
            reservation=("bob", "2100-01-01 00:00+00:00", END, ""))
    add_gpu(prom, "node-a", 2, states.RESERVED, "dave", used_gib=10, util=0.9,
            reservation=("carol", "2100-01-01 00:00+00:00", END, "demo"))
    add_gpu(prom, "node-a", 3, states.FREE, used_gib=0, util=0)
    return prom


def test_status_json_carries_the_booking_of_a_booked_gpu(booked_fleet: FakePrometheus) -> None:
    code, out = run("--prometheus", booked_fleet.url, "status", "--json")
    assert code == 0
    by = {g["gpu"]: g for g in json.loads(out)}
    assert by[0]["state"] == "reserved" and by[0]["users"] == []
    assert by[0]["reservation"] == {"user": "alice", "until": "2100-01-01T01:00:00+01:00",
                                    "until_timestamp": END, "comment": "NeurIPS deadline"}
    assert by[1]["state"] == "busy" and by[1]["users"] == ["bob"]
    assert by[1]["reservation"]["user"] == "bob" and by[1]["reservation"]["comment"] == ""
    assert by[2]["users"] == ["dave"] and by[2]["reservation"]["user"] == "carol"
    assert by[3]["reservation"] is None


def test_status_grid_shows_who_booked_until_when_and_why(booked_fleet: FakePrometheus) -> None:
    lines = run("--prometheus", booked_fleet.url, "status")[1].splitlines()
    assert lines[0].split() == ["HOST", "GPU", "STATE", "USERS", "MODEL", "MEMORY", "UTIL",
                                "RESERVATION"]
    column = lines[0].index("RESERVATION")
    assert [line[column:] for line in lines[1:5]] == [
        "alice until 2100-01-01 01:00+01:00 (NeurIPS deadline)",
        "bob until 2100-01-01 00:00+00:00", "carol until 2100-01-01 00:00+00:00 (demo)", "-"]
    assert lines[1].split()[2:4] == ["reserved", "-"]
    assert lines[3].split()[1:3] == ["reserved", "dave"]  # who is on it, though carol booked it
    assert lines[-1] == "4 GPUs on 1 host: 1 free, 1 busy, 2 reserved"
    painted = run("--prometheus", booked_fleet.url, "status", "--color", "always")[1]
    assert "\033[34mreserved" in painted


def test_pick_offers_your_own_booked_gpus_first(booked_fleet: FakePrometheus,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--prometheus", booked_fleet.url, "pick", "2", "--host", "node-a",
               "--user", "alice") == (0, "0,3\n")
    assert run("--prometheus", booked_fleet.url, "pick", "1", "--host", "node-a",
               "--user", "zoe") == (0, "3\n")
    # carol's booked GPU is in dave's hands: not hers to pick
    err = _one_error_line(capsys, "--prometheus", booked_fleet.url, "pick", "2", "--host",
                          "node-a", "--user", "carol")
    assert "node-a has 1 free GPU (of 4), 2 wanted: 3" in err
    err = _one_error_line(capsys, "--prometheus", booked_fleet.url, "pick", "3", "--host",
                          "node-a", "--user", "alice")
    assert "node-a has 1 free GPU (and 1 booked by alice) (of 4), 3 wanted: 0, 3" in err
