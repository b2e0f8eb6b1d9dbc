"""gpuwatch serve over HTTP: identity, owner-only release, the fleet checks, bad input, browser
safety, history and /metrics (servers on 127.0.0.1, a fake fleet, a settable clock)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from gpuwatch.exporter import encoding
from gpuwatch.exporter.main import build_exporter, build_registry, options_from_args, sources_for
from gpuwatch.exporter.main import build_parser as exporter_parser
from gpuwatch.fleet import GpuStatus
from gpuwatch.fleet.prometheus import PrometheusError
from gpuwatch.serve.app import Serving, start
from gpuwatch.serve.options import ServeOptions, parse_networks

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
PROXY_HEADER = "X-Forwarded-User"


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def gpu(host: str, index: int, state: str = "free", users: tuple[str, ...] = (),
        model: str = "NVIDIA A100-SXM4-80GB") -> GpuStatus:
    return GpuStatus(host=host, instance=f"{host}:9839", gpu=index, uuid=f"GPU-{host}-{index}",
                     state=state, users=users, model=model, display_name="A100",
                     memory_used_bytes=0.0, memory_total_bytes=80e9, utilization_ratio=0.0,
                     inactive_since=None)


class Fleet:
    """What Prometheus shows; tests change it."""

    def __init__(self, gpus: list[GpuStatus]) -> None:
        self.gpus = gpus
        self.down = False

    def __call__(self) -> list[GpuStatus]:
        if self.down:
            raise PrometheusError("cannot reach Prometheus at http://127.0.0.1:1: refused")
        return list(self.gpus)

    def set_users(self, host: str, index: int, *users: str) -> None:
        self.gpus = [replace(g, users=tuple(users), state="busy" if users else "free")
                     if (g.host, g.gpu) == (host, index) else g for g in self.gpus]


def four_gpu_fleet() -> Fleet:
    return Fleet([gpu("node-a", i) for i in range(4)] + [gpu("node-b", i) for i in range(2)])


class Client:
    """HTTP to the service from a chosen source address, as a person (proxy header) or not."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def call(self, method: str, path: str, body: Any = None, *, user: str | None = None,
             headers: Mapping[str, str] | None = None, raw: bytes | None = None,
             source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.serving.server.port, timeout=10,
                                          source_address=(source, 0))
        sent = dict(headers or {})
        if user is not None:
            sent[PROXY_HEADER] = user
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kw: Any
             ) -> tuple[int, Any]:
        status, headers, data = self.call(method, path, body, **kw)
        if status == 204:
            assert data == b""
            return status, None
        assert headers["content-type"] == "application/json", (status, data)
        return status, json.loads(data)


def serving(tmp_path: Path, fleet: Fleet, clock: Clock, **options: Any) -> Serving:
    defaults: dict[str, Any] = dict(
        reservations_file=tmp_path / "reservations.yml", listen_address="127.0.0.1:0",
        auth_header=PROXY_HEADER, trusted_proxies=parse_networks("127.0.0.1"),
        admins=frozenset({"root"}), own_process_metrics=False, claim_poll_seconds=3600)
    defaults.update(options)
    return start(ServeOptions(**defaults), fleet=fleet, clock=clock)


@pytest.fixture
def fleet() -> Fleet:
    return four_gpu_fleet()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(tmp_path: Path, fleet: Fleet, clock: Clock) -> Iterator[Client]:
    with serving(tmp_path, fleet, clock) as s:
        yield Client(s)


def book(client: Client, asker: str, gpus: Any = (0,), host: str = "node-a",
         until: str = "+2h", **extra: Any) -> tuple[int, Any]:
    body = {"host": host, "gpus": list(gpus) if isinstance(gpus, tuple) else gpus,
            "until": until, **extra}
    return client.json("POST", "/api/v1/reservations", body, user=asker)


