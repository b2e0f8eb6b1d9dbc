"""The reverse proxy snippets of docs/grafana.md, run: Debian's nginx and Caddy in front of a
stand-in Grafana on 127.0.0.1.

The snippets are taken from the guide as they are; only what a test must change is changed:
the listening address (127.0.0.1 and a free port instead of the public name on 443), the
certificate (a self-signed one), the upstream port (the stand-in's), and for Caddy the site
address is http:// (Caddy would otherwise ask a certificate authority for one). Through each
proxy: a page arrives with the path, host and forwarding headers Grafana needs, and a
WebSocket upgrade to Grafana Live is passed on.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpfake
import pytest
from certs import self_signed
from paths import REPO

from tools.localstack import LOCALHOST, end_process, free_port

GUIDE = REPO / "docs" / "grafana.md"
GRAFANA_PORT_IN_GUIDE = "127.0.0.1:3000"


def snippets(language: str) -> list[str]:
    """The guide's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", GUIDE.read_text(), re.DOTALL | re.MULTILINE)


# -- a stand-in Grafana ------------------------------------------------------------------------

@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class Backend:
    port: int = 0
    requests: list[Seen] = field(default_factory=list)


class _Grafana(httpfake.QuietHandler):
    """Answers every page with 200, and a WebSocket handshake with 101, recording both."""

    protocol_version = "HTTP/1.1"
    backend: Backend

    def do_GET(self) -> None:
        self.backend.requests.append(Seen(self.path, {k.lower(): v for k, v in
                                                      self.headers.items()}))
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", "stand-in")
            self.end_headers()
            self.close_connection = True
            return
        self.reply(200, b'{"database": "ok"}', [("Content-Type", "application/json")])


@pytest.fixture
def grafana() -> Iterator[Backend]:
    backend = Backend()
    url, stop = httpfake.start(type("Handler", (_Grafana,), {"backend": backend}))
    backend.port = int(url.rsplit(":", 1)[1])
    try:
        yield backend
    finally:
        stop()


# -- talking through the proxy -----------------------------------------------------------------

def _connect(port: int, tls: bool) -> socket.socket:
    sock = socket.create_connection((LOCALHOST, port), timeout=10)
    if not tls:
        return sock
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the proxy's self-signed stand-in certificate
    return context.wrap_socket(sock)


def get(port: int, host: str, path: str, tls: bool) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    connection.sock = _connect(port, tls)
    connection.request("GET", path, headers={"Host": host})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def websocket_status(port: int, host: str, path: str, tls: bool) -> str:
    """The status line the proxy answers a WebSocket handshake with."""
    with _connect(port, tls) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(1024)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


