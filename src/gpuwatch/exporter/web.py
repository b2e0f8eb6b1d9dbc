"""HTTP serving: /metrics, a landing page, /-/healthy; TLS and basic auth from the web config.

The server is aiohttp's low-level one (`web.Server`, its request handlers) on a socket made
and accepted here (each accepted socket goes to `loop.connect_accepted_socket`, with TLS when
the web config has it), with the limits a node's exporter needs against ordinary load and
hostile clients alike:

- at most `max_connections` open connections, counted at accept() (TLS handshakes in
  progress count). When a new
  one would pass the cap, the connection that has been idle longest (no request being
  answered: a kept-alive scraper between scrapes, a client that never finished its request
  or its handshake) is closed to make room; only when every connection is being answered is
  the new one closed at once. Idle connections cannot lock Prometheus out.
- the default cap stays below the fd limit (RLIMIT_NOFILE less FD_HEADROOM for NVML, /proc and
  the rest), and the systemd units set LimitNOFILE=UNIT_NOFILE_LIMIT above it; at the fd limit
  (EMFILE) accepting pauses for a second instead of spinning;
- one `read_timeout` bounds the TLS handshake, the wait for a request's head (slow or no
  headers), the idle time of a kept-alive connection and the sending of an answer;
- the blocking work (the collection and the bcrypt check) runs in a small thread pool, never
  on the event loop; a listen backlog of BACKLOG.

The web config is re-read when its file (or a certificate or key it names) changes, as
exporter-toolkit does: new connections get the new certificate, requests the new users and
headers; a broken new file keeps the old config and logs why once.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gzip
import html
import ipaddress
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from gpuwatch import __version__
from gpuwatch.exporter import encoding
from gpuwatch.exporter.auth import BasicAuth
from gpuwatch.exporter.webconfig import WebConfig, load_web_config

log = logging.getLogger(__name__)

GZIP_LEVEL = 6
"""Prometheus asks for gzip; level 6 gets within a few percent of 9 at half the CPU."""

DEFAULT_MAX_CONNECTIONS = 4096
"""Open connections at most (--web.max-connections), when the fd limit allows it."""
FD_HEADROOM = 128
"""File descriptors kept for everything but connections: listening sockets, the event loop,
NVML's /dev/nvidia* handles, /proc reads of the process collector, the web config."""
UNIT_NOFILE_LIMIT = 8192
"""LimitNOFILE= of the shipped systemd units: above DEFAULT_MAX_CONNECTIONS + FD_HEADROOM."""
DEFAULT_READ_TIMEOUT = 30.0
"""Seconds (--web.read-timeout) for a TLS handshake, a request's head, an idle kept-alive
connection, and sending an answer. Prometheus scrapes every 15 s by default and keeps its
connection; with a longer interval it connects anew, which costs a handshake."""
BACKLOG = 1024
"""Connections the kernel queues before the server accepts them (capped by somaxconn)."""
RESPONSE_THREADS = 4
"""Threads that collect and check passwords; scrapes at once share one collection."""
MAX_HEADERS = 32
"""Header lines per request (Prometheus sends about 6): bounds what a slow client can park."""
CONFIG_CHECK_SECONDS = 1.0
"""How often the web config file is looked at (os.stat) for changes, at most."""
ACCEPT_BATCH = 16
"""Connections accepted at one wake-up of the event loop: the most the open fds can pass the
cap by, for the moment until the connections closed to make room are gone."""
ACCEPT_RETRY_SECONDS = 1.0
"""Out of fds (EMFILE), accepting pauses this long (asyncio's own loop does the same)."""
ALLOWED_METHODS = ("GET", "HEAD")
_LOG_EVERY_SECONDS = 60.0