def one_line_error(answer: Any) -> str:
    assert set(answer) == {"error"}
    message: str = answer["error"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


# -- bookings: owners and admins ------------------------------------------------------------

def test_a_booking_is_made_listed_and_answered_as_the_contract_says(client: Client) -> None:
    status, made = book(client, "alice", (0, 1), comment="NeurIPS  deadline")
    assert status == 201
    assert set(made) == {"id", "host", "gpus", "user", "start", "until", "comment"}
    assert made["host"] == "node-a" and made["gpus"] == [0, 1] and made["user"] == "alice"
    assert made["start"] == "2027-01-15T08:00:00+00:00"
    assert made["until"] == "2027-01-15T10:00:00+00:00"
    assert made["comment"] == "NeurIPS deadline"
    status, listed = client.json("GET", "/api/v1/reservations")
    assert status == 200 and listed == {"reservations": [made]}


def test_an_ended_booking_is_listed_until_it_is_released(client: Client, clock: Clock) -> None:
    _, made = book(client, "alice", (0,), until="+1h")
    clock.now += 3600
    assert client.json("GET", "/api/v1/reservations")[1] == {"reservations": [made]}
    assert book(client, "bob", (0,))[0] == 201  # it counts for nothing
    assert client.json("DELETE", f"/api/v1/reservations/{made['id']}", user="alice")[0] == 204


def test_only_the_owner_or_an_admin_releases_a_booking(client: Client) -> None:
    _, alices = book(client, "alice", (0,))
    _, others = book(client, "alice", (1,))
    path = f"/api/v1/reservations/{alices['id']}"
    status, answer = client.json("DELETE", path, user="bob")
    assert status == 403 and "alice" in one_line_error(answer)
    status, answer = client.json("DELETE", path)
    assert status == 401
    assert client.json("DELETE", path, user="alice") == (204, None)
    assert client.json("DELETE", path, user="alice")[0] == 404
    assert client.json("DELETE", f"/api/v1/reservations/{others['id']}", user="root") == \
        (204, None)
    assert client.json("GET", "/api/v1/reservations")[1] == {"reservations": []}


def test_user_and_force_are_for_admins_only(client: Client) -> None:
    status, answer = book(client, "bob", (0,), user="alice")
    assert status == 403 and "admin" in one_line_error(answer)
    status, made = book(client, "root", (0,), user="alice")
    assert status == 201 and made["user"] == "alice"
    status, answer = book(client, "bob", (0,), host="node-new", force=True)
    assert status == 403
    status, answer = book(client, "root", (0,), host="node-new")
    assert status == 400 and "force" in one_line_error(answer)
    status, made = book(client, "root", (0, 1), host="node-new", force=True)
    assert status == 201 and made["host"] == "node-new"


def test_an_overlapping_booking_is_a_409(client: Client) -> None:
    assert book(client, "alice", (0, 1))[0] == 201
    status, answer = book(client, "bob", "1-2")
    assert status == 409 and "alice" in one_line_error(answer)
    assert book(client, "bob", "2-3")[0] == 201


def test_unknown_hosts_and_gpus_are_refused_naming_the_known_ones(client: Client) -> None:
    status, answer = book(client, "alice", (0,), host="node-z")
    message = one_line_error(answer)
    assert status == 400 and "node-a" in message and "node-b" in message
    status, answer = book(client, "alice", (9,))
    assert status == 400 and "0-3" in one_line_error(answer) and "9" in answer["error"]
    status, answer = book(client, "alice", "0-100000")
    assert status == 400
    status, answer = client.json("POST", "/api/v1/claims", {"host": "node-z", "count": 1},
                                 user="alice")
    assert status == 400 and "node-a" in one_line_error(answer)


def test_a_host_named_by_its_instance_or_in_another_case_is_the_host(client: Client) -> None:
    status, made = book(client, "alice", (0,), host="NODE-A")
    assert status == 201 and made["host"] == "node-a"
    status, claim = client.json("POST", "/api/v1/claims", {"host": "node-b:9839", "count": 1},
                                user="alice")
    assert status == 201 and claim["host"] == "node-b"


def test_without_prometheus_a_write_is_refused_and_an_admin_may_force(
        client: Client, fleet: Fleet) -> None:
    fleet.down = True
    status, answer = book(client, "alice", (0,))
    assert status == 503 and "Prometheus" in one_line_error(answer)
    assert client.json("GET", "/api/v1/fleet")[0] == 503
    assert book(client, "root", (0,), force=True)[0] == 201


# -- identity -------------------------------------------------------------------------------

def test_without_an_identity_source_the_service_is_read_only(
        tmp_path: Path, fleet: Fleet, clock: Clock) -> None:
    with serving(tmp_path, fleet, clock, auth_header=None, trusted_proxies=()) as s:
        c = Client(s)
        assert c.json("GET", "/api/v1/reservations") == (200, {"reservations": []})
        assert c.json("GET", "/api/v1/fleet")[0] == 200
        status, answer = book(c, "alice", (0,))  # the header counts for nothing here
        assert status == 401 and one_line_error(answer)
        status, answer = c.json("POST", "/api/v1/claims", {"host": "node-a", "count": 1},
                                user="alice")
        assert status == 401


def test_a_write_without_identity_is_a_401_whatever_its_body(client: Client) -> None:
    for raw in (b"garbage", b'{"host": "node-a", "gpus": [0], "until": "+1h"}'):
        status, answer = client.json("POST", "/api/v1/reservations", raw=raw)
        assert status == 401 and one_line_error(answer)
    assert client.json("DELETE", "/api/v1/claims/c123")[0] == 401


def test_the_proxy_header_counts_from_a_trusted_proxy_only(client: Client) -> None:
    status, _answer = client.json("POST", "/api/v1/reservations",
                                 {"host": "node-a", "gpus": [0], "until": "+1h"},
                                 user="alice", source="127.0.0.2")
    assert status == 401
    status, made = client.json("POST", "/api/v1/reservations",
                               {"host": "node-a", "gpus": [0], "until": "+1h"},
                               user="alice", source="127.0.0.1")
    assert status == 201 and made["user"] == "alice"
    # an untrusted address that names the admin is nobody
    status, _ = client.json("DELETE", f"/api/v1/reservations/{made['id']}", user="root",
                            source="127.0.0.2")
    assert status == 401


def test_a_header_that_is_not_a_user_name_is_refused(client: Client) -> None:
    status, answer = book(client, "alice bob", (0,))
    assert status == 401 and one_line_error(answer)


def _web_config(tmp_path: Path, users: Mapping[str, str]) -> Path:
    lines = ["basic_auth_users:"]
    for name, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"  {name}: {hashed}")
    path = tmp_path / "web.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _basic(user: str, password: str) -> dict[str, str]:
    import base64
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_users_are_people_and_every_path_but_health_asks(
        tmp_path: Path, fleet: Fleet, clock: Clock) -> None:
    users_map = tmp_path / "users.yml"
    users_map.write_text("alice@lab.example: alice\n")
    config = _web_config(tmp_path, {"alice@lab.example": "a-pw", "bob": "b-pw",
                                     "root": "r-pw", "prometheus": "p-pw"})
    with serving(tmp_path, fleet, clock, web_config_file=config, auth_header=None,
                 trusted_proxies=(), users_map=users_map) as s:
        c = Client(s)
        for path in ("/", "/metrics", "/api/v1/reservations", "/api/v1/fleet", "/nothing"):
            status, headers, _ = c.call("GET", path)
            assert status == 401, path
            assert headers["www-authenticate"] == 'Basic realm="gpuwatch"'
        assert c.call("GET", "/-/healthy")[:1] == (200,)
        assert c.call("GET", "/metrics", headers=_basic("prometheus", "p-pw"))[0] == 200
        assert c.call("GET", "/metrics", headers=_basic("prometheus", "wrong"))[0] == 401
        body = {"host": "node-a", "gpus": [0], "until": "+1h"}
        status, made = c.json("POST", "/api/v1/reservations", body,
                              headers=_basic("alice@lab.example", "a-pw"))
        assert status == 201 and made["user"] == "alice"  # the Unix name, through the map
        path = f"/api/v1/reservations/{made['id']}"
        assert c.json("DELETE", path, headers=_basic("bob", "b-pw"))[0] == 403
        assert c.json("DELETE", path, headers=_basic("root", "r-pw")) == (204, None)


