"""The command line as a client of `gpuwatch serve`: the credentials, the one-line errors, reserve
/ release / reservations through the API, and `gpuwatch run`, each against a fake service on
127.0.0.1 that keeps bookings and claims in memory and answers as the API does."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpfake
import pytest
from cli_run import one_error, run
from paths import REPO

from gpuwatch import fleet
from gpuwatch.cli import client
from gpuwatch.cli import run as run_command

PASSWORDS = {"alice": "alice-s3cret", "bob": "bob-s3cret", "root": "root-s3cret"}
ADMINS = {"root"}


@dataclass
class FakeService:
    """Bookings, claims and a 16-GPU host `node-a` (and a 2-GPU `node-b`), as the API shows
    them; `requests` records (method, path, user, body) of every request."""

    url: str = ""
    bookings: dict[str, dict[str, Any]] = field(default_factory=dict)
    claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, str | None, Any]] = field(default_factory=list)
    gpus: dict[str, int] = field(default_factory=lambda: {"node-a": 16, "node-b": 2})
    redirect_to: str | None = None
    """Answer every request with a 307 to this URL (a moved or hostile server)."""
    refuse_claims: int = 0
    """How many claims to refuse (409) before granting."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def book(self, host: str, gpus: Any, user: str, until: str = "2099-01-01T00:00:00+00:00",
             comment: str = "") -> str:
        booking_id = f"r{next(self.ids)}"
        self.bookings[booking_id] = {"id": booking_id, "host": host, "gpus": gpus,
                                     "user": user, "start": "2024-01-01T00:00:00+00:00",
                                     "until": until, "comment": comment}
        return booking_id

    def answer(self, method: str, path: str, user: str | None,
               body: Any) -> tuple[int, Any]:
        self.requests.append((method, path, user, body))
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/api/v1/reservations":
            return 200, {"reservations": list(self.bookings.values())}
        if method == "GET" and path == "/api/v1/history":
            return 200, {"entries": self.history}
        if method == "GET" and path == "/api/v1/fleet":
            return 200, {"gpus": [{"host": h, "instance": f"{h}:9839", "gpu": i,
                                   "state": "free"} for h, n in self.gpus.items()
                                  for i in range(n)]}
        if method == "GET" and path == "/api/v1/claims":
            return 200, {"claims": list(self.claims.values())}
        if user is None:
            return 401, {"error": "who are you? this service needs a user"}
        if method == "POST" and path == "/api/v1/reservations":
            if body.get("user", user) != user and user not in ADMINS:
                return 403, {"error": "only admins book for others"}
            if body["host"] not in self.gpus:
                return 400, {"error": f"unknown host {body['host']!r}; known: node-a, node-b"}
            booking_id = self.book(body["host"], body["gpus"], body.get("user", user),
                                   body["until"], body.get("comment", ""))
            if "start" in body:
                self.bookings[booking_id]["start"] = body["start"]
            return 201, self.bookings[booking_id]
        if method == "DELETE" and parts[:3] == ["api", "v1", "reservations"]:
            found = self.bookings.get(parts[3])
            if found is None:
                return 404, {"error": f"no booking {parts[3]}"}
            if found["user"] != user and user not in ADMINS:
                return 403, {"error": f"{parts[3]} is {found['user']}'s booking"}
            del self.bookings[parts[3]]
            return 204, None
        if method == "POST" and path == "/api/v1/claims":
            return self._claim(user, body)
        if method == "DELETE" and parts[:3] == ["api", "v1", "claims"]:
            if self.claims.pop(parts[3], None) is None:
                return 404, {"error": f"no claim {parts[3]}"}
            return 204, None
        return 404, {"error": f"no {method} {path}"}

    def _claim(self, user: str, body: Any) -> tuple[int, Any]:
        host, count = body["host"], body["count"]
        if host not in self.gpus:
            return 400, {"error": f"unknown host {host!r}; known: node-a, node-b"}
        taken = {i for c in self.claims.values() if c["host"] == host for i in c["gpus"]}
        free = [i for i in range(self.gpus[host]) if i not in taken]
        if self.refuse_claims > 0 or len(free) < count:
            self.refuse_claims -= 1
            return 409, {"error": f"{host} has {len(free)} free GPUs, {count} wanted"}
        claim_id = f"c{next(self.ids)}"
        self.claims[claim_id] = {"id": claim_id, "host": host, "gpus": free[:count],
                                 "uuids": [f"GPU-{host}-{i}" for i in free[:count]],
                                 "user": user, "until": "2099-01-01T00:05:00+00:00"}
        return 201, self.claims[claim_id]


