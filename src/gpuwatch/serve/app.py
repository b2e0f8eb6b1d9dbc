"""`gpuwatch serve` over HTTP: the routes, JSON in and out, identity and browser safety, on
the exporter's server (gpuwatch.exporter.web.Server: TLS, basic auth's web config, the
connection cap and read timeout).

Every answer of the API is JSON; a refusal is {"error": "one line"} with 400, 401, 403, 404,
405, 409, 413 or 503, never a traceback. `/` is the lab's page (gpuwatch.serve.web: its files
under /static/, with a strict Content-Security-Policy), `/runbook` the alerts' runbook
(gpuwatch.serve.runbook). A write (POST, PATCH, DELETE) from a browser is safe
against cross-site requests: a POST must say Content-Type: application/json (which a form
cannot send without a CORS preflight this server never grants), and an Origin header, when
present, must be the server's own origin.

    serving = build(ServeOptions(reservations_file=path, listen_address="127.0.0.1:0"),
                    fleet=lambda: gpus)
    serving.start()   # in a thread; serving.url, serving.service; serving.stop()
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import importlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gpuwatch import __version__
from gpuwatch.contract import states
from gpuwatch.exporter import encoding
from gpuwatch.exporter.scrape import Exporter
from gpuwatch.exporter.web import (
    GZIP_LEVEL,
    Reply,
    Request,
    Server,
    WebConfigSource,
    accepts_gzip,
    serve,
)
from gpuwatch.fleet import GpuStatus, read_fleet
from gpuwatch.fleet.prometheus import Prometheus, PrometheusError
from gpuwatch.reservations import ReservationError
from gpuwatch.serve.identity import Identifier, Identity, Refused, load_users_map
from gpuwatch.serve.metrics import build_registry
from gpuwatch.serve.options import (
    DEFAULT_REFRESH_SECONDS,
    SCRAPE_INTERVAL_RECHECK_SECONDS,
    ServeOptions,
    parse_duration,
)
from gpuwatch.serve.service import ApiError, FleetSource, IntervalSource, Service
from gpuwatch.serve.web import SECURITY_HEADERS, Asset, Assets

log = logging.getLogger(__name__)

API = "/api/v1"
MAX_BODY = 64 * 1024
"""Bytes of a request body at most: a booking or a claim is a few hundred."""
HEALTHY = "/-/healthy"
METRICS = "/metrics"
JSON_TYPE = "application/json"
_WRITES = ("POST", "PATCH", "DELETE")
RUNBOOK_MODULE = "gpuwatch.serve.runbook"
"""Answers /runbook with page() -> (body, content type)."""


def _json(status: int, data: object, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    body = b"" if status == 204 else (json.dumps(data, ensure_ascii=False) + "\n").encode()
    return Reply(status, [*headers, ("Content-Type", JSON_TYPE)], body)


def _error(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    return _json(status, {"error": " ".join(message.split())}, headers)


@dataclass(frozen=True)
class _Route:
    methods: tuple[str, ...]
    handler: str
    """The ServeApp method answering it."""


_ROUTES: tuple[tuple[re.Pattern[str], _Route], ...] = tuple(
    (re.compile(pattern), _Route(methods, handler)) for pattern, methods, handler in (
        (r"/", ("GET", "HEAD"), "page"),
        (r"/static/(?P<name>[A-Za-z0-9_.-]+)", ("GET", "HEAD"), "static"),
        (r"/runbook", ("GET", "HEAD"), "runbook"),
        (rf"{API}/session", ("GET", "HEAD"), "session"),
        (re.escape(METRICS), ("GET", "HEAD"), "metrics"),
        (rf"{API}/reservations", ("GET", "HEAD", "POST"), "reservations"),
        (rf"{API}/reservations/(?P<id>[^/]+)", ("PATCH", "DELETE"), "reservation"),
        (rf"{API}/history", ("GET", "HEAD"), "history"),
        (rf"{API}/fleet", ("GET", "HEAD"), "fleet"),
        (rf"{API}/claims", ("GET", "HEAD", "POST"), "claims"),
        (rf"{API}/claims/(?P<id>[^/]+)", ("DELETE",), "claim"),
    ))


@dataclass
class _Asked:
    """One request on its way through: what was asked, by whom, with what body."""

    request: web.BaseRequest
    question: Request
    who: Identity
    pool: Executor
    params: dict[str, str] = field(default_factory=dict)

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, call, *args)


class ServeApp:
    """The answers of `gpuwatch serve` (a gpuwatch.exporter.web.Application)."""

    def __init__(self, service: Service, identifier: Identifier, registry: Any,
                 web_config: WebConfigSource, read_timeout: float = 30.0, *,
                 cadence: Cadence | None = None, public_names: bool = True,
                 grafana_url: str | None = None, assets: Assets | None = None) -> None:
        self.service, self.identifier, self.registry = service, identifier, registry
        self._source = web_config
        self.read_timeout = read_timeout
        self.cadence = cadence or Cadence(None, None)
        self.public_names = public_names
        self.grafana_url = grafana_url
        self.assets = assets or Assets.load()

    @property
    def source(self) -> WebConfigSource:
        return self._source

    async def reply(self, request: web.BaseRequest, question: Request,
                    pool: Executor) -> Reply:
        config = self._source.latest
        headers = list(config.headers.items())
        method, path = question.method, question.path
        api = path.startswith(API + "/") or path == API
        if path == HEALTHY:
            if method not in ("GET", "HEAD"):
                return _error(405, "GET only", [*headers, ("Allow", "GET, HEAD")])
            return Reply(200, [*headers, ("Content-Type", "text/plain; charset=utf-8")],
                         b"OK\n")
        if config.basic_auth_users or config.client_allowed_sans:  # bcrypt: not on the loop
            found = await asyncio.get_running_loop().run_in_executor(
                pool, self.identifier.identify, question, config)
        else:
            found = self.identifier.identify(question, config)
        if isinstance(found, Refused):
            challenge = [("WWW-Authenticate", 'Basic realm="gpuwatch"')] \
                if found.status == 401 and config.basic_auth_users else []
            if api:
                return _error(found.status, found.message, [*headers, *challenge])
            return Reply(found.status, [*headers, *challenge,
                                        ("Content-Type", "text/plain; charset=utf-8")],
                         f"{found.message}\n".encode())
        for pattern, route in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method not in route.methods:
                return _error(405, f"{path} answers {', '.join(route.methods)}",
                              [*headers, ("Allow", ", ".join(route.methods))])
            asked = _Asked(request, question, found, pool, match.groupdict())
            try:
                if method in _WRITES:
                    if not found.known:
                        raise ApiError(401, "who are you? Changes need a user: basic auth, or "
                                       "the trusted proxy's header (read-only otherwise)")
                    self._check_browser(question)
                reply: Reply = await getattr(self, route.handler)(asked)
            except ApiError as e:
                reply = _error(e.status, e.message)
            return Reply(reply.status, [*headers, *reply.headers], reply.body)
        if api:
            return _error(404, f"no such endpoint {path[:100]}; see docs/api.md", headers)
        return Reply(404, [*headers, ("Content-Type", "text/plain; charset=utf-8"),
                           ("X-Content-Type-Options", "nosniff")], b"Not Found\n")

    # -- browser safety, bodies -----------------------------------------------------------

    def own_origin(self, question: Request) -> str:
        """scheme://host[:port] as the asker reached this server (through a trusted proxy:
        as the proxy says it was reached)."""
        scheme = "https" if self._source.latest.tls is not None else "http"
        host = question.headers.get("host", "")
        if self.identifier.trusted(question.client):
            scheme = question.headers.get("x-forwarded-proto", scheme).split(",")[0].strip()
            host = question.headers.get("x-forwarded-host", host).split(",")[0].strip()
        return f"{scheme}://{host}".lower()

    def _check_browser(self, question: Request) -> None:
        origin = question.headers.get("origin")
        if origin is not None and origin.strip().lower().rstrip("/") != \
                self.own_origin(question):
            raise ApiError(403, f"a write from another origin ({origin[:100]}) is refused")
        if question.method in ("POST", "PATCH"):  # the writes with a body
            content_type = question.headers.get("content-type", "")
            if content_type.split(";")[0].strip().lower() != JSON_TYPE:
                raise ApiError(403, f"a {question.method} must have Content-Type: {JSON_TYPE}")

    async def _body(self, asked: _Asked) -> dict[str, Any]:
        request = asked.request
        length = request.content_length
        if length is not None and length > MAX_BODY:
            raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY}")
        try:
            raw = await asyncio.wait_for(_read(request), self.read_timeout)
        except asyncio.TimeoutError:
            raise ApiError(400, "the body did not come in time") from None
        except (ConnectionError, web.HTTPException, ValueError) as e:
            raise ApiError(400, f"the body could not be read: {e}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"the body is not JSON: {str(e)[:100]}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    # -- the routes -----------------------------------------------------------------------

    async def page(self, asked: _Asked) -> Reply:
        return _asset_reply(self.assets.page, asked.question)

    async def static(self, asked: _Asked) -> Reply:
        asset = self.assets.get(asked.params["name"])
        if asset is None:
            return Reply(404, [("Content-Type", "text/plain; charset=utf-8"),
                               *SECURITY_HEADERS], b"Not Found\n")
        return _asset_reply(asset, asked.question)

    async def runbook(self, asked: _Asked) -> Reply:
        try:
            module = importlib.import_module(RUNBOOK_MODULE)
        except ModuleNotFoundError as e:
            if e.name != RUNBOOK_MODULE:
                raise
            return Reply(404, [("Content-Type", "text/plain; charset=utf-8"),
                               ("X-Content-Type-Options", "nosniff")],
                         b"The runbook is not part of this version of gpuwatch serve; "
                         b"see docs/ in the repository.\n")
        body, content_type = await asked.run(module.page)
        return Reply(200, [("Content-Type", content_type),
                           ("X-Content-Type-Options", "nosniff")], body)

    async def session(self, asked: _Asked) -> Reply:
        interval = await asked.run(self.cadence.scrape_interval)
        who = asked.who
        return _json(200, {
            "user": who.user, "admin": who.admin,
            "refresh_seconds": self.cadence.refresh_seconds(interval),
            "public_names": self.public_names, "grafana_url": self.grafana_url,
            "stale_after_seconds": self.cadence.stale_after_seconds(interval),
            "version": __version__})

    def _hides_names(self, who: Identity) -> bool:
        return not self.public_names and not who.known

    async def metrics(self, asked: _Asked) -> Reply:
        headers = asked.question.headers
        write, content_type = encoding.negotiate(headers.get("accept", ""))
        body: bytes = await asked.run(write, self.registry)
        out = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
        if accepts_gzip(headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            out.append(("Content-Encoding", "gzip"))
        return Reply(200, out, body)

    async def reservations(self, asked: _Asked) -> Reply:
        if asked.question.method == "POST":
            body = await self._body(asked)
            return _json(201, await asked.run(self.service.create_reservation, asked.who, body))
        found: list[dict[str, Any]] = await asked.run(self.service.list_reservations)
        if self._hides_names(asked.who):
            found = [_without(r, "user", "comment") for r in found]
        return _json(200, {"reservations": found})

    async def reservation(self, asked: _Asked) -> Reply:
        if asked.question.method == "PATCH":
            body = await self._body(asked)
            return _json(200, await asked.run(self.service.extend_reservation, asked.who,
                                              asked.params["id"], body))
        await asked.run(self.service.delete_reservation, asked.who, asked.params["id"])
        return _json(204, None)

    async def history(self, asked: _Asked) -> Reply:
        return _json(200, {"entries": await asked.run(self.service.history, asked.who)})

    async def fleet(self, asked: _Asked) -> Reply:
        gpus: list[GpuStatus] = await asked.run(self.service.fleet)
        hidden = self._hides_names(asked.who)
        stamps = [g.updated for g in gpus if g.updated is not None]
        return _json(200, {
            "gpus": [_hide_names(g.to_api()) if hidden else g.to_api() for g in gpus],
            "updated": min(stamps) if len(stamps) == len(gpus) and stamps else None,
            "now": self.service.clock(), "names_hidden": hidden})

    async def claims(self, asked: _Asked) -> Reply:
        if asked.question.method == "POST":
            body = await self._body(asked)
            return _json(201, await asked.run(self.service.create_claim, asked.who, body))
        found: list[dict[str, Any]] = await asked.run(self.service.list_claims)
        if self._hides_names(asked.who):
            found = [_without(c, "user") for c in found]
        return _json(200, {"claims": found})

    async def claim(self, asked: _Asked) -> Reply:
        await asked.run(self.service.delete_claim, asked.who, asked.params["id"])
        return _json(204, None)


async def _read(request: web.BaseRequest) -> bytes:
    """The body, ApiError 413 as soon as it is past MAX_BODY (chunked: no length to trust)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes")
        chunks.append(chunk)


