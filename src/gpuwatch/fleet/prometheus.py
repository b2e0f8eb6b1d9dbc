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
a CA of one's own.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT = 10.0



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


class Prometheus:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, *,
                 basic_auth: tuple[str, str] | None = None, bearer_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise PrometheusError(f"{_without_password(url)!r} is not a Prometheus URL (for "
                                  "example http://localhost:9090)")
        if parsed.username is not None and basic_auth is None:
            basic_auth = (urllib.parse.unquote(parsed.username),
                          urllib.parse.unquote(parsed.password or ""))
        netloc = parsed.netloc.rpartition("@")[2]
        self.url = urllib.parse.urlunsplit(parsed._replace(netloc=netloc)).rstrip("/")
        """The URL without credentials: what messages name."""
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        if basic_auth is not None:
            token = base64.b64encode(":".join(basic_auth).encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        elif bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self._ssl_context = ssl_context

    # -- queries -------------------------------------------------------------------------------

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """The instant vector `expr` evaluates to now (or at Unix time `at`)."""
        data = self._instant(expr, at)
        if data.get("resultType") != "vector":
            raise PrometheusError(f"Prometheus at {self.url} answered {expr!r} with a "
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
            raise PrometheusError(f"Prometheus at {self.url} answered {expr!r} with a "
                                  f"{kind!r}, not a number")
        samples = self._vector(data)
        if len(samples) > 1:
            raise PrometheusError(f"Prometheus at {self.url} answered {expr!r} with "
                                  f"{len(samples)} series, not one number")
        return samples[0].value if samples else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """The range query from `start` to `end` (Unix seconds), one point per `step`
        seconds: each series with its points."""
        data = self._dict(self.api("query_range", {
            "query": expr, "start": _when(start), "end": _when(end), "step": f"{step:g}"}))
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"Prometheus at {self.url} answered the range query "
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
            raise PrometheusError(f"Prometheus at {self.url} answered: "
                                  f"{answer.get('error', 'an error')}",
                                  error_type=answer.get("errorType"))
        return answer["data"]

    def get(self, path: str, params: Params | None = None) -> bytes:
        """The body of GET `path` (e.g. /metrics, /-/ready); PrometheusError for anything but
        a 2xx answer, with the API's explanation when it gave one."""
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        request = urllib.request.Request(f"{self.url}{path}{query}", headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self._ssl_context) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as e:
            explanation, error_type = _api_error(e)
            raise PrometheusError(f"Prometheus at {self.url} answered HTTP {e.code}"
                                  f"{explanation}", status=e.code,
                                  error_type=error_type) from e
        except OSError as e:  # URLError, a timeout, a connection reset while reading
            reason = unanswered(e)
            if reason is None:
                raise self._timed_out() from e
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {reason}") from e
        return body

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
        return PrometheusError(f"Prometheus at {self.url} did not answer within "
                               f"{self.timeout:g} s")

    def _not_prometheus(self) -> PrometheusError:
        return PrometheusError(f"{self.url} did not answer like the Prometheus HTTP API; is "
                               "it the Prometheus URL?")


def _without_password(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    user, _, host = parsed.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parsed._replace(
        netloc=f"{user.partition(':')[0]}:***@{host}"))


def _api_error(e: urllib.error.HTTPError) -> tuple[str, str | None]:
    """The API's own explanation of a failed request (": why"), and its errorType."""
    try:
        answer = json.loads(e.read())
        error, error_type = answer.get("error"), answer.get("errorType")
    except (ValueError, AttributeError, OSError):
        return "", None
    return (f": {error}" if error else ""), (error_type if isinstance(error_type, str)
                                             else None)
