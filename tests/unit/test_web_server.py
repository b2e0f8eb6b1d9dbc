"""The HTTP server under load and hostile clients: many scrapes at once, idle and silent
connections, the connection cap, HEAD, gzip negotiation, methods, dual-stack, client SANs and a
web config that changes while the exporter runs. Everything on 127.0.0.1 (and ::1)."""

from __future__ import annotations

import base64
import errno
import gzip
import http.client
import logging
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from certs import certificate_authority, self_signed, signed_by
from paths import REPO as ROOT
from paths import TESTS
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from simnode import build

from gpuwatch.exporter import web
from gpuwatch.exporter.web import App, Server, WebConfigSource, accepts_gzip, connection_cap, serve
from gpuwatch.exporter.webconfig import load_web_config

UNITS = [ROOT / "ansible/roles/gpuwatch_exporter/templates/gpuwatch-exporter.service.j2",
         ROOT / "ansible/roles/gpuwatch_reservations/templates/gpuwatch-reservations.service.j2"]


@pytest.fixture
def start() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(web_config: web.WebConfig | WebConfigSource | None = None,
              address: str = "127.0.0.1:0", **limits: float) -> Server:
        app = App(build("workstation").registry, "/metrics", web_config or web.WebConfig())
        server = serve(app, address, **limits)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def request(port: int, method: str = "GET", path: str = "/metrics",
            headers: dict[str, str] | None = None, host: str = "127.0.0.1",
            context: ssl.SSLContext | None = None, timeout: float = 20
            ) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context) \
        if context is not None else http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def wait_closed(sock: socket.socket, within: float = 10) -> bool:
    """Whether the server closes the connection (EOF or reset) within the time."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- load ------------------------------------------------------------------------------------

def test_100_scrapes_at_once_are_all_answered(start: Callable[..., Server]) -> None:
    server = start()
    statuses: list[int] = []
    lock = threading.Lock()

    def scrape() -> None:
        status = request(server.port, headers={"Accept-Encoding": "gzip"})[0]
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=scrape) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 100
    # wsgiref listened with a queue of 5: the kernel dropped the other SYNs, and the clients
    # waited for their retransmission (seconds each, and 60 s timeouts under load)
    assert _listen_queue(server.port) >= 100


def _listen_queue(port: int) -> int:
    """The accept queue of the socket listening on the port (ss's Send-Q of a listener)."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("needs ss (iproute2) to read the listen queue")
    out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10).stdout.split()
    return int(out[2])


class _Slow:
    """A collection that takes 0.3 s, counted."""

    def __init__(self) -> None:
        self.collections = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.collections += 1
        time.sleep(0.3)
        yield GaugeMetricFamily("slow_value", "A slow reading.", value=1)


def test_scrapes_waiting_for_a_collection_share_it_without_a_thread_each() -> None:
    """The server has 4 threads: scrapes that each waited in one would need a collection
    per 4 of them."""
    slow = _Slow()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(slow)  # type: ignore[arg-type]
    server = serve(App(registry), "127.0.0.1:0")
    server.start()
    try:
        barrier = threading.Barrier(40)
        statuses: list[int] = []

        def scrape() -> None:
            barrier.wait()
            statuses.append(request(server.port)[0])

        threads = [threading.Thread(target=scrape) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        server.stop()
    assert statuses == [200] * 40
    assert slow.collections <= 4, f"{slow.collections} collections for 40 scrapes at once"


def test_idle_connections_past_the_cap_do_not_lock_a_scrape_out(
        start: Callable[..., Server]) -> None:
    server = start(max_connections=20)
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(60)]
    try:
        assert request(server.port)[0] == 200
        assert server.connections is not None and server.connections.open <= 20
    finally:
        for sock in idle:
            sock.close()


def test_an_idle_connection_is_closed_after_the_read_timeout(
        start: Callable[..., Server]) -> None:
    server = start(read_timeout=0.5)
    silent = socket.create_connection(("127.0.0.1", server.port))
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    kept.request("GET", "/-/healthy")
    assert kept.getresponse().read() == b"Healthy\n"
    try:
        assert wait_closed(silent) and wait_closed(slow)
        assert kept.sock is not None and wait_closed(kept.sock)
    finally:
        silent.close()
        slow.close()
        kept.close()