def test_over_tls_with_basic_auth_the_own_origin_is_https(
        tmp_path: Path, fleet: Fleet, clock: Clock) -> None:
    import ssl

    from certs import self_signed
    cert, key = self_signed(tmp_path)
    config = _web_config(tmp_path, {"alice": "a-pw"})
    config.write_text(config.read_text() + f"tls_server_config:\n  cert_file: {cert}\n"
                      f"  key_file: {key}\n")
    with serving(tmp_path, fleet, clock, web_config_file=config, auth_header=None,
                 trusted_proxies=()) as s:
        assert s.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        body = json.dumps({"host": "node-a", "gpus": [0], "until": "+1h"})

        def post(origin: str) -> int:
            conn = http.client.HTTPSConnection("127.0.0.1", s.server.port, timeout=10,
                                               context=context)
            try:
                conn.request("POST", "/api/v1/reservations", body=body, headers={
                    **_basic("alice", "a-pw"), "Content-Type": "application/json",
                    "Origin": origin})
                return conn.getresponse().status
            finally:
                conn.close()

        assert post(f"http://127.0.0.1:{s.server.port}") == 403
        assert post(f"https://127.0.0.1:{s.server.port}") == 201


# -- bad input --------------------------------------------------------------------------------

BAD_BOOKINGS: list[tuple[str, bytes]] = [
    ("not JSON", b"{host: node-a"),
    ("a list", b"[1, 2]"),
    ("a string", b'"node-a"'),
    ("not UTF-8", b'{"host": "\xff\xfe"}'),
    ("deeply nested", b"[" * 30_000 + b"]" * 30_000),
    ("a number past every limit", b'{"host": "node-a", "gpus": [' + b"9" * 5000 + b'], '
     b'"until": "+1h"}'),
    ("digits past every limit", b'{"host": "node-a", "gpus": "0-' + b"9" * 5000 + b'", '
     b'"until": "+1h"}'),
    ("host missing", b'{"gpus": [0], "until": "+1h"}'),
    ("host a number", b'{"host": 5, "gpus": [0], "until": "+1h"}'),
    ("host with a space", b'{"host": "node a", "gpus": [0], "until": "+1h"}'),
    ("gpus missing", b'{"host": "node-a", "until": "+1h"}'),
    ("gpus true", b'{"host": "node-a", "gpus": true, "until": "+1h"}'),
    ("gpus of booleans", b'{"host": "node-a", "gpus": [true], "until": "+1h"}'),
    ("gpus empty", b'{"host": "node-a", "gpus": [], "until": "+1h"}'),
    ("gpus negative", b'{"host": "node-a", "gpus": [-1], "until": "+1h"}'),
    ("gpus words", b'{"host": "node-a", "gpus": "some", "until": "+1h"}'),
    ("gpus an object", b'{"host": "node-a", "gpus": {"a": 1}, "until": "+1h"}'),
    ("gpus backwards", b'{"host": "node-a", "gpus": "3-1", "until": "+1h"}'),
    ("until missing", b'{"host": "node-a", "gpus": [0]}'),
    ("until a number", b'{"host": "node-a", "gpus": [0], "until": 5}'),
    ("until not a time", b'{"host": "node-a", "gpus": [0], "until": "soonish"}'),
    ("until past", b'{"host": "node-a", "gpus": [0], "until": "2020-01-01T00:00:00Z"}'),
    ("start after until", b'{"host": "node-a", "gpus": [0], "until": "+1h", "start": "+2h"}'),
    ("comment a list", b'{"host": "node-a", "gpus": [0], "until": "+1h", "comment": [1]}'),
    ("comment too long", b'{"host": "node-a", "gpus": [0], "until": "+1h", "comment": "'
     + b"x" * 600 + b'"}'),
    ("force a string", b'{"host": "node-a", "gpus": [0], "until": "+1h", "force": "yes"}'),
    ("an unknown field", b'{"host": "node-a", "gpus": [0], "until": "+1h", "owner": "x"}'),
]


