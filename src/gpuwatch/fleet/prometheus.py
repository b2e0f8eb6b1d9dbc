"""The one client of the Prometheus HTTP API (/api/v1), standard library only.

The CLI reads the fleet with it; the tests, the benchmarks and the tools ask Prometheus (or
VictoriaMetrics, which answers the same API) through it too. Every failure is a
PrometheusError whose message is one line naming the URL (never its password): cannot reach,
timed out, HTTP status with the API's own explanation, or an answer that is not the API's.

    prometheus = Prometheus("http://localhost:9090", timeout=5)
    prometheus.query('up{job="gpuwatch"}')              # [Sample(labels, value, timestamp)]
    prometheus.query_value("count(up)")                 # 3.0, or None when empty
    prometheus.query_range("up", start, end, step=15)   # [Series(labels, points)]
    prometheus.label_values("instance", match='up{job="gpuwatch"}')

Credentials: ``http://user:password@host:9090`` (or `basic_auth=`) sends basic auth, and
`bearer_token=` an Authorization header; `ssl_context=` verifies an https Prometheus against
a CA of one's own. `Prometheus.from_environment(url, timeout, ca_file=PATH)`, what the
commands and `gpuwatch serve` use, takes the credentials as gpuwatch.credentials orders them:
the URL's, else GPUWATCH_PROMETHEUS_USER and GPUWATCH_PROMETHEUS_PASSWORD (or
GPUWATCH_PROMETHEUS_TOKEN, a bearer token), else the netrc entry of the host in $NETRC, else
~/.netrc; and `ca_file` (--prometheus.ca-file) is the CA its TLS certificate is checked
against. Credentials never follow a redirect to another host (scheme, host or port), as curl's
do not.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuwatch import credentials
from gpuwatch.credentials import Auth, CredentialsError

DEFAULT_TIMEOUT = 10.0
ENV_USER = "GPUWATCH_PROMETHEUS_USER"
ENV_PASSWORD = "GPUWATCH_PROMETHEUS_PASSWORD"
ENV_TOKEN = "GPUWATCH_PROMETHEUS_TOKEN"
VARIABLES = credentials.Variables(ENV_USER, ENV_PASSWORD, ENV_TOKEN)


def unanswered(e: OSError) -> str | None:
    """Why a request got no HTTP answer, in a few words (the OS's reason: "Connection
    refused", "Name or service not known"); None when it timed out. Shared by the clients of
    Prometheus and of gpuwatch serve, which both say "cannot reach ... at URL: REASON"."""
    reason: object = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):
        return None
    if isinstance(reason, OSError):
        return reason.strerror or str(reason)
    return str(reason)

class PrometheusError(Exception):
    """Prometheus could not be asked or did not answer usefully; the message is one line
    that names the URL. `status` is the HTTP status of a refused request and `error_type`
    the API's errorType (bad_data, execution, timeout...), when there were any."""

    def __init__(self, message: str, status: int | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or an instant query's scalar, without labels)."""

    labels: Mapping[str, str]
    value: float
    timestamp: float = 0.0
    """When the value was evaluated (Unix seconds)."""


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its (Unix time, value) points."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]


Params = Mapping[str, str | Iterable[str]]
"""Query parameters; an iterable value repeats the parameter (match[]=a&match[]=b)."""


def _when(moment: float) -> str:
    return f"{moment:.3f}"


def ca_context(path: Path) -> ssl.SSLContext:
    """A TLS context that trusts the CA certificate(s) of the PEM file `path` (and checks the
    host name); PrometheusError naming the file when it cannot be read or holds none."""
    where = f"{path} (--prometheus.ca-file)"
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "no such file"
        raise PrometheusError(f"{where}: {reason}: name the PEM file of the CA that signed "
                              "Prometheus' certificate")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise PrometheusError(f"{where}: not a PEM CA certificate (-----BEGIN CERTIFICATE-----)"
                              ) from None
    except OSError as e:
        raise PrometheusError(f"{where}: cannot read: {e.strerror or e}") from None


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, (parsed.hostname or "").lower(), port or default


class _CredentialsStayHome(urllib.request.HTTPRedirectHandler):
    """Follows a redirect, but sends the credentials on only to the same scheme, host and
    port (curl's rule): a redirect elsewhere is answered without them."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


class Prometheus:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, *,
                 basic_auth: tuple[str, str] | None = None, bearer_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, auth: Auth | None = None) -> None:
        try:
            parsed = urllib.parse.urlsplit(url)
            valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise PrometheusError(f"{credentials.shown(url)!r} is not a Prometheus URL (for "
                                  "example http://localhost:9090)")
        if auth is None and basic_auth is not None:
            auth = Auth(basic_auth[0], basic_auth[1], "the program")
        elif auth is None and bearer_token is not None:
            auth = Auth(None, bearer_token, "the program")
        elif auth is None and parsed.username is not None:
            auth = Auth(urllib.parse.unquote(parsed.username),
                        urllib.parse.unquote(parsed.password or ""), "the URL")
        self.url = credentials.without_userinfo(url).rstrip("/")
        """The URL without credentials: what requests go to."""
        self.shown_url = credentials.shown(url).rstrip("/")
        """The URL without its password (http://user@host:9090): what messages name."""
        self.host = parsed.hostname or ""
        self.timeout = timeout
        self.auth = auth
        self._headers = {"Accept": "application/json"}
        if auth is not None:
            self._headers["Authorization"] = auth.header
        self._opener = urllib.request.build_opener(
            _CredentialsStayHome, urllib.request.HTTPSHandler(context=ssl_context))

    @classmethod
    def from_environment(cls, url: str, timeout: float = DEFAULT_TIMEOUT, *,
                         ca_file: Path | None = None,
                         environ: Mapping[str, str] | None = None) -> Prometheus:
        """The client of `url` with the credentials of the URL, the environment or netrc (see
        the module's docstring), trusting the CA of `ca_file`; PrometheusError, one line
        naming the file or the variables, when they cannot be worked out."""
        try:
            auth = credentials.lookup(url, VARIABLES, os.environ if environ is None
                                      else environ)
        except CredentialsError as e:
            raise PrometheusError(str(e)) from None
        context = ca_context(ca_file) if ca_file is not None else None
        return cls(url, timeout, auth=auth, ssl_context=context)

    # -- queries -------------------------------------------------------------------------------

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """The instant vector `expr` evaluates to now (or at Unix time `at`)."""
        data = self._instant(expr, at)
        if data.get("resultType") != "vector":
            raise PrometheusError(f"Prometheus at {self.shown_url} answered {expr!r} with a "
                                  f"{data.get('resultType')!r}, not an instant vector")
        return self._vector(data)

    def query_value(self, expr: str, at: float | None = None) -> float | None:
        """The one number `expr` evaluates to: a scalar, or an instant vector of one sample;
        None when the vector is empty. PrometheusError for several series."""
        data = self._instant(expr, at)
        kind = data.get("resultType")
        if kind == "scalar":
            try:
                return float(data["result"][1])
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise self._not_prometheus() from e
        if kind != "vector":
            raise PrometheusError(f"Prometheus at {self.shown_url} answered {expr!r} with a "
                                  f"{kind!r}, not a number")
        samples = self._vector(data)
        if len(samples) > 1:
            raise PrometheusError(f"Prometheus at {self.shown_url} answered {expr!r} with "
                                  f"{len(samples)} series, not one number")
        return samples[0].value if samples else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """The range query from `start` to `end` (Unix seconds), one point per `step`
        seconds: each series with its points."""
        data = self._dict(self.api("query_range", {
            "query": expr, "start": _when(start), "end": _when(end), "step": f"{step:g}"}))
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"Prometheus at {self.shown_url} answered the range query "
                                  f"{expr!r} with a {data.get('resultType')!r}, not a matrix")
        found = []
        for item in self._list(data.get("result", [])):
            try:
                points = tuple((float(t), float(v)) for t, v in item["values"])
                found.append(Series(dict(item["metric"]), points))
            except (KeyError, TypeError, ValueError) as e:
                raise self._not_prometheus() from e
        return found

    # -- metadata ------------------------------------------------------------------------------

    def label_values(self, label: str, match: str | Iterable[str] = (),
                     start: float | None = None, end: float | None = None) -> list[str]:
        """The values `label` has (in the series that match the selectors `match`), sorted."""
        values = self.api(f"label/{urllib.parse.quote(label, safe='')}/values",
                          self._series_params(match, start, end))
        return sorted(map(str, self._list(values)))

    def label_names(self, match: str | Iterable[str] = (), start: float | None = None,
                    end: float | None = None) -> list[str]:
        """The label names (of the series that match `match`), sorted."""
        return sorted(map(str, self._list(self.api("labels", self._series_params(
            match, start, end)))))

    def series(self, match: str | Iterable[str], start: float | None = None,
               end: float | None = None) -> list[dict[str, str]]:
        """The label sets of the series that match the selectors `match`."""
        found = self.api("series", self._series_params(match, start, end))
        return [dict(labels) for labels in self._list(found)]

    def rules(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The rule groups as /api/v1/rules gives them (name, file, rules, evaluationTime,
        lastEvaluation...); `kind` "alert" or "record" keeps one kind of rule."""
        data = self.api("rules", {"type": kind} if kind else {})
        return self._list(self._field(data, "groups"))

    def alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts (labels, annotations, state, activeAt, value)."""
        return self._list(self._field(self.api("alerts"), "alerts"))

    def targets(self, state: str = "active") -> list[dict[str, Any]]:
        """The scrape targets (labels, health, lastError, scrapeUrl...): the active ones, or
        with `state` "dropped" those relabelling dropped."""
        data = self.api("targets", {"state": state})
        return self._list(self._field(data, f"{state}Targets"))

    # -- any endpoint --------------------------------------------------------------------------

    def api(self, endpoint: str, params: Params | None = None) -> Any:
        """The `data` of /api/v1/`endpoint`: for what the methods above do not cover."""
        body = self.get(f"/api/v1/{endpoint}", params)
        try:
            answer = json.loads(body)
        except ValueError as e:
            raise self._not_prometheus() from e
        status = answer.get("status") if isinstance(answer, dict) else None
        if status not in ("success", "error") or (status == "success" and "data" not in answer):
            raise self._not_prometheus()
        if status != "success":
            raise PrometheusError(f"Prometheus at {self.shown_url} answered: "
                                  f"{answer.get('error', 'an error')}",
                                  error_type=answer.get("errorType"))
        return answer["data"]

    def get(self, path: str, params: Params | None = None) -> bytes:
        """The body of GET `path` (e.g. /metrics, /-/ready); PrometheusError for anything but
        a 2xx answer, with the API's explanation when it gave one."""
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        request = urllib.request.Request(f"{self.url}{path}{query}", headers=self._headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise self._unauthorized() from None
            explanation, error_type = _api_error(e)
            raise PrometheusError(f"Prometheus at {self.shown_url} answered HTTP {e.code}"
                                  f"{explanation}", status=e.code,
                                  error_type=error_type) from None
        except OSError as e:  # URLError, a timeout, a connection reset while reading
            reason = unanswered(e)
            if reason is None:
                raise self._timed_out() from None
            if isinstance(getattr(e, "reason", e), ssl.SSLCertVerificationError):
                reason += ("; give the CA that signed its certificate with "
                           "--prometheus.ca-file PATH")
            raise PrometheusError(f"cannot reach Prometheus at {self.shown_url}: "
                                  f"{reason}") from None
        return body

    def _unauthorized(self) -> PrometheusError:
        how = (f"{VARIABLES.advice()}, or a netrc entry for machine {self.host} ($NETRC, "
               "else ~/.netrc)")
        if self.auth is None:
            return PrometheusError(f"Prometheus at {self.shown_url} asks for credentials "
                                   f"(HTTP 401): {how}", status=401)
        return PrometheusError(f"Prometheus at {self.shown_url} refused the credentials of "
                               f"{self.auth.describe()} (HTTP 401): check them, or {how}",
                               status=401)

    # -- the answer's shape --------------------------------------------------------------------

    def _instant(self, expr: str, at: float | None) -> dict[str, Any]:
        params = {"query": expr} if at is None else {"query": expr, "time": _when(at)}
        return self._dict(self.api("query", params))

    def _vector(self, data: dict[str, Any]) -> list[Sample]:
        samples = []
        for item in self._list(data.get("result", [])):
            try:
                time, value = item["value"]
                samples.append(Sample(dict(item["metric"]), float(value), float(time)))
            except (KeyError, TypeError, ValueError) as e:
                raise self._not_prometheus() from e
        return samples

    @staticmethod
    def _series_params(match: str | Iterable[str], start: float | None,
                       end: float | None) -> dict[str, str | list[str]]:
        params: dict[str, str | list[str]] = {}
        selectors = [match] if isinstance(match, str) else list(match)
        if selectors:
            params["match[]"] = selectors
        if start is not None:
            params["start"] = _when(start)
        if end is not None:
            params["end"] = _when(end)
        return params

    def _field(self, data: Any, name: str) -> Any:
        if not isinstance(data, dict) or name not in data:
            raise self._not_prometheus()
        return data[name]

    def _dict(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self._not_prometheus()
        return value

    def _list(self, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise self._not_prometheus()
        return value

    def _timed_out(self) -> PrometheusError:
        return PrometheusError(f"Prometheus at {self.shown_url} did not answer within "
                               f"{self.timeout:g} s")

    def _not_prometheus(self) -> PrometheusError:
        return PrometheusError(f"{self.shown_url} did not answer like the Prometheus HTTP API; is "
                               "it the Prometheus URL?")


def _api_error(e: urllib.error.HTTPError) -> tuple[str, str | None]:
    """The API's own explanation of a failed request (": why"), and its errorType."""
    try:
        answer = json.loads(e.read())
        error, error_type = answer.get("error"), answer.get("errorType")
    except (ValueError, AttributeError, OSError):
        return "", None
    return (f": {error}" if error else ""), (error_type if isinstance(error_type, str)
                                             else None)