class _Big:
    """A registry whose exposition is megabytes: more than socket buffers hold."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("big_series", "Many series.", labels=["n"])
        for n in range(100_000):
            family.add_metric([f"{n:040d}"], n)
        yield family


def test_a_client_that_does_not_take_its_answer_is_closed_after_the_read_timeout() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Big())  # type: ignore[arg-type]
    server = serve(App(registry), "127.0.0.1:0", read_timeout=0.5)
    server.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # and reads nothing
        connections = server.connections
        assert connections is not None
        end = time.monotonic() + 20
        while not connections.busy and time.monotonic() < end:
            time.sleep(0.01)
        assert connections.busy == 1  # being answered
        while connections.open and time.monotonic() < end:
            time.sleep(0.1)
        assert connections.open == 0
        sock.close()
    finally:
        server.stop()


@pytest.mark.parametrize(("fd_limit", "cap"), [
    (64, 16), (256, 128), (1024, 896), (web.UNIT_NOFILE_LIMIT, web.DEFAULT_MAX_CONNECTIONS),
    (resource.RLIM_INFINITY, web.DEFAULT_MAX_CONNECTIONS)])
def test_the_default_cap_stays_below_the_fd_limit(fd_limit: int, cap: int) -> None:
    assert connection_cap(None, fd_limit) == cap
    assert connection_cap(10, fd_limit) == 10


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_the_units_fd_limit_leaves_room_above_the_connection_cap(unit: Path) -> None:
    (limit,) = re.findall(r"^LimitNOFILE=(\d+)$", unit.read_text(), re.MULTILINE)
    assert int(limit) == web.UNIT_NOFILE_LIMIT
    assert int(limit) >= web.DEFAULT_MAX_CONNECTIONS + web.FD_HEADROOM
    assert connection_cap(None, int(limit)) == web.DEFAULT_MAX_CONNECTIONS


# -- HTTP ------------------------------------------------------------------------------------

def _raw_answer(port: int, head: bytes) -> bytes:
    """Every byte the server sends for one request, until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_head_sends_the_headers_of_get_and_no_body(start: Callable[..., Server]) -> None:
    server = start()
    for path in ("/metrics", "/", "/-/healthy"):
        get_status, get_headers, get_body = request(server.port, "GET", path)
        raw = _raw_answer(server.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n"
                          "Connection: close\r\n\r\n".encode())
        head, _, body = raw.partition(b"\r\n\r\n")
        assert body == b"", path  # not a byte after the headers
        status_line, *lines = head.decode().split("\r\n")
        assert status_line == f"HTTP/1.1 {get_status} OK"
        head_headers = dict(line.split(": ", 1) for line in lines)
        for name in ("Content-Type", "Content-Length", "Vary"):
            assert head_headers.get(name) == get_headers.get(name), name
        assert int(head_headers["Content-Length"]) == len(get_body)


@pytest.mark.parametrize(("accept", "gzipped"), [
    ("gzip", True), ("GZIP", True), ("gzip, deflate, br", True), ("x-gzip", True),
    ("*", True), ("gzip;q=0.5", True), ("gzip;q=0.8, identity;q=0.5", True),
    ("gzip;q=0", False), ("gzip; q=0.0", False), ("*;q=0", False), ("", False),
    ("deflate", False), ("identity", False), ("identity, gzip;q=0.5", False),
    ("gzip;q=0, *;q=1", False), ("gzip;q=nonsense", False), ("gzip;q=2", False)])
def test_gzip_only_when_accepted(accept: str, gzipped: bool) -> None:
    assert accepts_gzip(accept) is gzipped