@pytest.mark.parametrize("raw", [raw for _, raw in BAD_BOOKINGS],
                         ids=[name for name, _ in BAD_BOOKINGS])
def test_a_bad_booking_is_a_400_with_one_line(client: Client, raw: bytes) -> None:
    status, answer = client.json("POST", "/api/v1/reservations", raw=raw, user="alice")
    assert status == 400, answer
    one_line_error(answer)
    assert client.json("GET", "/api/v1/reservations")[1] == {"reservations": []}


BAD_CLAIMS: list[tuple[str, Any]] = [
    ("count missing", {"host": "node-a"}),
    ("count a string", {"host": "node-a", "count": "2"}),
    ("count 0", {"host": "node-a", "count": 0}),
    ("count fractional", {"host": "node-a", "count": 1.5}),
    ("count huge", {"host": "node-a", "count": 10**6}),
    ("count true", {"host": "node-a", "count": True}),
    ("host missing", {"count": 1}),
    ("host a list", {"host": ["node-a"], "count": 1}),
    ("minutes 0", {"host": "node-a", "count": 1, "minutes": 0}),
    ("minutes past the most", {"host": "node-a", "count": 1, "minutes": 61}),
    ("minutes a string", {"host": "node-a", "count": 1, "minutes": "5"}),
    ("model a number", {"host": "node-a", "count": 1, "model": 100}),
    ("an unknown field", {"host": "node-a", "count": 1, "gpus": [0]}),
]