def _asset_reply(asset: Asset, question: Request) -> Reply:
    """A file of the page, 304 when the asker has it already (its ETag)."""
    headers = [("Content-Type", asset.content_type), ("ETag", asset.etag),
               ("Cache-Control", "no-cache"), *SECURITY_HEADERS]
    wanted = question.headers.get("if-none-match", "")
    if asset.etag in (t.strip() for t in wanted.split(",")) or wanted.strip() == "*":
        return Reply(304, headers, b"")
    return Reply(200, headers, asset.body)


def _without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in keys}


def _hide_names(gpu: dict[str, Any]) -> dict[str, Any]:
    """A GPU of /api/v1/fleet without who uses, booked or claimed it, nor their commands."""
    out = dict(gpu, users=[])
    out["processes"] = [_without(p, "user", "command") for p in gpu.get("processes", [])]
    if isinstance(gpu.get("reservation"), dict):
        out["reservation"] = _without(gpu["reservation"], "user", "comment")
    if isinstance(gpu.get("claim"), dict):
        out["claim"] = _without(gpu["claim"], "user")
    return out


class Cadence:
    """How often the page refreshes and when its data is stale: --web.refresh, else the
    scrape interval of job gpuwatch as Prometheus says (asked at the first question and
    again every few minutes; DEFAULT_REFRESH_SECONDS when it cannot say). Stale: older
    than two scrape intervals."""

    def __init__(self, fixed: float | None, source: IntervalSource | None,
                 clock: Callable[[], float] = time.monotonic,
                 recheck: float = SCRAPE_INTERVAL_RECHECK_SECONDS) -> None:
        self.fixed, self.source, self.clock, self.recheck = fixed, source, clock, recheck
        self._interval: float | None = None
        self._asked: float | None = None
        self._lock = threading.Lock()

    def scrape_interval(self) -> float | None:
        """Blocks while Prometheus is asked (once every `recheck` seconds)."""
        if self.source is None:
            return None
        with self._lock:
            moment = self.clock()
            if self._asked is None or moment - self._asked >= self.recheck:
                self._asked = moment
                try:
                    found = self.source()
                except (PrometheusError, OSError, ValueError) as e:
                    log.debug("the scrape interval is not known: %s", e)
                else:
                    self._interval = found if found is None or found > 0 else None
            return self._interval

    def refresh_seconds(self, interval: float | None) -> float:
        return self.fixed or interval or DEFAULT_REFRESH_SECONDS

    def stale_after_seconds(self, interval: float | None) -> float:
        return 2 * (interval or self.fixed or DEFAULT_REFRESH_SECONDS)