def _client_error(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request (a bad request line, too many headers) with a
    traceback at error level: the client's problem, so one debug line of ours instead."""
    exc = record.exc_info[1] if record.exc_info else None
    reason = " ".join(str(exc).split()) if exc is not None else ""
    log.debug("%s: %s", record.getMessage(), reason)
    return False


_client_log = logging.getLogger(f"{__name__}.client")
_client_log.addFilter(_client_error)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


def parse_listen_address(address: str) -> tuple[str, int]:
    """":9839" -> ("", 9839), "127.0.0.1:9839", "[::1]:9839"; ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (for example :9839 or 127.0.0.1:9839)")
    return host.strip("[]"), int(port)


def connection_cap(requested: int | None = None, fd_limit: int | None = None) -> int:
    """The connection cap: `requested` (--web.max-connections) when given, else the default,
    lowered to stay below the fd limit (the soft RLIMIT_NOFILE unless given)."""
    if requested is not None:
        return requested
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_limit == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, max(fd_limit - FD_HEADROOM, fd_limit // 4)))


# -- what to answer ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """What the answer depends on: method, path, headers (lower-case names), the client's
    address and its verified TLS certificate (ssl's getpeercert() form), if any."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    client: str = ""
    peercert: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header lets the answer be gzipped: gzip (or `*`) with a
    q-value above 0, and not below an explicit identity's ("gzip;q=0" refuses it)."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if not coding:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
                if not 0.0 <= weight <= 1.0:  # also nan
                    weight = 0.0
        weights.setdefault(coding.lower(), weight)
    gzip_weight = weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0)))
    return gzip_weight > 0 and gzip_weight >= weights.get("identity", 0.0)


def peer_allowed(peercert: Mapping[str, Any] | None, allowed: Iterable[str]) -> bool:
    """Whether a verified client certificate names one of `allowed` (client_allowed_sans) in
    its subjectAltName: a DNS name (any case), an IP address (any spelling), an e-mail
    address or a URI. No certificate, or one not verified (getpeercert() gives {}), names
    nothing."""
    names: set[str] = set()
    addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "DNS":
            names.add(str(value).lower())
        elif kind == "IP Address":
            address = _address(str(value))
            if address is not None:
                addresses.add(address)
        elif kind in ("email", "URI"):
            names.add(str(value))
    for want in allowed:
        address = _address(want)
        if (address in addresses) if address is not None else \
                (want in names or want.lower() in names):
            return True
    return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _text(status: int, body: str, headers: list[tuple[str, str]],
          content_type: str = "text/plain; charset=utf-8") -> Reply:
    return Reply(status, [*headers, ("Content-Type", content_type)], body.encode())


class WebConfigSource:
    """The web config in force: a fixed one, or --web.config.file re-read when it changes.

    `current()` looks at the file (and the certificate, key and CA files it names) at most
    once a CONFIG_CHECK_SECONDS, by os.stat (mtime, size, inode), and loads it again when any
    changed. A file that does not load keeps the config in force and logs one warning per
    change; so does turning TLS on or off, which needs a restart (the socket is TLS or not).
    Thread-safe.
    """

    def __init__(self, config: WebConfig, path: Path | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 check_every: float = CONFIG_CHECK_SECONDS) -> None:
        self._config, self._path = config, path
        self._clock, self._check_every = clock, check_every
        self._files = _referenced_files(path) if path is not None else ()
        self._signature = _signature(path, self._files) if path is not None else ()
        self._refused: tuple[Any, ...] | None = None
        self._checked = clock()
        self._lock = threading.Lock()

    @classmethod
    def watch(cls, path: Path | None) -> WebConfigSource:
        """The config of `path` (none: the default), watched; ConfigError when it does not
        load."""
        return cls(load_web_config(path), path)

    @property
    def latest(self) -> WebConfig:
        """The config in force, without looking at the file."""
        return self._config

    def due(self) -> bool:
        """Whether current() would look at the file now."""
        return self._path is not None and self._clock() - self._checked >= self._check_every

    def current(self) -> WebConfig:
        if not self.due():
            return self._config
        with self._lock:
            if not self.due():
                return self._config
            self._checked = self._clock()
            assert self._path is not None
            files = _referenced_files(self._path)
            signature = _signature(self._path, files)
            if signature in (self._signature, self._refused):
                return self._config
            try:
                config = load_web_config(self._path)
                if (config.tls is None) != (self._config.tls is None):
                    raise ValueError(f"{self._path}: tls_server_config was "
                                     f"{'removed' if config.tls is None else 'added'}; "
                                     "restart the exporter to turn TLS on or off")
            except Exception as e:  # any reason at all: the old config keeps serving
                self._refused = signature
                reason = str(e) if str(self._path) in str(e) else f"{self._path}: {e}"
                log.warning("%s; the web config loaded before stays in force", reason)
                return self._config
            self._config, self._files, self._signature = config, files, signature
            self._refused = None
            log.info("%s: web config reloaded", self._path)
            return config


