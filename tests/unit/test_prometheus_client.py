"""gpuwatch.fleet.prometheus, the one Prometheus HTTP client, against canned API answers.

A small server on 127.0.0.1 answers each /api/v1 path with the JSON a test gives it and
keeps every request (path, parameters, headers), so each method is checked for what it asks
and for what it makes of the answer. The CLI's own errors (unreachable, timeout, HTML) are
in test_cli.py; the client against a real Prometheus and VictoriaMetrics in tests/e2e.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpfake
import pytest

from gpuwatch.fleet.prometheus import Prometheus, PrometheusError, Sample, Series


@dataclass
class Request:
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class CannedApi:
    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def answer(self, path: str, data: Any, status: int = 200) -> None:
        self.answers[path] = (status, {"status": "success", "data": data})

    def fail(self, path: str, status: int, error_type: str, error: str) -> None:
        self.answers[path] = (status, {"status": "error", "errorType": error_type,
                                       "error": error})

    @property
    def last(self) -> Request:
        return self.requests[-1]


@pytest.fixture
def api() -> Iterator[CannedApi]:
    canned = CannedApi()

    class Handler(httpfake.QuietHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            canned.requests.append(Request(url.path, urllib.parse.parse_qs(url.query),
                                           dict(self.headers.items())))
            status, answer = canned.answers.get(url.path, (404, {"status": "error",
                                                                 "error": "no such path"}))
            self.reply(status, json.dumps(answer).encode(),
                       [("Content-Type", "application/json")])

    canned.url, stop = httpfake.start(Handler)
    try:
        yield canned
    finally:
        stop()


def vector(*samples: tuple[dict[str, str], str], at: float = 1700000000.5) -> dict[str, Any]:
    return {"resultType": "vector",
            "result": [{"metric": labels, "value": [at, value]} for labels, value in samples]}


def test_an_instant_query_now_or_at_a_time(api: CannedApi) -> None:
    api.answer("/api/v1/query", vector(({"__name__": "up", "instance": "a"}, "1"),
                                       ({"__name__": "up", "instance": "b"}, "NaN")))
    prometheus = Prometheus(api.url)
    up = prometheus.query("up")
    assert up[0] == Sample({"__name__": "up", "instance": "a"}, 1.0, 1700000000.5)
    assert up[1].value != up[1].value  # NaN
    assert api.last.params == {"query": ["up"]}
    prometheus.query("up", at=1700000000.25)
    assert api.last.params == {"query": ["up"], "time": ["1700000000.250"]}


def test_one_number_from_a_scalar_or_a_vector_of_one(api: CannedApi) -> None:
    prometheus = Prometheus(api.url)
    api.answer("/api/v1/query", {"resultType": "scalar", "result": [1700000000, "42.5"]})
    assert prometheus.query_value("time()") == 42.5
    api.answer("/api/v1/query", vector(({}, "3")))
    assert prometheus.query_value("count(up)") == 3.0
    api.answer("/api/v1/query", vector())
    assert prometheus.query_value("count(nothing)") is None
    api.answer("/api/v1/query", vector(({"a": "1"}, "1"), ({"a": "2"}, "2")))
    with pytest.raises(PrometheusError, match="with 2 series, not one number"):
        prometheus.query_value("up")
    with pytest.raises(PrometheusError, match="not an instant vector"):
        api.answer("/api/v1/query", {"resultType": "scalar", "result": [1, "1"]})
        prometheus.query("1")


def test_a_range_query_gives_each_series_with_its_points(api: CannedApi) -> None:
    api.answer("/api/v1/query_range", {"resultType": "matrix", "result": [
        {"metric": {"gpu": "0"}, "values": [[100, "1"], [115, "0.5"]]}]})
    found = Prometheus(api.url).query_range("gpu_util", start=100, end=115.5, step=15)
    assert found == [Series({"gpu": "0"}, ((100.0, 1.0), (115.0, 0.5)))]
    assert api.last.params == {"query": ["gpu_util"], "start": ["100.000"],
                               "end": ["115.500"], "step": ["15"]}


def test_label_values_names_and_series_take_one_selector_or_several(api: CannedApi) -> None:
    prometheus = Prometheus(api.url)
    api.answer("/api/v1/label/instance/values", ["b:9839", "a:9839"])
    assert prometheus.label_values("instance", 'up{job="gpuwatch"}') == ["a:9839", "b:9839"]
    assert api.last.params == {"match[]": ['up{job="gpuwatch"}']}
    prometheus.label_values("instance", ["up", "nvidia_gpu_up"], start=10, end=20)
    assert api.last.params == {"match[]": ["up", "nvidia_gpu_up"], "start": ["10.000"],
                               "end": ["20.000"]}
    prometheus.label_values("instance")
    assert api.last.params == {}
    api.answer("/api/v1/labels", ["job", "__name__"])
    assert prometheus.label_names("up") == ["__name__", "job"]
    api.answer("/api/v1/series", [{"__name__": "up", "job": "gpuwatch"}])
    assert prometheus.series("up") == [{"__name__": "up", "job": "gpuwatch"}]


def test_rules_alerts_and_targets(api: CannedApi) -> None:
    prometheus = Prometheus(api.url)
    groups = [{"name": "gpuwatch", "rules": [{"name": "GpuDown", "type": "alerting"}]}]
    api.answer("/api/v1/rules", {"groups": groups})
    assert prometheus.rules() == groups and api.last.params == {}
    prometheus.rules("alert")
    assert api.last.params == {"type": ["alert"]}
    api.answer("/api/v1/alerts", {"alerts": [{"labels": {"alertname": "GpuDown"}}]})
    assert prometheus.alerts() == [{"labels": {"alertname": "GpuDown"}}]
    api.answer("/api/v1/targets", {"activeTargets": [{"health": "up"}], "droppedTargets": []})
    assert prometheus.targets() == [{"health": "up"}]
    assert api.last.params == {"state": ["active"]}


def test_a_refused_query_says_why_with_the_status_and_the_error_type(api: CannedApi) -> None:
    api.fail("/api/v1/query", 400, "bad_data", 'parse error: unexpected "}"')
    with pytest.raises(PrometheusError) as e:
        Prometheus(api.url).query("up}")
    assert str(e.value) == f'Prometheus at {api.url} answered HTTP 400: parse error: ' \
        'unexpected "}"'
    assert (e.value.status, e.value.error_type) == (400, "bad_data")
    api.answers["/api/v1/rules"] = (200, {"status": "success", "data": {"no": "groups"}})
    with pytest.raises(PrometheusError, match="did not answer like the Prometheus HTTP API"):
        Prometheus(api.url).rules()


def test_credentials_in_the_url_are_sent_and_never_shown(api: CannedApi) -> None:
    api.answer("/api/v1/query", vector())
    url = api.url.replace("http://", "http://alice:s%3Acret@")
    prometheus = Prometheus(url)
    assert prometheus.query("up") == []
    assert api.last.headers["Authorization"] == "Basic YWxpY2U6czpjcmV0"  # alice:s:cret
    assert prometheus.url == api.url
    api.fail("/api/v1/query", 503, "unavailable", "too many queries")
    with pytest.raises(PrometheusError) as e:
        prometheus.query("up")
    shown = api.url.replace("http://", "http://alice@")
    assert prometheus.shown_url == shown
    assert "cret" not in str(e.value) and f"Prometheus at {shown} answered" in str(e.value)
    with pytest.raises(PrometheusError) as bad:
        Prometheus("ftp://alice:secret@host")
    assert "secret" not in str(bad.value) and "'ftp://alice@host'" in str(bad.value)


def test_a_bearer_token_is_sent(api: CannedApi) -> None:
    api.answer("/api/v1/query", vector())
    Prometheus(api.url, bearer_token="t0ken").query("up")
    assert api.last.headers["Authorization"] == "Bearer t0ken"