@pytest.mark.parametrize("body", [body for _, body in BAD_CLAIMS],
                         ids=[name for name, _ in BAD_CLAIMS])
def test_a_bad_claim_is_a_400_with_one_line(client: Client, body: Any) -> None:
    status, answer = client.json("POST", "/api/v1/claims", body, user="alice")
    assert status == 400, answer
    one_line_error(answer)
    assert client.json("GET", "/api/v1/claims")[1] == {"claims": []}


ODD_VALUES: list[Any] = [
    None, True, False, -1, 0, 1, 3, 1.5, 1e308, -1e308, "", " ", "x" * 300, "\x00", "\u202e",
    [], {}, [None], [0, 0], [1023], [1024], "all", "ALL", "0-1023", "+" + "9" * 5000 + "h",
    "+9999999w", "+0s", "now", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
    "2027-02-30", "node-a", "alice", "root",
]


@pytest.mark.parametrize("path, fields, valid", [
    ("/api/v1/reservations", ("host", "gpus", "until", "start", "comment", "user", "force"),
     {"host": "node-a", "gpus": [0], "until": "+1h"}),
    ("/api/v1/claims", ("count", "host", "model", "minutes"), {"host": "node-a", "count": 1}),
])
def test_no_odd_value_of_any_field_makes_a_500(tmp_path: Path, fleet: Fleet, clock: Clock,
                                               path: str, fields: tuple[str, ...],
                                               valid: dict[str, Any]) -> None:
    with serving(tmp_path, fleet, clock) as s:
        c = Client(s)
        for field in fields:
            for value in ODD_VALUES:
                status, answer = c.json("POST", path, {**valid, field: value}, user="root")
                assert status in (201, 400, 409), (field, value, answer)
                if status == 201:  # undone, so that every answer is about this value alone
                    assert c.json("DELETE", f"{path}/{answer['id']}", user="root")[0] == 204
                else:
                    one_line_error(answer)