def _signature(path: Path, files: Iterable[Path]) -> tuple[Any, ...]:
    def stat(p: Path) -> tuple[Any, ...]:
        try:
            s = os.stat(p)
        except OSError:
            return (str(p), None)
        return (str(p), s.st_mtime_ns, s.st_size, s.st_ino, s.st_dev)
    return (stat(path), *(stat(f) for f in files))


def _referenced_files(path: Path) -> tuple[Path, ...]:
    """The certificate, key and CA files a web config names, resolved beside it as
    load_web_config does: a renewed certificate is a change of the config."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return ()
    tls = data.get("tls_server_config") if isinstance(data, dict) else None
    if not isinstance(tls, dict):
        return ()
    return tuple((path.parent / str(tls[key])).resolve()
                 for key in ("cert_file", "key_file", "client_ca_file") if tls.get(key))


@dataclass
class App:
    """The exporter's answers; `web` is a fixed WebConfig or a WebConfigSource."""

    registry: CollectorRegistry
    telemetry_path: str = "/metrics"
    web: WebConfig | WebConfigSource = field(default_factory=WebConfig)

    def __post_init__(self) -> None:
        self.source = self.web if isinstance(self.web, WebConfigSource) \
            else WebConfigSource(self.web)
        self._auth = BasicAuth({})
        self._auth_users: Mapping[str, bytes] | None = None
        self._auth_lock = threading.Lock()

    def _authenticator(self, config: WebConfig) -> BasicAuth | None:
        if not config.basic_auth_users:
            return None
        with self._auth_lock:
            if self._auth_users is not config.basic_auth_users:
                # one BasicAuth for the process: its rate limits survive a reload
                self._auth.set_users(config.basic_auth_users)
                self._auth_users = config.basic_auth_users
        return self._auth

    def respond(self, request: Request) -> Reply:
        """The answer to one request, body included for HEAD (the server drops it). Blocks
        (collection, bcrypt): the server calls its parts in its thread pool."""
        config = self.source.current()
        return self.refusal(request, config) or self.answer(request, config)

    def refusal(self, request: Request, config: WebConfig) -> Reply | None:
        """403 (client certificate), 405 (method) or 401 (password), or None to answer.
        Blocks for a bcrypt check when the config has users."""
        headers = list(config.headers.items())
        if config.client_allowed_sans and \
                not peer_allowed(request.peercert, config.client_allowed_sans):
            # exporter-toolkit refuses such a client in the handshake; ssl cannot do that
            # after verifying the chain, so the refusal is a 403
            return _text(403, "Forbidden: the client certificate names none of "
                         "client_allowed_sans\n", headers)
        if request.method not in ALLOWED_METHODS:
            return _text(405, "Method Not Allowed\n",
                         [*headers, ("Allow", ", ".join(ALLOWED_METHODS))])
        auth = self._authenticator(config)
        if auth is not None and not auth.allows(request.headers.get("authorization"),
                                                client=request.client):
            return _text(401, "Unauthorized\n",
                         [*headers, ("WWW-Authenticate", 'Basic realm="gpuwatch"')])
        return None

    def answer(self, request: Request, config: WebConfig, text: bytes | None = None) -> Reply:
        """The answer to a request let in. On the telemetry path `text` is the exposition in
        the format the Accept header asks for (encoding.negotiate; collected now when None:
        blocks); gzipping it costs CPU too."""
        headers = list(config.headers.items())
        if request.path == self.telemetry_path:
            write, content_type = encoding.negotiate(request.headers.get("accept", ""))
            body = write(self.registry) if text is None else text
            headers += [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
            if accepts_gzip(request.headers.get("accept-encoding", "")):
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
                headers.append(("Content-Encoding", "gzip"))
            return Reply(200, headers, body)
        if request.path == "/-/healthy":
            return _text(200, "Healthy\n", headers)
        if request.path == "/":
            return _text(200, _landing(self.telemetry_path), headers,
                         "text/html; charset=utf-8")
        return _text(404, "Not Found\n", headers, "text/plain")

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """The same answers as a WSGI application (the fleet simulator serves them so)."""
        method = environ.get("REQUEST_METHOD", "GET")
        headers = {name[5:].replace("_", "-").lower(): str(value)
                   for name, value in environ.items() if name.startswith("HTTP_")}
        reply = self.respond(Request(method, environ.get("PATH_INFO", "/"), headers,
                                     environ.get("REMOTE_ADDR", "")))
        start_response(f"{reply.status} {HTTPStatus(reply.status).phrase}", reply.headers)
        return [] if method == "HEAD" else [reply.body]


def _landing(telemetry_path: str) -> str:
    path = html.escape(telemetry_path)
    return f"""<!DOCTYPE html>
<html><head><title>gpuwatch exporter</title></head>
<body><h1>gpuwatch exporter</h1>
<p>Which GPU is free right now, and who holds the others. Version {html.escape(__version__)}.</p>
<ul><li><a href="{path}">Metrics</a></li><li><a href="/-/healthy">Health</a></li></ul>
</body></html>
"""


class Application(Protocol):
    """What a Server serves besides the exporter's App (gpuwatch serve's API): the web config
    in force, and an answer per request, made on the event loop, its blocking parts in `pool`.
    `request` is aiohttp's, for the body. The Server answers 500 only when `reply` raises."""

    @property
    def source(self) -> WebConfigSource: ...

    async def reply(self, request: web.BaseRequest, question: Request,
                    pool: Executor) -> Reply: ...


# -- how to serve it ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_connections: int
    read_timeout: float = DEFAULT_READ_TIMEOUT
    threads: int = RESPONSE_THREADS
    backlog: int = BACKLOG


class _Slot:
    """One accepted connection, from accept() to close: what counts against the cap."""

    __slots__ = ("asked", "handler", "sock", "task")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.task: asyncio.Task[None] | None = None
        self.handler: web.RequestHandler | None = None
        self.asked = False
        """Whether a request has come: aiohttp's keep-alive timer bounds the rest."""

    def abort(self) -> None:
        transport = self.handler.transport if self.handler is not None else None
        if transport is not None:
            transport.abort()
        elif self.task is not None and not self.task.done():
            self.task.cancel()  # in the TLS handshake, or before it: _connection closes
        else:
            self.sock.close()


class _Connections(web.Server):
    """aiohttp's low-level server (the maker of request handlers, the connection manager),
    with the cap: the open connections, least recently used first, and those being
    answered."""

    def __init__(self, handler: Callable[[web.BaseRequest], Any], cap: int,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.cap = cap
        self._open: OrderedDict[_Slot, None] = OrderedDict()
        self._busy: set[_Slot] = set()
        self._slots: dict[web.RequestHandler, _Slot] = {}

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> int:
        return len(self._busy)

    def make_room(self) -> bool:
        """Whether a new connection may come in: below the cap, or after closing the one
        idle longest; False when every connection is being answered."""
        if len(self._open) < self.cap:
            return True
        idle = next((slot for slot in self._open if slot not in self._busy), None)
        if idle is None:
            return False
        self.release(idle)
        idle.abort()
        return True

    def add(self, slot: _Slot) -> None:
        self._open[slot] = None

    def release(self, slot: _Slot) -> None:
        self._open.pop(slot, None)
        self._busy.discard(slot)
        if slot.handler is not None:
            self._slots.pop(slot.handler, None)

    def handler_for(self, slot: _Slot) -> web.RequestHandler:
        """aiohttp's protocol for the connection of the slot."""
        handler = self()
        slot.handler = handler
        self._slots[handler] = slot
        return handler

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None
                        ) -> None:
        slot = self._slots.get(handler)
        if slot is not None:
            self.release(slot)
        super().connection_lost(handler, exc)

    @contextmanager
    def answering(self, handler: web.RequestHandler) -> Iterator[None]:
        """While a request is answered its connection is not idle, and it is used last."""
        slot = self._slots.get(handler)
        if slot is None:
            yield
            return
        if slot in self._open:
            self._open.move_to_end(slot)
        slot.asked = True
        self._busy.add(slot)
        try:
            yield
        finally:
            self._busy.discard(slot)

    def close_if_never_asked(self, slot: _Slot) -> None:
        """The read timeout for a connection's first request (aiohttp before 3.14.5 starts
        its keep-alive timer only after an answer: a silent client stayed for ever)."""
        if slot in self._open and not slot.asked:
            self.release(slot)
            slot.abort()

    def abort_all(self) -> None:
        slots = list(self._open)
        self._open.clear()
        for slot in slots:
            slot.abort()


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening socket. "" is every address: one IPv6 socket that takes IPv4 too
    (IPV6_V6ONLY off), as Go's listeners do, or IPv4 alone on a host without IPv6."""
    if host == "":
        if socket.has_ipv6:
            try:
                return _bind(socket.AF_INET6, ("::", port), backlog, v6only=False)
            except OSError as e:
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL,
                                   errno.EPROTONOSUPPORT):
                    raise
        return _bind(socket.AF_INET, ("0.0.0.0", port), backlog)
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return _bind(family, address, backlog)