def test_gzip_negotiation_and_vary_on_the_wire(start: Callable[..., Server]) -> None:
    server = start()
    status, headers, body = request(server.port, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert headers["Vary"] == "Accept, Accept-Encoding"
    assert b"nvidia_gpu_up" in gzip.decompress(body)
    status, headers, body = request(server.port, headers={"Accept-Encoding": "gzip;q=0"})
    assert status == 200 and "Content-Encoding" not in headers
    assert headers["Vary"] == "Accept, Accept-Encoding" and b"nvidia_gpu_up" in body


PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.mark.parametrize(("accept", "content_type"), [
    (None, "text/plain; version=0.0.4; charset=utf-8"),
    ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
    ("*/*", "text/plain; version=0.0.4; charset=utf-8"),
    ("application/openmetrics-text", "application/openmetrics-text; version=1.0.0; "
                                     "charset=utf-8"),
    (PROMETHEUS_ACCEPT, "application/openmetrics-text; version=1.0.0; charset=utf-8; "
                        "escaping=underscores"),
])
def test_the_format_is_what_the_client_asks_for_byte_for_byte_the_librarys(
        start: Callable[..., Server], accept: str | None, content_type: str) -> None:
    """choose_encoder's pick: OpenMetrics (with # EOF) when asked for, else text 0.0.4;
    the frozen clock of the simulated node makes two collections the same bytes."""
    server = start()
    status, headers, body = request(server.port, headers={"Accept": accept} if accept else {})
    assert status == 200 and headers["Content-Type"] == content_type
    encoder, _ = choose_encoder(accept or "")
    assert body == encoder(server.app.registry)
    assert body.endswith(b"# EOF\n") is content_type.startswith("application/openmetrics-text")


class _Mixed:
    """Families the fast writers know between ones they leave to prometheus_client."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("plain", "A gauge.", value=1)
        histogram = HistogramMetricFamily("latency_seconds", "A histogram.", labels=["gpu"])
        histogram.add_metric(["0"], [("0.1", 2), ("+Inf", 3)], 0.4)
        yield histogram
        info = InfoMetricFamily("driver", "An info.")
        info.add_metric([], {"version": "550.54"})
        yield info
        stamped = GaugeMetricFamily("stamped", "A timestamped gauge.")
        stamped.add_metric([], 2, timestamp=1_800_000_000)
        yield stamped


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text"])
def test_families_the_fast_writers_do_not_know_are_served_as_the_library_writes_them(
        accept: str | None) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Mixed())  # type: ignore[arg-type]
    server = serve(App(registry), "127.0.0.1:0")
    server.start()
    try:
        status, _, body = request(server.port, headers={"Accept": accept} if accept else {})
    finally:
        server.stop()
    assert status == 200
    assert body == choose_encoder(accept or "")[0](registry)
    assert b"latency_seconds_bucket" in body and b"driver" in body


@pytest.mark.parametrize("method", ["TRACE", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_get_405_with_allow(start: Callable[..., Server], method: str) -> None:
    server = start()
    for path in ("/metrics", "/"):
        status, headers, body = request(server.port, method, path)
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert b"nvidia_gpu" not in body


@pytest.mark.parametrize("head", [
    b"garbage\r\n\r\n", b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n"
    + b"".join(b"X%d: a\r\n" % i for i in range(100)) + b"\r\n"],
    ids=["not-http", "bad-path", "long-header", "many-headers"])
def test_a_malformed_request_gets_400_and_logs_no_traceback(
        start: Callable[..., Server], caplog: pytest.LogCaptureFixture, head: bytes) -> None:
    server = start()
    with caplog.at_level(logging.INFO):
        answer = _raw_answer(server.port, head)
    status = answer.split(b"\r\n")[0]
    # aiohttp counts the headers (web.MAX_HEADERS) since 3.14; earlier ones take them all
    assert b" 400 " in status or (b"X99" in head and _aiohttp_before(3, 14)), status
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def _aiohttp_before(*version: int) -> bool:
    return tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) < version


def test_an_empty_host_listens_on_ipv4_and_ipv6() -> None:
    """":0" binds every address: run in a network namespace of its own (nothing but its
    loopback), so the test exposes nothing."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("needs unshare and ip for a private network namespace")
    script = textwrap.dedent("""
        import http.client, socket, sys
        sys.path.insert(0, sys.argv[1])
        from simnode import build
        from gpuwatch.exporter.web import App, serve
        server = serve(App(build("workstation").registry), ":0")
        server.start()
        for host in ("127.0.0.1", "::1"):
            try:
                c = http.client.HTTPConnection(host, server.port, timeout=10)
                c.request("GET", "/-/healthy")
                print(host, c.getresponse().status)
            except OSError as e:
                print(host, "failed", e)
        server.stop()
    """)
    result = subprocess.run(
        [unshare, "-rn", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"', sys.executable,
         "-c", script, str(TESTS)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "unshare" in result.stderr:
        pytest.skip(f"no private network namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1 200" in result.stdout, result.stdout + result.stderr
    if "::1 failed" in result.stdout and "Address family" in result.stdout:
        pytest.skip("no IPv6 loopback in the namespace")
    assert "::1 200" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("error", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
def test_an_empty_host_without_ipv6_listens_on_ipv4(monkeypatch: pytest.MonkeyPatch,
                                                   error: int) -> None:
    calls: list[tuple[int, object]] = []

    def bind(family: int, address: object, backlog: int, v6only: bool = True) -> object:
        calls.append((family, address))
        if family == socket.AF_INET6:
            raise OSError(error, os.strerror(error))
        return "the IPv4 socket"

    monkeypatch.setattr(web, "_bind", bind)
    assert web._listening_socket("", 9839, 16) == "the IPv4 socket"
    assert calls == [(socket.AF_INET6, ("::", 9839)), (socket.AF_INET, ("0.0.0.0", 9839))]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_address_in_brackets(start: Callable[..., Server]) -> None:
    server = start(address="[::1]:0")
    assert request(server.port, path="/-/healthy", host="::1")[0] == 200


# -- TLS -------------------------------------------------------------------------------------

def _tls_config(folder: Path, extra: str = "") -> Path:
    config = folder / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                      f"{extra}")
    return config


def test_silent_tls_clients_do_not_hold_up_a_scrape_and_are_closed(
        start: Callable[..., Server], tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    server = start(load_web_config(_tls_config(tmp_path)), read_timeout=1.0)
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(30)]
    hello = socket.create_connection(("127.0.0.1", server.port))
    hello.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, and no more
    try:
        client = ssl.create_default_context(cafile=str(cert))
        status, _, body = request(server.port, context=client)
        assert status == 200 and b"nvidia_gpu_up" in body
        assert all(wait_closed(sock) for sock in [*silent, hello])
    finally:
        for sock in [*silent, hello]:
            sock.close()


@pytest.mark.parametrize(("allowed", "status"), [
    (["scraper.example"], 200), (["SCRAPER.example"], 200), (["127.0.0.2"], 200),
    (["spiffe://lab/prometheus"], 200), (["ops@lab.example"], 200),
    (["other.example", "scraper.example"], 200),
    (["other.example"], 403), (["127.0.0.1"], 403)])
def test_client_allowed_sans(start: Callable[..., Server], tmp_path: Path,
                             allowed: list[str], status: int) -> None:
    cert, _ = self_signed(tmp_path)
    authority = certificate_authority(tmp_path)
    client_cert, client_key = signed_by(
        tmp_path, authority, sans=["DNS:scraper.example", "IP:127.0.0.2",
                                   "URI:spiffe://lab/prometheus", "email:ops@lab.example"])
    sans = "".join(f"\n    - {name!r}" for name in allowed)
    config = _tls_config(tmp_path, f"  client_auth_type: RequireAndVerifyClientCert\n"
                                   f"  client_ca_file: ca.crt\n  client_allowed_sans:{sans}\n")
    server = start(load_web_config(config))
    client = ssl.create_default_context(cafile=str(cert))
    client.load_cert_chain(client_cert, client_key)
    got, _, body = request(server.port, context=client)
    assert got == status
    assert (b"nvidia_gpu_up" in body) == (status == 200)


# -- the web config changes while the exporter runs ----------------------------------------------

def _replace(path: Path, text: str) -> None:
    """As an editor or a config management tool writes: a new file moved over the old."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def _users(password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"basic_auth_users:\n  prometheus: '{hashed}'\n"


def test_a_new_password_takes_effect_and_a_broken_file_keeps_the_old(
        start: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "web.yml"
    config.write_text(_users("first"))
    server = start(WebConfigSource(load_web_config(config), config, check_every=0.0))
    assert request(server.port, headers=basic("prometheus", "first"))[0] == 200
    _replace(config, _users("second"))
    assert request(server.port, headers=basic("prometheus", "second"))[0] == 200
    assert request(server.port, headers=basic("prometheus", "first"))[0] == 401
    with caplog.at_level(logging.WARNING, logger="gpuwatch.exporter.web"):
        _replace(config, "basic_auth_users: [\n")
        for _ in range(3):
            assert request(server.port, headers=basic("prometheus", "second"))[0] == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(config) in warnings[0] and "not valid YAML" in warnings[0]
    assert "\n" not in warnings[0]
    _replace(config, _users("third"))
    assert request(server.port, headers=basic("prometheus", "third"))[0] == 200


def test_a_renewed_certificate_serves_new_connections(
        start: Callable[..., Server], tmp_path: Path) -> None:
    old, _ = self_signed(tmp_path)
    trusts_old = ssl.create_default_context(cafile=str(old))  # read now, kept
    config = _tls_config(tmp_path)
    server = start(WebConfigSource(load_web_config(config), config, check_every=0.0))
    assert request(server.port, context=trusts_old)[0] == 200
    new, _ = self_signed(tmp_path)  # renewed in place: web.yml itself does not change
    trusts_new = ssl.create_default_context(cafile=str(new))
    assert request(server.port, context=trusts_new)[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        request(server.port, context=trusts_old)


def test_turning_tls_off_by_a_reload_is_refused(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    self_signed(tmp_path)
    config = _tls_config(tmp_path)
    source = WebConfigSource(load_web_config(config), config, check_every=0.0)
    tls = source.current().tls
    _replace(config, _users("pw"))
    with caplog.at_level(logging.WARNING, logger="gpuwatch.exporter.web"):
        assert source.current().tls is tls
        assert source.current().tls is tls
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "restart the exporter" in warning and str(config) in warning


def test_the_file_is_looked_at_once_a_second_at_most(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text(_users("first"))
    now = [0.0]
    source = WebConfigSource(load_web_config(config), config, clock=lambda: now[0])
    before = source.current()
    _replace(config, _users("second"))
    now[0] = 0.5
    assert source.current() is before and not source.due()
    now[0] = 1.0
    assert source.due() and source.current() is not before