def test_a_huge_body_is_refused_without_reading_it_all(client: Client) -> None:
    raw = b'{"host": "' + b"a" * 2_000_000 + b'"}'
    status, answer = client.json("POST", "/api/v1/reservations", raw=raw, user="alice")
    assert status == 413 and one_line_error(answer)


def test_a_huge_chunked_body_is_refused(client: Client) -> None:
    port = client.serving.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/claims HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\n" + PROXY_HEADER.encode() + b": alice\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 65536
        try:
            for _ in range(4):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # refused before it all went
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")


def test_unknown_paths_and_methods_answer_json(client: Client) -> None:
    status, answer = client.json("GET", "/api/v1/nothing")
    assert status == 404 and one_line_error(answer)
    status, headers, _ = client.call("PUT", "/api/v1/reservations", {}, user="alice")
    assert status == 405 and "POST" in headers["allow"]
    status, headers, _ = client.call("POST", "/-/healthy", {})
    assert status == 405
    assert client.call("GET", "/-/healthy")[::2] == (200, b"OK\n")
    assert client.call("GET", "/")[0] == 200


# -- browser safety ---------------------------------------------------------------------------

def test_a_post_must_be_json_and_from_the_own_origin(client: Client) -> None:
    body = json.dumps({"host": "node-a", "gpus": [0], "until": "+1h"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x"):
        status, answer = client.json("POST", "/api/v1/reservations", raw=body, user="alice",
                                     headers={"Content-Type": content_type})
        assert status == 403 and "Content-Type" in one_line_error(answer)
    status, answer = client.json("POST", "/api/v1/reservations", raw=body, user="alice",
                                 headers={"Origin": "https://evil.example"})
    assert status == 403 and "origin" in one_line_error(answer)
    own = f"http://127.0.0.1:{client.serving.server.port}"
    status, made = client.json("POST", "/api/v1/reservations", raw=body, user="alice",
                               headers={"Origin": own,
                                        "Content-Type": "application/json; charset=utf-8"})
    assert status == 201
    status, _ = client.json("DELETE", f"/api/v1/reservations/{made['id']}", user="alice",
                            headers={"Origin": "null"})
    assert status == 403
    assert client.json("DELETE", f"/api/v1/reservations/{made['id']}", user="alice",
                       headers={"Origin": own}) == (204, None)


# -- claims and bookings together -------------------------------------------------------------

def test_a_claim_gets_free_gpus_with_their_uuids(client: Client, clock: Clock) -> None:
    status, claim = client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 2},
                                user="alice")
    assert status == 201
    assert set(claim) == {"id", "host", "gpus", "uuids", "user", "until"}
    assert claim["gpus"] == [0, 1] and claim["uuids"] == ["GPU-node-a-0", "GPU-node-a-1"]
    assert claim["user"] == "alice" and claim["until"] == "2027-01-15T08:05:00+00:00"
    assert client.json("GET", "/api/v1/claims") == (200, {"claims": [claim]})
    status, answer = client.json("POST", "/api/v1/claims",
                                 {"host": "node-a", "count": 3, "minutes": 60}, user="bob")
    assert status == 409 and "2" in one_line_error(answer)
    path = f"/api/v1/claims/{claim['id']}"
    assert client.json("DELETE", path, user="bob")[0] == 403
    assert client.json("DELETE", path, user="alice") == (204, None)
    assert client.json("DELETE", path, user="alice")[0] == 404


def test_a_claimed_gpu_is_not_bookable_and_a_booked_one_not_claimable(client: Client) -> None:
    assert book(client, "bob", (0,))[0] == 201
    status, claim = client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 1},
                                user="alice")
    assert status == 201 and claim["gpus"] == [1]
    status, answer = book(client, "bob", (1,))
    assert status == 409 and "claimed by alice" in one_line_error(answer)
    # bob's own booking is his to claim, and comes first
    status, bobs = client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 2},
                               user="bob")
    assert status == 201 and bobs["gpus"] == [0, 2]


