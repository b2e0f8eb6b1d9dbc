"""A small client of the Prometheus HTTP API: instant queries, standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT = 10.0


class PrometheusError(Exception):
    """Prometheus could not be asked or did not answer usefully; the message is one line
    that names the URL."""


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


class Prometheus:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise PrometheusError(f"{url!r} is not a Prometheus URL (for example "
                                  "http://localhost:9090)")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, expr: str) -> list[Sample]:
        """The instant vector `expr` evaluates to now."""
        data = self._get("/api/v1/query", {"query": expr})
        if data.get("resultType") != "vector":
            raise PrometheusError(f"Prometheus at {self.url} answered {expr!r} with a "
                                  f"{data.get('resultType')!r}, not an instant vector")
        samples = []
        for item in data.get("result", []):
            try:
                samples.append(Sample(dict(item["metric"]), float(item["value"][1])))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise self._not_prometheus() from e
        return samples

    def _get(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}{path}?{urllib.parse.urlencode(params)}",
            headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"Prometheus at {self.url} answered HTTP {e.code}"
                                  f"{_api_error(e)}") from e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise self._timed_out() from e
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {text}") from e
        except TimeoutError as e:
            raise self._timed_out() from e
        except OSError as e:  # a connection reset while reading
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: "
                                  f"{e.strerror or e}") from e
        try:
            answer = json.loads(body)
        except ValueError as e:
            raise self._not_prometheus() from e
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), dict):
            raise self._not_prometheus()
        if answer.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url} answered: "
                                  f"{answer.get('error', 'an error')}")
        data: dict[str, Any] = answer["data"]
        return data

    def _timed_out(self) -> PrometheusError:
        return PrometheusError(f"Prometheus at {self.url} did not answer within "
                               f"{self.timeout:g} s")

    def _not_prometheus(self) -> PrometheusError:
        return PrometheusError(f"{self.url} did not answer like the Prometheus HTTP API; is "
                               "it the Prometheus URL?")


def _api_error(e: urllib.error.HTTPError) -> str:
    """The API's own explanation of a failed request, when it gave one."""
    try:
        error = json.loads(e.read()).get("error")
    except (ValueError, AttributeError, OSError):
        return ""
    return f": {error}" if error else ""
