"""The command line's client of `gpuwatch serve` (its /api/v1), standard library only.

Like gpuwatch.fleet.prometheus: every failure is a ServiceError whose message is one line
naming the server's URL, never the password; a refusal carries the API's own `{"error": ...}`
and its HTTP status (`status`), which `gpuwatch run --wait` retries on.

    service = Service.from_environment("http://mon:9840", timeout=10)
    service.get("/api/v1/reservations")              # {"reservations": [...]}
    service.post("/api/v1/claims", {"count": 1, "host": "node-a"})
    service.delete("/api/v1/claims/c-1")

Credentials (gpuwatch.credentials, shared with the client of Prometheus):
``http://user:password@host`` in the URL, else GPUWATCH_USER and GPUWATCH_PASSWORD, else the
netrc file curl reads ($NETRC, else ~/.netrc; machine = the server's host name).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpuwatch import credentials as credentials_
from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.cli.common import UserError, reservations_file
from gpuwatch.contract.states import ALL_GPUS
from gpuwatch.fleet.prometheus import unanswered
from gpuwatch.reservations import Reservation, ReservationError

ENV_SERVER = "GPUWATCH_SERVER"
ENV_USER = "GPUWATCH_USER"
ENV_PASSWORD = "GPUWATCH_PASSWORD"
ENV_NETRC = credentials_.ENV_NETRC
DEFAULT_TIMEOUT = 10.0


class ServiceError(UserError):
    """`gpuwatch serve` could not be asked, or refused; one line naming its URL. `status` is
    the HTTP status of a refusal (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


Credentials = tuple[str, str]
VARIABLES = credentials_.Variables(ENV_USER, ENV_PASSWORD)


def netrc_path(environ: Mapping[str, str]) -> Path:
    """The netrc file curl reads: $NETRC, else ~/.netrc."""
    return credentials_.netrc_path(environ)


def credentials(url: str, environ: Mapping[str, str]) -> Credentials | None:
    """Who to ask as: the URL's user, else GPUWATCH_USER/GPUWATCH_PASSWORD, else netrc (the
    order of gpuwatch.credentials, which the client of Prometheus shares); ServiceError when
    they cannot be worked out."""
    try:
        auth = credentials_.lookup(url, VARIABLES, environ)
    except credentials_.CredentialsError as e:
        raise ServiceError(str(e)) from None
    if auth is None or auth.user is None:
        return None
    return auth.user, auth.secret


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: urllib would send the password on to
    wherever it points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Service:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, *,
                 auth: Credentials | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        netloc = parsed.netloc.rpartition("@")[2]
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            shown = urllib.parse.urlunsplit(parsed._replace(netloc=netloc)) or "''"
            raise ServiceError(f"{shown!r} is not the URL of gpuwatch serve (for example "
                               "http://monitor:9840)")
        self.url = urllib.parse.urlunsplit(parsed._replace(netloc=netloc)).rstrip("/")
        """The URL without credentials: what messages name."""
        self.timeout = timeout
        self.login = auth[0] if auth else None
        """The name we ask as (None: anonymous)."""
        self._headers = {"Accept": "application/json"}
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._opener = urllib.request.build_opener(
            _NoRedirects, urllib.request.HTTPSHandler(context=ssl_context))

    @classmethod
    def from_environment(cls, url: str, timeout: float = DEFAULT_TIMEOUT,
                         environ: Mapping[str, str] | None = None) -> Service:
        return cls(url, timeout, auth=credentials(url, os.environ if environ is None
                                                  else environ))

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """The JSON of the answer (None for an empty one, as 204 is)."""
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers,
                                         method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                answer: bytes = response.read()
        except urllib.error.HTTPError as e:
            raise self._refused(e) from None
        except OSError as e:  # URLError, a timeout, a connection reset while reading
            reason = unanswered(e)
            if reason is None:
                raise self._timed_out() from None
            raise ServiceError(f"cannot reach gpuwatch serve at {self.url}: {reason}") from None
        if not answer.strip():
            return None
        try:
            return json.loads(answer)
        except ValueError:
            raise self._not_the_service(path) from None

    def _refused(self, e: urllib.error.HTTPError) -> ServiceError:
        try:
            error = json.loads(e.read()).get("error")
        except (ValueError, AttributeError, OSError):
            error = None
        if not isinstance(error, str) or not error.strip():
            error = f"HTTP {e.code} {e.reason}"
            if e.code == 404:
                error += f" for {e.url}; is {self.url} gpuwatch serve?"
        error = " ".join(error.split())
        if e.code == 401:
            who = f"as {self.login}" if self.login else \
                f"without a user: set {ENV_USER} and {ENV_PASSWORD}, or a netrc entry for " \
                f"machine {urllib.parse.urlsplit(self.url).hostname}"
            return ServiceError(f"gpuwatch serve at {self.url} did not accept you {who} "
                                f"({error})", status=401)
        return ServiceError(f"gpuwatch serve at {self.url}: {error}", status=e.code)

    def _timed_out(self) -> ServiceError:
        return ServiceError(f"gpuwatch serve at {self.url} did not answer within "
                            f"{self.timeout:g} s")

    def _not_the_service(self, path: str) -> ServiceError:
        return ServiceError(f"{self.url}{path} did not answer JSON; is {self.url} the URL of "
                            "gpuwatch serve?")


# -- the commands' choice: the service, or the file ---------------------------------------------

def server_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--server", metavar="URL", default=None if defaults else argparse.SUPPRESS,
                   help=f"the gpuwatch serve to ask (default: ${ENV_SERVER})")