def prometheus_interval(url: str, timeout: float, ca_file: Path | None = None
                        ) -> IntervalSource:
    """The scrape interval of job gpuwatch: its targets' scrapeInterval (or the evaluation
    interval of the state rules, when that is longer)."""

    def interval() -> float | None:
        prometheus = Prometheus.from_environment(url, timeout, ca_file=ca_file)
        found = [parse_duration(str(t["scrapeInterval"]), "scrapeInterval")
                 for t in prometheus.targets()
                 if isinstance(t, dict) and isinstance(t.get("labels"), dict)
                 and t["labels"].get("job") == states.JOB and t.get("scrapeInterval")]
        if not found:
            return None
        evaluation = [float(g["interval"]) for g in prometheus.rules("record")
                      if isinstance(g, dict) and isinstance(g.get("interval"), (int, float))
                      and any(isinstance(r, dict) and r.get("name") == states.STATE_INFO
                              for r in g.get("rules", []))]
        return max(found + evaluation)

    return interval


# -- the service as a whole ------------------------------------------------------------------

class ClaimWatcher:
    """A thread that ends claims once their owner runs on every claimed GPU (Prometheus
    asked every `every` seconds while there are claims)."""

    def __init__(self, service: Service, every: float) -> None:
        self.service, self.every = service, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpuwatch-claims", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.service.end_claims_in_use()
            except Exception:  # the watcher must outlive a bad answer
                log.exception("checking claims for use failed")


