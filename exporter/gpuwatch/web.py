"""HTTP serving: /metrics, a landing page, /-/healthy; TLS and basic auth from the web config."""

from __future__ import annotations

import gzip
import html
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry

from . import __version__, exposition
from .auth import BasicAuth
from .config import WebConfig

log = logging.getLogger(__name__)

GZIP_LEVEL = 6
"""Prometheus asks for gzip; level 6 gets within a few percent of 9 at half the CPU."""

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def parse_listen_address(address: str) -> tuple[str, int]:
    """":9839" -> ("", 9839), "127.0.0.1:9839", "[::1]:9839"; ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (for example :9839 or 127.0.0.1:9839)")
    return host.strip("[]"), int(port)


@dataclass
class App:
    registry: CollectorRegistry
    telemetry_path: str = "/metrics"
    web: WebConfig = field(default_factory=WebConfig)

    def __post_init__(self) -> None:
        self._auth = BasicAuth(dict(self.web.basic_auth_users)) \
            if self.web.basic_auth_users else None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        headers = list(self.web.headers.items())
        if self._auth is not None and not self._auth.allows(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized",
                           [*headers, ("WWW-Authenticate", 'Basic realm="gpuwatch"'),
                            ("Content-Type", "text/plain; charset=utf-8")])
            return [b"Unauthorized\n"]
        if path == self.telemetry_path:
            body = exposition.text(self.registry)
            response_headers = [*headers, ("Content-Type", exposition.CONTENT_TYPE)]
            if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
                response_headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", response_headers)
            return [body]
        if path == "/-/healthy":
            start_response("200 OK", [*headers, ("Content-Type", "text/plain; charset=utf-8")])
            return [b"Healthy\n"]
        if path == "/":
            start_response("200 OK", [*headers, ("Content-Type", "text/html; charset=utf-8")])
            return [_landing(self.telemetry_path).encode()]
        start_response("404 Not Found", [*headers, ("Content-Type", "text/plain")])
        return [b"Not Found\n"]


def _landing(telemetry_path: str) -> str:
    path = html.escape(telemetry_path)
    return f"""<!DOCTYPE html>
<html><head><title>gpuwatch exporter</title></head>
<body><h1>gpuwatch exporter</h1>
<p>Which GPU is free right now, and who holds the others. Version {html.escape(__version__)}.</p>
<ul><li><a href="{path}">Metrics</a></li><li><a href="/-/healthy">Health</a></li></ul>
</body></html>
"""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that drops the connection or fails the TLS handshake is the client's
        # problem: one debug line, not a traceback on stderr
        log.debug("request from %s failed: %s", client_address[0], sys.exc_info()[1])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class Server:
    """A running HTTP(S) server; `address` is where it listens (port 0 picks a free one)."""

    httpd: _Server
    thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(app: App, listen_address: str) -> Server:
    """Bind the listen address; TLS when the web config has it. Not yet serving."""
    host, port = parse_listen_address(listen_address)
    server_class = _Server6 if ":" in host else _Server
    httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    if app.web.tls is not None:
        # the handshake happens in the request's thread, so a slow client blocks nobody
        httpd.socket = app.web.tls.wrap_socket(httpd.socket, server_side=True,
                                               do_handshake_on_connect=False)
    return Server(httpd)