def _handler(fake: FakeService) -> type[httpfake.QuietHandler]:
    class Handler(httpfake.QuietHandler):
        def _user(self) -> str | None:
            header = self.headers.get("Authorization", "")
            if not header.startswith("Basic "):
                return None
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return name if PASSWORDS.get(name) == password else "?"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            user = self._user()
            if fake.redirect_to:
                self.reply(307, b"", [("Location", fake.redirect_to + self.path)])
                return
            with fake.lock:
                if user == "?":
                    status, answer = 401, {"error": "wrong user or password"}
                else:
                    status, answer = fake.answer(self.command, self.path, user, body)
            data = b"" if answer is None else json.dumps(answer).encode()
            self.reply(status, data, [("Content-Type", "application/json")])

        do_GET = do_POST = do_DELETE = _serve

    return Handler


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeService]:
    fake = FakeService()
    fake.url, stop = httpfake.start(_handler(fake))
    for name in (client.ENV_USER, client.ENV_PASSWORD, client.ENV_SERVER, "GPUWATCH_RESERVATIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(client.ENV_NETRC, str(tmp_path / "no-netrc"))
    monkeypatch.setenv(client.ENV_SERVER, fake.url)
    as_user(monkeypatch, "alice")
    try:
        yield fake
    finally:
        stop()


def as_user(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(client.ENV_USER, name)
    monkeypatch.setenv(client.ENV_PASSWORD, PASSWORDS[name])
    monkeypatch.setattr("getpass.getuser", lambda: name)


def no_password_in(*texts: str) -> None:
    for text in texts:
        for password in PASSWORDS.values():
            assert password not in text


# -- credentials -------------------------------------------------------------------------------

def test_the_user_and_password_come_from_the_environment(service: FakeService) -> None:
    assert run("reserve", "node-a:0", "--until", "+1d")[0] == 0
    assert service.requests[-1][:3] == ("POST", "/api/v1/reservations", "alice")


def test_without_the_environment_the_netrc_entry_of_the_servers_host(
        service: FakeService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(client.ENV_USER)
    monkeypatch.delenv(client.ENV_PASSWORD)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine elsewhere login root password root-s3cret\n"
                     "machine 127.0.0.1 login bob password bob-s3cret\n")
    monkeypatch.setenv(client.ENV_NETRC, str(netrc))
    assert run("reserve", "node-a:0", "--until", "+1d")[0] == 0
    assert service.requests[-1][2] == "bob"
    # without $NETRC: ~/.netrc
    monkeypatch.delenv(client.ENV_NETRC)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("default login alice password alice-s3cret\n")
    assert run("reserve", "node-a:1", "--until", "+1d")[0] == 0
    assert service.requests[-1][2] == "alice"


def test_a_malformed_netrc_is_one_line_naming_it_and_not_its_secret(
        service: FakeService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(client.ENV_USER)
    monkeypatch.delenv(client.ENV_PASSWORD)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob bob-s3cret\n")
    monkeypatch.setenv(client.ENV_NETRC, str(netrc))
    err = one_error(capsys, "reserve", "node-a:0", "--until", "+1d")
    assert f"{netrc}: line " in err and ": not a netrc file curl can read" in err
    no_password_in(err)


def test_the_password_is_in_no_output_nor_error(service: FakeService,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    texts = []
    for argv in (["reserve", "node-a:0", "--until", "+1d"], ["reservations"],
                 ["reservations", "--json"], ["release", "node-a"],
                 ["run", "-n", "1", "--host", "node-a", "--", "true"]):
        texts += [run(*argv)[1], *capsys.readouterr()]
    monkeypatch.setenv(client.ENV_PASSWORD, "wrong-s3cret")
    err = one_error(capsys, "reservations")
    assert f"gpuwatch serve at {service.url} did not accept you as alice" in err
    texts.append(err)
    url = service.url.replace("//", "//alice:alice-s3cret@")
    monkeypatch.delenv(client.ENV_USER)
    monkeypatch.delenv(client.ENV_PASSWORD)
    assert run("reserve", "node-a:5", "--until", "+1d", "--server", url)[0] == 0
    texts += capsys.readouterr()
    err = one_error(capsys, "reservations", "--server", url.replace(
        service.url.rsplit(":", 1)[1], "1"))
    assert "cannot reach gpuwatch serve at http://127.0.0.1:1" in err
    texts.append(err)
    no_password_in(*texts)


def test_a_user_without_password_is_told_where_one_goes(
        service: FakeService, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(client.ENV_PASSWORD)
    err = one_error(capsys, "reservations")
    assert f"{client.ENV_USER} is set but no password: set {client.ENV_PASSWORD}" in err


def test_without_credentials_writes_are_refused_with_how_to_give_them(
        service: FakeService, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(client.ENV_USER)
    monkeypatch.delenv(client.ENV_PASSWORD)
    assert run("reservations")[0] == 0  # reading needs no one
    err = one_error(capsys, "reserve", "node-a:0", "--until", "+1d")
    assert "did not accept you without a user: set GPUWATCH_USER and GPUWATCH_PASSWORD, or " \
        "a netrc entry for machine 127.0.0.1" in err


@pytest.mark.parametrize("url", ["monitor:9840", "ftp://monitor", "http://"])
def test_a_server_that_is_no_url_is_one_line(url: str, service: FakeService,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not the URL of gpuwatch serve" in one_error(capsys, "reservations",
                                                           "--server", url)


def test_an_answer_that_is_not_the_apis_is_one_line(service: FakeService,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    service.requests.clear()
    err = one_error(capsys, "reservations", "--server", service.url + "/nothing")
    assert "HTTP 404" in err or "no GET" in err


def test_file_and_server_together_are_refused(service: FakeService, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    err = one_error(capsys, "reservations", "--server", service.url, "--file",
                    str(tmp_path / "r.yml"))
    assert "--file and --server: give one" in err


def test_the_file_is_used_when_named_even_with_a_server_in_the_environment(
        service: FakeService, tmp_path: Path) -> None:
    path = tmp_path / "r.yml"
    assert run("reserve", "n1:0", "--until", "+1d", "--file", str(path))[0] == 0
    assert path.exists() and not service.requests


# -- reserve, reservations, release through the service ---------------------------------------

def test_reserve_posts_the_booking_and_says_its_id(service: FakeService) -> None:
    code, out = run("reserve", "node-a:0-1", "--until", "2099-05-31T18:00+02:00",
                    "--comment", "NeurIPS  deadline")
    assert code == 0
    assert out == "booked GPUs 0-1 of node-a for alice until 2099-05-31 18:00+02:00 " \
        "(NeurIPS deadline) [r1]\n"
    assert service.requests[-1][3] == {"host": "node-a", "gpus": [0, 1],
                                       "until": "2099-05-31T18:00:00+02:00",
                                       "comment": "NeurIPS deadline"}
    assert run("reserve", "node-b:all", "--until", "+1d", "--from", "+1h", "--user", "bob",
               "--force")[0] == 1  # alice is no admin
    body = service.requests[-1][3]
    assert (body["gpus"], body["user"], body["force"], "start" in body) == \
        ("all", "bob", True, True)


def test_a_refusal_is_the_apis_error_in_one_line(service: FakeService,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    err = one_error(capsys, "reserve", "gpu-x:0", "--until", "+1d")
    assert err == f"gpuwatch: error: gpuwatch serve at {service.url}: unknown host 'gpu-x'; " \
        "known: node-a, node-b\n"
    assert "--file only" in one_error(capsys, "reserve", "node-a:0", "--until", "+1d",
                                      "--replace")


def test_reservations_lists_the_services_bookings_with_their_ids(service: FakeService) -> None:
    service.book("node-b", [1], "bob", comment="sweep")
    service.book("node-a", "all", "alice")
    service.book("node-a", [3], "carol", until="2001-01-01T00:00:00+00:00")
    _code, out = run("reservations")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "HOST", "GPUS", "USER", "FROM", "UNTIL", "COMMENT"]
    assert [r.split()[:4] for r in rows] == [["r2", "node-a", "all", "alice"],
                                             ["r1", "node-b", "1", "bob"]]
    listed = json.loads(run("reservations", "list", "--all", "--json")[1])
    assert [(b["id"], b["host"], b["gpus"], b["expired"]) for b in listed] == [
        ("r2", "node-a", "all", False), ("r3", "node-a", [3], True), ("r1", "node-b", [1], False)]
    assert run("reservations", "--user", "nobody")[1] == f"no current bookings in {service.url}\n"


def test_release_by_id(service: FakeService, capsys: pytest.CaptureFixture[str]) -> None:
    mine = service.book("node-a", [0], "alice")
    theirs = service.book("node-a", [1], "bob")
    assert run("release", mine) == (0, "released GPU 0 of node-a for alice until "
                                       "2099-01-01 00:00+00:00\n")
    assert f"{theirs} is bob's booking" in one_error(capsys, "release", theirs)
    assert list(service.bookings) == [theirs]


def test_release_of_a_host_gives_back_only_your_own(service: FakeService,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    service.book("node-a", [0], "alice")
    service.book("node-a", [1], "bob")
    assert run("release", "node-a")[1] == "released GPU 0 of node-a for alice until " \
        "2099-01-01 00:00+00:00\n"
    assert [b["user"] for b in service.bookings.values()] == ["bob"]
    assert "there is no booking of node-a:all by alice" in one_error(capsys, "release", "node-a")


def test_an_admin_releases_others_by_naming_them(service: FakeService,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    service.book("node-a", [0, 1, 2], "bob", comment="sweep")
    service.book("node-a", [3], "carol")
    as_user(monkeypatch, "root")
    code, out = run("release", "node-a:1", "--user", "bob")
    assert (code, out) == (0, "released GPU 1 of node-a for bob until 2099-01-01 00:00+00:00 "
                              "(sweep); GPUs 0,2 stay booked\n")
    assert sorted((b["user"], str(b["gpus"])) for b in service.bookings.values()) == [
        ("bob", "[0, 2]"), ("carol", "[3]")]
    kept = next(b for b in service.bookings.values() if b["user"] == "bob")
    assert (kept["comment"], kept["start"]) == ("sweep", "2024-01-01T00:00:00+00:00")


def test_release_expired_through_the_service(service: FakeService,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(monkeypatch, "root")
    service.book("node-a", [0], "bob", until="2001-01-01T00:00:00+00:00")
    service.book("node-a", [1], "bob")
    assert run("release", "--expired")[1].startswith("released GPU 0 of node-a for bob")
    assert len(service.bookings) == 1


def test_history_through_the_service(service: FakeService) -> None:
    booking = {"id": "a1b2c3d4", "host": "node-a", "gpus": [0, 1], "user": "alice",
               "start": "2024-05-01T10:00:00+00:00", "until": "2024-05-02T00:00:00+00:00",
               "comment": ""}
    service.history = [
        {"time": "2024-05-01T10:00:00+00:00", "who": "alice", "action": "add",
         "from": "10.0.0.5", "reservations": [booking]},
        {"time": "2024-05-01T11:00:00+00:00", "who": "root", "action": "release",
         "from": "10.0.0.9", "reservations": [booking], "kept": [booking | {"gpus": [0]}]},
        {"time": "2024-05-01T12:00:00+00:00", "who": "bob", "action": "add",
         "reservations": [booking | {"host": "node-b", "user": "bob"}]}]
    _code, out = run("reservations", "--history")
    assert out.splitlines() == [
        "2024-05-01 10:00+00:00 alice add GPUs 0-1 of node-a for alice until 2024-05-02 "
        "00:00+00:00 [a1b2c3d4] from 10.0.0.5",
        "2024-05-01 11:00+00:00 root release GPUs 0-1 of node-a for alice until 2024-05-02 "
        "00:00+00:00 [a1b2c3d4] (kept: GPU 0 of node-a for alice until 2024-05-02 "
        "00:00+00:00 [a1b2c3d4]) from 10.0.0.9",
        "2024-05-01 12:00+00:00 bob add GPUs 0-1 of node-b for bob until 2024-05-02 "
        "00:00+00:00 [a1b2c3d4]"]
    assert json.loads(run("reservations", "--history", "--host", "node-b", "--json")[1]) == \
        service.history[2:]
    assert len(json.loads(run("reservations", "--history", "--user", "alice", "--json")[1])) \
        == 2
    assert service.requests[-1][:2] == ("GET", "/api/v1/history")


# -- gpuwatch run -----------------------------------------------------------------------------

def test_run_sets_the_claimed_uuids_runs_the_command_and_ends_the_claim(
        service: FakeService, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    seen = tmp_path / "seen"
    code, _ = run("run", "-n", "2", "--host", "node-a", "--minutes", "10", "--model", "H100",
                  "--", "sh", "-c", f'echo "$CUDA_VISIBLE_DEVICES" > {seen}; exit 3')
    assert code == 3
    assert seen.read_text() == "GPU-node-a-0,GPU-node-a-1\n"
    posted = next(r for r in service.requests if r[:2] == ("POST", "/api/v1/claims"))
    assert posted[3] == {"count": 2, "host": "node-a", "model": "H100", "minutes": 10}
    assert service.requests[-1][:2] == ("DELETE", "/api/v1/claims/c1") and not service.claims
    assert "gpuwatch: claimed GPUs 0,1 of node-a for alice until" in capfd.readouterr().err


def test_run_finds_this_machine_in_the_fleet(service: FakeService,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.socket, "gethostname", lambda: "node-b")
    monkeypatch.setattr(fleet.socket, "getfqdn", lambda: "node-b.example.org")
    assert run("run", "-n", "1", "--", "true")[0] == 0
    assert service.requests[-2][3]["host"] == "node-b"


def test_run_on_a_machine_the_fleet_does_not_know(service: FakeService,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fleet.socket, "gethostname", lambda: "laptop")
    monkeypatch.setattr(fleet.socket, "getfqdn", lambda: "laptop")
    err = one_error(capsys, "run", "-n", "1", "--", "true")
    assert err.startswith("gpuwatch: error: laptop / localhost")  # serve runs here: loopback
    assert "is not among the hosts of the fleet (node-a, node-b); pass --host" in err


def test_run_without_free_gpus_is_one_line_and_runs_nothing(
        service: FakeService, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = tmp_path / "ran"
    err = one_error(capsys, "run", "-n", "3", "--host", "node-b", "--", "touch", str(ran))
    assert err == f"gpuwatch: error: gpuwatch serve at {service.url}: node-b has 2 free " \
        "GPUs, 3 wanted\n"
    assert not ran.exists()


def test_run_with_wait_asks_again_until_the_gpus_are_free(
        service: FakeService, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    slept: list[float] = []
    monkeypatch.setattr(run_command.time, "sleep", slept.append)
    service.refuse_claims = 2
    assert run("run", "-n", "1", "--host", "node-a", "--wait", "1m", "--", "true")[0] == 0
    assert slept == [run_command.RETRY_SECONDS] * 2
    capsys.readouterr()
    clock = iter(range(0, 1000, 30))
    monkeypatch.setattr(run_command.time, "monotonic", lambda: float(next(clock)))
    service.refuse_claims = 100
    err = one_error(capsys, "run", "-n", "1", "--host", "node-a", "--wait", "90s", "--", "true")
    assert "node-a has 16 free GPUs, 1 wanted (still, after waiting 90 s)" in err


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("5m", 300),
                                               ("1h30m", 5400), ("2d", 172800)])
def test_wait_durations(text: str, seconds: float) -> None:
    assert run_command.duration(text) == seconds


def test_a_bad_wait_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run("run", "-n", "1", "--wait", "soon", "--", "true")
    assert "'soon' is not a duration" in capsys.readouterr().err


def test_a_command_killed_by_a_signal_exits_128_plus_it(service: FakeService) -> None:
    assert run("run", "-n", "1", "--host", "node-a", "--", "sh", "-c", "kill -TERM $$")[0] == \
        128 + signal.SIGTERM
    assert not service.claims


def test_a_missing_command_is_127_and_the_claim_ends(service: FakeService,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert run("run", "-n", "1", "--host", "node-a", "--", "no-such-command-x")[0] == 127
    assert "no-such-command-x: command not found" in capsys.readouterr().err
    assert not service.claims


def test_a_claim_that_ended_already_is_fine(service: FakeService,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the service ends a claim once the owner's process is on its GPUs: the DELETE is a 404
    code, _ = run("run", "-n", "1", "--host", "node-a", "--", "sh", "-c", "true")
    assert code == 0
    service.claims.clear()
    held = run_command.Claim("c9", "node-a", (0,), ("GPU-0",), "alice",
                             run_command.dt.datetime.now(run_command.dt.timezone.utc))
    run_command.end_claim(client.Service.from_environment(service.url), held)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_run_forwards_signals_to_the_command_and_ends_the_claim(
        service: FakeService, tmp_path: Path, sent: signal.Signals) -> None:
    ready, got = tmp_path / "ready", tmp_path / "got"
    script = (f"trap 'echo {sent.name} > {got}; exit 7' {sent.name[3:]}; touch {ready}; "
              "while true; do sleep 0.05; done")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    process = subprocess.Popen([sys.executable, "-m", "gpuwatch.cli", "run", "-n", "1",
                                "--host", "node-a", "--", "sh", "-c", script], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), process.communicate()[1]
        process.send_signal(sent)
        assert process.wait(timeout=30) == 7
    finally:
        process.kill()
        process.wait()
    assert got.read_text() == f"{sent.name}\n"
    assert not service.claims and service.requests[-1][:2] == ("DELETE", "/api/v1/claims/c1")
    assert process.stderr is not None
    no_password_in(process.stderr.read())


# -- the same with --file (the admin on the monitoring host) ----------------------------------

@pytest.fixture
def rfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (client.ENV_SERVER, client.ENV_USER, client.ENV_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "reservations.yml"
    monkeypatch.setenv("GPUWATCH_RESERVATIONS", str(path))
    monkeypatch.setattr("getpass.getuser", lambda: "alice")
    return path


def test_release_of_a_host_in_the_file_gives_back_only_your_own(
        rfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("reserve", "n1:0", "--until", "+1d")[0] == 0
    assert run("reserve", "n1:1", "--until", "+1d", "--user", "bob")[0] == 0
    assert run("release", "n1")[1].startswith("released GPU 0 of n1 for alice")
    assert [b["user"] for b in json.loads(run("reservations", "--json")[1])] == ["bob"]
    assert "there is no booking of n1:all by alice" in one_error(capsys, "release", "n1")
    assert run("release", "n1", "--user", "bob")[1].startswith("released GPU 1 of n1 for bob")


def test_release_by_id_in_the_file(rfile: Path) -> None:
    assert run("reserve", "n1:0", "--until", "+1d", "--user", "bob")[0] == 0
    (listed,) = json.loads(run("reservations", "--json")[1])
    assert run("release", listed["id"])[1].startswith("released GPU 0 of n1 for bob")
    assert json.loads(run("reservations", "--json")[1]) == []


def test_history_of_the_file(rfile: Path) -> None:
    assert run("reserve", "n1:0-1", "--until", "2099-01-01T00:00+00:00")[0] == 0
    assert run("release", "n1:1")[0] == 0
    lines = run("reservations", "--history")[1].splitlines()
    assert len(lines) == 2
    assert " alice add GPUs 0-1 of n1 for alice until 2099-01-01 00:00+00:00 [" in lines[0]
    assert " alice release GPUs 0-1 of n1 for alice until 2099-01-01 00:00+00:00 [" in lines[1]
    assert "(kept: GPU 0 of n1 for alice" in lines[1] and lines[1].endswith("from file")
    entries = json.loads(run("reservations", "--history", "--json", "--user", "alice")[1])
    assert [e["action"] for e in entries] == ["add", "release"]
    assert run("reservations", "--history", "--host", "n2")[1].startswith("no history in ")


# -- round trips with the real gpuwatch serve (in this process) --------------------------------

@pytest.fixture
def real_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import bcrypt

    from gpuwatch.fleet import GpuStatus
    from gpuwatch.serve.app import start
    from gpuwatch.serve.options import ServeOptions

    config = tmp_path / "web.yml"
    config.write_text("basic_auth_users:\n" + "".join(
        f"  {name}: {bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for name, pw in PASSWORDS.items()))
    gpus = [GpuStatus(host=host, instance=f"{host}:9839", gpu=i, uuid=f"GPU-{host}-{i}",
                      state="free", users=(), model="NVIDIA A100-SXM4-80GB",
                      display_name="A100", memory_used_bytes=0.0, memory_total_bytes=80e9,
                      utilization_ratio=0.0, inactive_since=None)
            for host, count in (("node-a", 4), ("node-b", 2)) for i in range(count)]
    options = ServeOptions(reservations_file=tmp_path / "reservations.yml",
                           listen_address="127.0.0.1:0", web_config_file=config,
                           admins=frozenset({"root"}), own_process_metrics=False,
                           claim_poll_seconds=3600)
    for name in (client.ENV_SERVER, client.ENV_USER, client.ENV_PASSWORD,
                 "GPUWATCH_RESERVATIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(client.ENV_NETRC, str(tmp_path / "no-netrc"))
    with start(options, fleet=lambda: gpus) as serving:
        monkeypatch.setenv(client.ENV_SERVER, serving.url)
        yield serving.url


def test_two_users_and_an_admin_through_the_real_service(
        real_service: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user(monkeypatch, "alice")
    code, out = run("reserve", "node-a:0-1", "--until", "+2d", "--comment", "deadline")
    assert code == 0 and out.startswith("booked GPUs 0-1 of node-a for alice until "), out
    as_user(monkeypatch, "bob")
    assert run("reserve", "node-a:2", "--until", "+1d")[0] == 0
    assert "already booked" in one_error(capsys, "reserve", "node-a:1", "--until", "+1d")
    assert "node-a, node-b" in one_error(capsys, "reserve", "node-z:0", "--until", "+1d")
    listed = json.loads(run("reservations", "--json")[1])
    alices = next(b["id"] for b in listed if b["user"] == "alice")
    assert one_error(capsys, "release", alices).startswith(
        f"gpuwatch: error: gpuwatch serve at {real_service}: ")  # not bob's
    assert run("release", "node-a")[1].startswith("released GPU 2 of node-a for bob")
    assert [b["user"] for b in json.loads(run("reservations", "--json")[1])] == ["alice"]
    as_user(monkeypatch, "root")
    code, out = run("release", "node-a:1", "--user", "alice")
    assert (code, out.endswith("(deadline); GPU 0 stays booked\n")) == (0, True), out
    (kept,) = json.loads(run("reservations", "--json")[1])
    assert (kept["user"], kept["gpus"], kept["comment"]) == ("alice", [0], "deadline")
    history = run("reservations", "--history")[1].splitlines()
    assert [line.split()[2:4] for line in history] == [
        ["alice", "add"], ["bob", "add"], ["bob", "release"], ["root", "release"],
        ["root", "add"]]
    code, _ = run("run", "-n", "2", "--host", "node-b", "--", "sh", "-c",
                  'test "$CUDA_VISIBLE_DEVICES" = GPU-node-b-0,GPU-node-b-1')
    assert code == 0 and "claimed GPUs 0,1 of node-b for root" in capsys.readouterr().err
    assert "node-b" in one_error(capsys, "run", "-n", "3", "--host", "node-b", "--", "true")


def test_ctrl_c_while_waiting_for_gpus_exits_130_without_a_traceback(
        service: FakeService, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(run_command.time, "sleep", interrupted)
    service.refuse_claims = 100
    assert run("run", "-n", "1", "--host", "node-a", "--wait", "1h", "--", "true")[0] == 130
    assert "Traceback" not in capsys.readouterr().err and not service.claims


def test_a_redirect_is_refused_and_the_password_not_sent_on(
        service: FakeService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = service.url
    moved = FakeService(redirect_to=elsewhere)
    url, stop = httpfake.start(_handler(moved))
    try:
        err = one_error(capsys, "reservations", "--server", url)
    finally:
        stop()
    assert f"gpuwatch serve at {url}: HTTP 307" in err
    assert not service.requests


def test_a_user_of_the_environment_takes_the_password_of_their_netrc_entry(
        service: FakeService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(client.ENV_USER, "bob")
    monkeypatch.delenv(client.ENV_PASSWORD)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password bob-s3cret\n")
    monkeypatch.setenv(client.ENV_NETRC, str(netrc))
    assert run("reserve", "node-a:0", "--until", "+1d")[0] == 0
    assert service.requests[-1][2] == "bob"