@dataclass
class Serving:
    """A built service: bound, not yet serving until start() or serve_forever()."""

    app: ServeApp
    service: Service
    server: Server
    watcher: ClaimWatcher
    exporter: Exporter
    scheme: str
    host: str
    _started: bool = False

    @property
    def url(self) -> str:
        host = self.host or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.server.port}"

    def start(self) -> None:
        """Serves in a thread of its own (tests, tools); once."""
        if self._started:
            return
        self._started = True
        self.watcher.start()
        self.server.start()

    def serve_forever(self) -> None:
        """Serves in this thread until SIGTERM or SIGINT."""
        self._started = True
        self.watcher.start()
        try:
            self.server.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        self.server.stop()
        self.watcher.stop()
        self.exporter.close()

    def __enter__(self) -> Serving:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prometheus_fleet(url: str, timeout: float, ca_file: Path | None = None) -> FleetSource:
    """The fleet of the Prometheus at `url`, with the credentials of the URL, the environment
    or netrc; PrometheusError now when they cannot be had."""
    prometheus = Prometheus.from_environment(url, timeout, ca_file=ca_file)
    return lambda: read_fleet(prometheus)


def build(options: ServeOptions, *, fleet: FleetSource | None = None,
          clock: Callable[[], float] = time.time, tz: dt.tzinfo | None = None,
          interval: IntervalSource | None = None) -> Serving:
    """The service of the options, its socket bound. `fleet` stands in for Prometheus
    (--prometheus), `clock` for the time, `tz` for the local zone, `interval` for the scrape
    interval Prometheus has (tests; without it, and with `fleet`, none is known). ConfigError (web
    config), UsersMapError (--users.map), ReservationError/ValueError (the file's directory,
    the listen address) or OSError (cannot listen) when it cannot start."""
    path = options.reservations_file
    if not path.parent.is_dir():
        raise ReservationError(f"--reservations.file {path}: the directory {path.parent} does "
                               "not exist")
    web_config = WebConfigSource.watch(options.web_config_file)
    identifier = Identifier(options.admins, options.auth_header, options.trusted_proxies,
                            load_users_map(options.users_map))
    service = Service(path, fleet or prometheus_fleet(options.prometheus,
                                                      options.prometheus_timeout,
                                                      options.prometheus_ca_file),
                      clock=clock, tz=tz)
    if interval is None and fleet is None:
        interval = prometheus_interval(options.prometheus, options.prometheus_timeout,
                                       options.prometheus_ca_file)
    cadence = Cadence(options.refresh_seconds, interval)
    registry, exporter = build_registry(path, service.claims, clock,
                                        options.own_process_metrics)
    app = ServeApp(service, identifier, registry, web_config, options.read_timeout,
                   cadence=cadence, public_names=options.public_names,
                   grafana_url=options.grafana_url)
    try:
        server = serve(app, options.listen_address, options.max_connections,
                       options.read_timeout)
    except BaseException:
        exporter.close()
        raise
    host = options.listen_address.rpartition(":")[0].strip("[]")
    return Serving(app, service, server, ClaimWatcher(service, options.claim_poll_seconds),
                   exporter, "https" if web_config.latest.tls is not None else "http", host)


def start(options: ServeOptions, *, fleet: FleetSource | None = None,
          clock: Callable[[], float] = time.time, tz: dt.tzinfo | None = None,
          interval: IntervalSource | None = None) -> Serving:
    """build() and start(): a service answering in a thread (use it as a context manager)."""
    serving = build(options, fleet=fleet, clock=clock, tz=tz, interval=interval)
    serving.start()
    return serving