def test_a_gpu_in_use_is_not_claimable(client: Client, fleet: Fleet) -> None:
    fleet.set_users("node-b", 0, "carol")
    status, claim = client.json("POST", "/api/v1/claims", {"host": "node-b", "count": 1},
                                user="alice")
    assert status == 201 and claim["gpus"] == [1]
    assert client.json("POST", "/api/v1/claims", {"host": "node-b", "count": 1},
                       user="bob")[0] == 409


def test_a_gpu_without_its_uuid_is_not_claimable(client: Client, fleet: Fleet) -> None:
    fleet.gpus = [replace(g, uuid="") if (g.host, g.gpu) == ("node-b", 0) else g
                  for g in fleet.gpus]
    status, answer = client.json("POST", "/api/v1/claims", {"host": "node-b", "count": 2},
                                 user="alice")
    assert status == 409 and "1 GPU free" in one_line_error(answer)


def test_a_claim_by_model(client: Client, fleet: Fleet) -> None:
    fleet.gpus.append(gpu("node-c", 0, model="NVIDIA H100 80GB HBM3"))
    fleet.gpus.append(gpu("node-c", 1))
    status, claim = client.json("POST", "/api/v1/claims",
                                {"host": "node-c", "count": 1, "model": "h100"}, user="alice")
    assert status == 201 and claim["gpus"] == [0]
    status, _answer = client.json("POST", "/api/v1/claims",
                                 {"host": "node-c", "count": 1, "model": "h100"}, user="bob")
    assert status == 409


def test_twenty_claims_at_once_on_sixteen_gpus_never_share_one(
        tmp_path: Path, clock: Clock) -> None:
    big = Fleet([gpu("big", i) for i in range(16)])
    with serving(tmp_path, big, clock) as s:
        c = Client(s)
        results: list[tuple[int, Any]] = []
        lock = threading.Lock()
        go = threading.Barrier(20)

        def claim(n: int) -> None:
            go.wait()
            answer = c.json("POST", "/api/v1/claims", {"host": "big", "count": 1},
                            user=f"user{n}")
            with lock:
                results.append(answer)

        threads = [threading.Thread(target=claim, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        granted = [a for status, a in results if status == 201]
        refused = [a for status, a in results if status == 409]
        assert len(granted) == 16 and len(refused) == 4
        assert sorted(g for a in granted for g in a["gpus"]) == list(range(16))
        assert len({a["uuids"][0] for a in granted}) == 16
        for answer in refused:
            assert "0 GPUs free" in one_line_error(answer)


def test_a_claim_ends_when_its_time_is_up(client: Client, clock: Clock) -> None:
    status, _claim = client.json("POST", "/api/v1/claims",
                                {"host": "node-a", "count": 4, "minutes": 2}, user="alice")
    assert status == 201
    clock.now += 119
    assert len(client.json("GET", "/api/v1/claims")[1]["claims"]) == 1
    assert client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 1},
                       user="bob")[0] == 409
    clock.now += 1
    assert client.json("GET", "/api/v1/claims")[1] == {"claims": []}
    assert b"nvidia_gpu_claim_end_timestamp_seconds{" not in client.call("GET", "/metrics")[2]
    assert client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 1},
                       user="bob")[0] == 201


def test_a_claim_ends_once_its_owner_runs_on_every_claimed_gpu(
        client: Client, fleet: Fleet) -> None:
    service = client.serving.service
    _, claim = client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 2},
                           user="alice")
    fleet.set_users("node-a", 0, "alice")
    fleet.set_users("node-a", 1, "bob")  # someone else's process does not count
    assert service.end_claims_in_use() == []
    fleet.set_users("node-a", 1, "alice", "bob")
    assert [c.id for c in service.end_claims_in_use()] == [claim["id"]]
    assert client.json("GET", "/api/v1/claims")[1] == {"claims": []}