def wait_listening(port: int, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text() if log.exists() else "exited"
        with socket.socket() as s:
            if s.connect_ex((LOCALHOST, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()}")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """The proxies a test starts: each is ended (SIGTERM, then SIGKILL) when the test ends."""
    processes: list[subprocess.Popen[str]] = []
    try:
        yield processes
    finally:
        for process in processes:
            end_process(process)


def checked_through(port: int, grafana: Backend, host: str, prefix: str, tls: bool) -> None:
    """A dashboard page and a Grafana Live handshake through the proxy on `port`."""
    page = f"{prefix}/d/gpuwatch-fleet?var-host=ws-01"
    assert get(port, host, page, tls).status == 200
    seen = grafana.requests[-1]
    assert seen.path == page, "the path arrives as Grafana's root_url expects it"
    assert seen.headers["host"] == host
    assert seen.headers["x-forwarded-proto"] == ("https" if tls else "http")
    assert LOCALHOST in seen.headers["x-forwarded-for"]
    status = websocket_status(port, host, f"{prefix}/api/live/ws", tls)
    assert status.startswith("HTTP/1.1 101"), status
    seen = grafana.requests[-1]
    assert seen.path == f"{prefix}/api/live/ws"
    assert seen.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in seen.headers["connection"].lower()


# -- nginx -------------------------------------------------------------------------------------

def _nginx_version() -> tuple[int, ...]:
    done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=True)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr)
    assert m is not None, done.stderr
    return tuple(int(part) for part in m.groups())


def nginx_config(tmp_path: Path, port: int, grafana: Backend, sub_path: bool) -> Path:
    site, locations = snippets("nginx")
    if sub_path:  # "Inside the server block above, instead of its two locations"
        start = site.index("    location / {")
        end = site.rindex("}")
        site = site[:start] + locations + site[end:]
    cert, key = self_signed(tmp_path, "proxy")
    site = (site.replace("listen 443 ssl;", f"listen {LOCALHOST}:{port} ssl;")
            .replace(f"server {GRAFANA_PORT_IN_GUIDE};", f"server {LOCALHOST}:{grafana.port};"))
    site = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    if _nginx_version() < (1, 25, 1):  # what the guide says to write for those
        site = site.replace("    http2 on;\n", "").replace(" ssl;", " ssl http2;")
    assert f"{LOCALHOST}:{port} ssl" in site and str(grafana.port) in site, site
    config = tmp_path / "nginx.conf"
    config.write_text(f"""daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx.log warn;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/client;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
{site}
}}
""")
    return config


@pytest.mark.parametrize("sub_path", [False, True], ids=["host-name", "sub-path"])
def test_nginx_snippet_proxies_grafana(tmp_path: Path, grafana: Backend,
                                       started: list[subprocess.Popen[str]],
                                       sub_path: bool) -> None:
    if shutil.which("nginx") is None:
        pytest.fail("nginx not found: scripts/ensure-proxies installs it (make test runs it)")
    port = free_port()
    config = nginx_config(tmp_path, port, grafana, sub_path)
    check = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(config)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    log = tmp_path / "nginx.log"
    started.append(subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(config)],
                                    text=True, stdin=subprocess.DEVNULL))
    wait_listening(port, started[-1], log)
    host = "example.org" if sub_path else "grafana.example.org"
    checked_through(port, grafana, host, "/grafana" if sub_path else "", tls=True)


# -- Caddy -------------------------------------------------------------------------------------

def caddyfile(port: int, grafana: Backend, sub_path: bool) -> str:
    site = snippets("caddy")[1 if sub_path else 0]
    name = "example.org" if sub_path else "grafana.example.org"
    assert site.startswith(f"{name} {{"), site
    site = site.replace(f"{name} {{", f"http://{name}:{port} {{", 1)
    site = site.replace(f"reverse_proxy {GRAFANA_PORT_IN_GUIDE}",
                        f"reverse_proxy {LOCALHOST}:{grafana.port}")
    # No admin endpoint, and the site on 127.0.0.1 only.
    return f"{{\n    admin off\n    default_bind {LOCALHOST}\n}}\n\n{site}"


@pytest.mark.parametrize("sub_path", [False, True], ids=["host-name", "sub-path"])
def test_caddy_snippet_proxies_grafana(tmp_path: Path, grafana: Backend,
                                       started: list[subprocess.Popen[str]],
                                       sub_path: bool) -> None:
    if shutil.which("caddy") is None:
        pytest.fail("caddy not found: scripts/ensure-proxies installs it (make test runs it)")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    for snippet in snippets("caddy"):  # as the guide has them, certificates and all
        (tmp_path / "Guide.caddyfile").write_text(snippet)
        adapted = subprocess.run(["caddy", "adapt", "--adapter", "caddyfile", "--config",
                                  str(tmp_path / "Guide.caddyfile")],
                                 capture_output=True, text=True, env=env, timeout=30)
        assert adapted.returncode == 0, adapted.stderr
    port = free_port()
    config = tmp_path / "Caddyfile"
    config.write_text(caddyfile(port, grafana, sub_path))
    log = tmp_path / "caddy.log"
    with log.open("w") as out:
        started.append(subprocess.Popen(["caddy", "run", "--adapter", "caddyfile", "--config",
                                         str(config)], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, text=True))
    wait_listening(port, started[-1], log)
    host = "example.org" if sub_path else "grafana.example.org"
    checked_through(port, grafana, host, "/grafana" if sub_path else "", tls=False)
    if sub_path:
        response = get(port, host, "/grafana", tls=False)
        assert response.status in (301, 302, 307, 308)
        assert response.getheader("Location") == "/grafana/"