def server_url(args: argparse.Namespace) -> str | None:
    return getattr(args, "server", None) or os.environ.get(ENV_SERVER) or None


def service(args: argparse.Namespace) -> Service:
    """The service of --server or GPUWATCH_SERVER; UserError when neither is given."""
    url = server_url(args)
    if url is None:
        raise UserError(f"which gpuwatch serve? Pass --server URL or set {ENV_SERVER}")
    return Service.from_environment(url, getattr(args, "timeout", DEFAULT_TIMEOUT))


def service_or_file(args: argparse.Namespace) -> Service | Path:
    """--file PATH when given (the admin on the monitoring host), else the service of
    --server/GPUWATCH_SERVER, else the file of GPUWATCH_RESERVATIONS."""
    if getattr(args, "file", None) is not None:
        if getattr(args, "server", None):
            raise UserError("--file and --server: give one (the file is for the admin on "
                            "the monitoring host)")
        return Path(args.file)
    if server_url(args):
        return service(args)
    return reservations_file(args)


# -- the API's bookings --------------------------------------------------------------------------

def booking_from_api(raw: Any, url: str) -> Reservation:
    """The booking of the API's R object, with its id; ServiceError when it is not one."""
    try:
        gpus = raw["gpus"]
        start = raw.get("start")
        return Reservation(
            id=str(raw["id"]),
            host=str(raw["host"]),
            gpus=None if gpus == ALL_GPUS else reservations.cells(Cell.from_json(i)
                                                                 for i in gpus),
            user=str(raw["user"]),
            until=dt.datetime.fromisoformat(raw["until"]),
            start=dt.datetime.fromisoformat(start) if start else None,
            comment=str(raw.get("comment") or ""))
    except (KeyError, TypeError, ValueError, AttributeError, ReservationError):
        raise ServiceError(f"gpuwatch serve at {url} answered a booking the client cannot "
                           f"read: {json.dumps(raw)[:200]}") from None


def bookings_from_api(answer: Any, url: str) -> list[Reservation]:
    listed = answer.get("reservations") if isinstance(answer, dict) else None
    if not isinstance(listed, list):
        raise ServiceError(f"{url}/api/v1/reservations did not answer a list of "
                           "reservations; is it gpuwatch serve?")
    return [booking_from_api(r, url) for r in listed]


def booking_to_api(b: Reservation, user: bool) -> dict[str, Any]:
    """The POST body of booking `b`; with `user`, for b.user (which only admins may)."""
    body: dict[str, Any] = {"host": b.host,
                            "gpus": reservations.gpus_json(b.gpus),
                            "until": reservations.iso(b.until), "comment": b.comment}
    if b.start is not None:
        body["start"] = reservations.iso(b.start)
    if user:
        body["user"] = b.user
    return body