def test_the_watcher_ends_claims_in_use_by_itself(tmp_path: Path, fleet: Fleet,
                                                  clock: Clock) -> None:
    import time
    with serving(tmp_path, fleet, clock, claim_poll_seconds=0.05) as s:
        c = Client(s)
        _, claim = c.json("POST", "/api/v1/claims", {"host": "node-b", "count": 1},
                          user="alice")
        fleet.set_users("node-b", claim["gpus"][0], "alice")
        for _ in range(200):
            if not s.service.claims.active(clock()):
                break
            time.sleep(0.05)
        assert c.json("GET", "/api/v1/claims")[1] == {"claims": []}


# -- history, fleet, metrics ------------------------------------------------------------------

def test_the_history_says_who_did_what_from_where(client: Client) -> None:
    _, made = book(client, "alice", (0,))
    client.json("POST", "/api/v1/reservations",
                {"host": "node-a", "gpus": [1], "until": "+1h"}, user="bob",
                headers={"X-Forwarded-For": "10.1.2.3"})
    assert client.json("DELETE", f"/api/v1/reservations/{made['id']}", user="root")[0] == 204
    assert client.json("GET", "/api/v1/history")[0] == 401
    _, everything = client.json("GET", "/api/v1/history", user="root")
    entries = everything["entries"]
    assert [(e["action"], e["who"], e["from"]) for e in entries] == [
        ("add", "alice", "127.0.0.1"), ("add", "bob", "10.1.2.3 via 127.0.0.1"),
        ("release", "root", "127.0.0.1")]
    assert entries[0]["reservations"][0]["id"] == made["id"]
    _, bobs = client.json("GET", "/api/v1/history", user="bob")
    assert [e["who"] for e in bobs["entries"]] == ["bob"]


def test_the_fleet_is_as_gpuwatch_status_json_prints_it(client: Client, fleet: Fleet) -> None:
    status, answer = client.json("GET", "/api/v1/fleet")
    assert status == 200
    assert answer["gpus"] == json.loads(json.dumps([g.to_api() for g in fleet.gpus]))
    assert answer["names_hidden"] is False and answer["now"] == START


def _family(text: bytes, name: str) -> list[bytes]:
    return [line for line in text.splitlines() if name.encode() in line]


def test_metrics_serve_the_bookings_as_the_exporter_does_and_the_claims(
        tmp_path: Path, client: Client, clock: Clock) -> None:
    book(client, "alice", (0, 1), comment="deadline")
    book(client, "bob", "all", host="node-b")
    _, claim = client.json("POST", "/api/v1/claims", {"host": "node-a", "count": 1},
                           user="carol")
    status, headers, page = client.call("GET", "/metrics")
    assert status == 200 and headers["content-type"] == encoding.CONTENT_TYPE
    options = options_from_args(exporter_parser().parse_args(
        ["--collector.disable-defaults", "--reservations.file",
         str(tmp_path / "reservations.yml")]))
    exporter = build_exporter(options, replace(sources_for(options), clock=clock))
    try:
        theirs = encoding.text(build_registry(exporter, replace(options,
                                                                own_process_metrics=False)))
    finally:
        exporter.close()
    name = "nvidia_gpu_reservation_end_timestamp_seconds"
    assert _family(page, name) == _family(theirs, name) and len(_family(page, name)) == 5
    assert _family(page, "nvidia_gpu_claim_end_timestamp_seconds{") == [
        b'nvidia_gpu_claim_end_timestamp_seconds{gpu="2",id="%s",reserved_host="node-a",'
        b'user="carol"} 1.8000003e+09' % claim["id"].encode()]
    assert b'nvidia_gpu_scrape_collector_success{collector="reservation"} 1.0' in page
    assert b'nvidia_gpu_scrape_collector_success{collector="claim"} 1.0' in page
    status, headers, zipped = client.call("GET", "/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0", "Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert headers["content-type"].startswith("application/openmetrics-text")
    import gzip
    assert gzip.decompress(zipped).endswith(b"# EOF\n")