def _bind(family: int, address: Any, backlog: int, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Server:
    """A bound HTTP(S) server: `serve_forever()` in this thread (it returns on SIGTERM or
    SIGINT in the main thread, or on `stop()`), or `start()` in a thread of its own."""

    def __init__(self, app: App | Application, sock: socket.socket, limits: Limits) -> None:
        self.app, self.limits = app, limits
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self.connections: _Connections | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopped = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._config_pool: ThreadPoolExecutor | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._collecting: dict[str, asyncio.Future[bytes]] = {}
        """Content type -> the exposition in flight in that format."""
        self._logged: dict[str, float] = {}

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._sock.close()
            self._ready.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="gpuwatch-http",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with suppress(RuntimeError):  # the loop has finished already
                loop.call_soon_threadsafe(event.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self._sock.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        with self._lock:
            if self._stopped:
                return
            self._loop, self._stop_event = loop, stop
        loop.set_exception_handler(self._loop_error)
        self._pool = ThreadPoolExecutor(self.limits.threads, thread_name_prefix="gpuwatch-http")
        self._config_pool = ThreadPoolExecutor(1, thread_name_prefix="gpuwatch-web-config")
        connections = self.connections = _Connections(
            self._handle, self.limits.max_connections, loop=loop,
            keepalive_timeout=self.limits.read_timeout, access_log=None, logger=_client_log,
            max_headers=MAX_HEADERS, lingering_time=1.0)
        restore: list[tuple[signal.Signals, Any]] = []
        try:
            loop.add_reader(self._sock.fileno(), self._accept)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    restore.append((sig, signal.getsignal(sig)))
                    loop.add_signal_handler(sig, stop.set)
            self._ready.set()
            await stop.wait()
        finally:
            self._stopping = True
            for sig, previous in restore:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous)
            loop.remove_reader(self._sock.fileno())
            if self._resume is not None:
                self._resume.cancel()
            self._sock.close()
            # answers in flight get a moment to finish, then every connection goes
            end = loop.time() + 1.0
            while connections.busy and loop.time() < end:
                await asyncio.sleep(0.05)
            connections.abort_all()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.sleep(0)  # the aborted transports close
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._config_pool.shutdown(wait=False, cancel_futures=True)

    def _accept(self) -> None:
        """The listening socket is readable: take a batch of connections, each counted
        against the cap at once (asyncio's own accept loop counts them later, a burst of
        a backlog's worth of fds past the cap)."""
        assert self.connections is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(e)
                    return
                log.debug("accept: %s", e)  # a client that left before it was accepted
                continue
            if not self.connections.make_room():
                sock.close()  # every connection is being answered: this one is refused
                continue
            sock.setblocking(False)
            slot = _Slot(sock)
            self.connections.add(slot)
            slot.task = self._spawn(self._connection(slot))

    def _pause_accepting(self, error: OSError) -> None:
        """Out of fds: connections wait in the kernel's queue while accepting pauses (a
        retry at once would spin at full CPU)."""
        assert self._loop is not None
        self._warn("fd limit", f"out of file descriptors ({error.strerror}): new connections "
                   f"wait in the backlog; raise LimitNOFILE (soft limit now "
                   f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}) or lower "
                   f"--web.max-connections (now {self.limits.max_connections})")
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._stopping and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _connection(self, slot: _Slot) -> None:
        """The accepted socket becomes aiohttp's connection, through a TLS handshake bounded
        by the read timeout, with the TLS context in force now."""
        assert self.connections is not None
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        try:
            if self.app.source.latest.tls is not None:
                if self.app.source.due():  # a renewed certificate serves this handshake
                    await loop.run_in_executor(self._config_pool, self.app.source.current)
                options = {"ssl": self.app.source.latest.tls,
                           "ssl_handshake_timeout": self.limits.read_timeout}
                if sys.version_info >= (3, 11):
                    options["ssl_shutdown_timeout"] = self.limits.read_timeout
            await loop.connect_accepted_socket(
                functools.partial(self.connections.handler_for, slot), slot.sock, **options)
            loop.call_later(self.limits.read_timeout, self.connections.close_if_never_asked,
                            slot)
        except BaseException as e:
            # a failed or slow handshake, a client gone, or closed to make room
            self.connections.release(slot)
            transport = slot.handler.transport if slot.handler is not None else None
            if transport is not None:
                transport.abort()
            else:
                slot.sock.close()
            if not isinstance(e, (Exception, asyncio.CancelledError)):
                raise
            log.debug("connection not made: %s", e)

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.connections is not None and self._pool is not None
        transport = request.transport
        with self.connections.answering(request.protocol):
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            headers = {name.lower(): ", ".join(request.headers.getall(name))
                       for name in request.headers}
            question = Request(request.method, request.path, headers, request.remote or "",
                               peercert)
            try:
                reply = await self._reply(question, request)
            except Exception:
                log.exception("answering %s %s failed", request.method, request.path)
                reply = _text(500, "Internal Server Error\n", [])
            response = web.Response(status=reply.status, headers=reply.headers,
                                    body=reply.body)
            try:
                await asyncio.wait_for(self._send(request, response), self.limits.read_timeout)
            except asyncio.TimeoutError:
                log.debug("%s did not take its answer in time", request.remote)
                if transport is not None:
                    transport.abort()
            return response

    async def _reply(self, question: Request, request: web.BaseRequest) -> Reply:
        """The app's answer, its blocking parts in the pool; waiting is done here, on the
        loop, so 100 scrapes at once hold no thread while they wait for a collection."""
        loop = asyncio.get_running_loop()
        source = self.app.source
        if source.due():
            await loop.run_in_executor(self._config_pool, source.current)
        if not isinstance(self.app, App):
            assert self._pool is not None
            return await self.app.reply(request, question, self._pool)
        config = source.latest
        if config.basic_auth_users:  # bcrypt
            refusal = await loop.run_in_executor(self._pool, self.app.refusal, question, config)
        else:
            refusal = self.app.refusal(question, config)
        if refusal is not None:
            return refusal
        if question.path != self.app.telemetry_path:
            return self.app.answer(question, config)  # a fixed page: nothing to wait for
        write, content_type = encoding.negotiate(question.headers.get("accept", ""))
        text = await self._exposition(write, content_type)
        return await loop.run_in_executor(self._pool, self.app.answer, question, config, text)

    async def _exposition(self, write: encoding.Writer, content_type: str) -> bytes:
        """The exposition in this format of the collection in flight, or of one started now:
        scrapes that arrive while a collection runs share it (as the Exporter shares its
        collection, but without a thread each to wait in)."""
        assert isinstance(self.app, App)
        shared = self._collecting.get(content_type)
        if shared is None:
            loop = asyncio.get_running_loop()
            assert self._pool is not None
            shared = self._collecting[content_type] = loop.run_in_executor(
                self._pool, write, self.app.registry)
            shared.add_done_callback(functools.partial(self._collected, content_type))
        return await asyncio.shield(shared)

    def _collected(self, content_type: str, done: asyncio.Future[bytes]) -> None:
        del self._collecting[content_type]
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have gone

    @staticmethod
    async def _send(request: web.BaseRequest, response: web.Response) -> None:
        await response.prepare(request)
        await response.write_eof()

    def _warn(self, key: str, text: str) -> None:
        """One line, at most once a minute for each kind."""
        now = time.monotonic()
        if now - self._logged.get(key, -_LOG_EVERY_SECONDS) >= _LOG_EVERY_SECONDS:
            self._logged[key] = now
            log.warning("%s", text)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's complaints (a transport's fatal error, say) as one line, not a
        traceback."""
        exc = context.get("exception")
        message = str(context.get("message"))
        if self._stopping:
            log.debug("while stopping: %s: %s", message, exc)
            return
        self._warn(message, f"{message}: {exc}" if exc is not None else message)


def serve(app: App | Application, listen_address: str, max_connections: int | None = None,
          read_timeout: float = DEFAULT_READ_TIMEOUT) -> Server:
    """Bind the listen address (OSError when it cannot be); TLS when the web config has it.
    Not yet serving: call serve_forever() or start()."""
    host, port = parse_listen_address(listen_address)
    cap = connection_cap(max_connections)
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if max_connections is not None and fd_limit != resource.RLIM_INFINITY and \
            cap > fd_limit - FD_HEADROOM:
        log.warning("--web.max-connections %d is close to or above the fd limit (%d): "
                    "connections past it wait for a file descriptor; raise LimitNOFILE",
                    cap, fd_limit)
    sock = _listening_socket(host, port, BACKLOG)
    return Server(app, sock, Limits(cap, read_timeout))
