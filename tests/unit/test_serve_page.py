"""The lab's page of gpuwatch serve without a browser: its files and headers (strict CSP, no
inline script or style, ETags, nothing outside /static/), the DOM ids the browser tests select
by, the colours of contract/states.py with AA contrast in both themes, /api/v1/session,
--web.public-names=false, extending a booking (PATCH), /runbook, the fleet's new fields
(processes, temperature, since, cluster, updated), MIG slices as the page reads them (every
field the script reads of a cell is in the API's JSON; a slice's names hidden as a GPU's; the
booking the page sends for a slice) and the page's flags.
(tests/browser/ drives the page itself in Chromium.)"""

from __future__ import annotations

import html.parser
import json
import re
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpuwatch import cli
from gpuwatch.cli import serve as serve_command
from gpuwatch.contract import metrics, states
from gpuwatch.fleet import GpuProcess, GpuStatus, read_fleet
from gpuwatch.fleet.prometheus import Prometheus, PrometheusError, Sample
from gpuwatch.serve import app as serve_app
from gpuwatch.serve import web
from gpuwatch.serve.app import Cadence
from gpuwatch.serve.service import Service
from tests.unit import test_serve
from tests.unit.test_serve import START, Client, Clock, Fleet, book, serving

# the service's fixtures: a four-GPU fleet, a clock a test moves, a client of a running serve
fleet, clock, client = test_serve.fleet, test_serve.clock, test_serve.client

WEB = Path(web.__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


# -- the files and their headers -----------------------------------------------------------

def test_the_page_and_its_files_come_with_the_strict_policy_and_an_etag(client: Client) -> None:
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                       ("/static/app.css", "text/css"), ("/static/states.css", "text/css"),
                       ("/static/favicon.svg", "image/svg+xml")):
        status, headers, body = client.call("GET", path)
        assert status == 200 and body, path
        assert headers["content-type"].startswith(kind), path
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        etag = headers["etag"]
        again, headers2, body2 = client.call("GET", path, headers={"If-None-Match": etag})
        assert again == 304 and body2 == b"" and headers2["etag"] == etag
        head, _, nothing = client.call("HEAD", path)
        assert head == 200 and nothing == b""


@pytest.mark.parametrize("path", [
    "/static/../pyproject.toml", "/static/%2e%2e/app.py", "/static/", "/static",
    "/static/__init__.py", "/static/index.html", "/static/sub/app.js", "/static/nothing.js",
    "/static/..%2fapp.py"])
def test_nothing_but_the_page_s_files_is_served_from_static(client: Client, path: str) -> None:
    status, _, body = client.call("GET", path)
    assert status == 404, path
    assert b"import" not in body and b"<" not in body


class _Markup(html.parser.HTMLParser):
    """Every element with its attributes, and what an inline script or style would be."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.elements.append((tag, found))
        if tag == "style" or (tag == "script" and not found.get("src")):
            self.inline.append(tag)
        self.inline += [f"{tag} {name}=" for name in found
                        if name == "style" or name.startswith("on")]

    def by_id(self, name: str) -> tuple[str, dict[str, str | None]]:
        found = [e for e in self.elements if e[1].get("id") == name]
        assert len(found) == 1, name
        return found[0]


def _page(client: Client) -> _Markup:
    markup = _Markup()
    markup.feed(client.call("GET", "/")[2].decode())
    return markup


def test_the_page_has_the_contract_s_elements_and_no_inline_script_or_style(
        client: Client) -> None:
    page = _page(client)
    assert page.inline == []
    assert page.by_id("grid")[0] == "main"
    assert page.by_id("detail")[1]["role"] == "tooltip"
    assert page.by_id("banner")[1]["role"] == "alert" and "hidden" in page.by_id("banner")[1]
    assert page.by_id("pause")[1]["aria-pressed"] == "false"
    for name in ("filter-cluster", "filter-model", "filter-state"):
        assert page.by_id(name)[0] == "select"
    assert page.by_id("only-free")[1]["type"] == "checkbox"
    assert page.by_id("search")[0] == "input"
    for name in ("summary", "legend", "whoami", "bookings", "book-dialog", "book-host",
                 "book-gpus", "book-until", "book-comment", "book-submit", "book-cancel",
                 "book-error", "extend-dialog", "extend-until", "extend-submit"):
        page.by_id(name)
    assert page.by_id("book-until")[1]["type"] == "datetime-local"
    assert page.by_id("book-error")[1]["role"] == "alert"
    legend = [a["data-state"] for tag, a in page.elements if tag == "li" and "data-state" in a]
    assert legend == [s.name for s in states.ALL] + ["stale"]
    options = [a["value"] for tag, a in page.elements if tag == "option" and a.get("value")]
    assert options == [s.name for s in states.ALL]
    scripts = [a["src"] for tag, a in page.elements if tag == "script"]
    sheets = [a["href"] for tag, a in page.elements if tag == "link" and a.get("rel") ==
              "stylesheet"]
    assert scripts == ["/static/app.js"] and sheets == ["/static/states.css", "/static/app.css"]


def test_every_input_has_a_label(client: Client) -> None:
    text = client.call("GET", "/")[2].decode()
    labelled = set(re.findall(r'<label for="([^"]+)"', text))
    page = _page(client)
    for tag, attrs in page.elements:
        if tag in ("input", "select") and attrs.get("id") not in labelled:
            # the others sit inside their <label>
            name = attrs["id"]
            assert re.search(rf"<label[^>]*>[^<]*(<[^/][^>]*>[^<]*)*<{tag} id=\"{name}\"",
                             text), name


def test_the_script_writes_no_style_attribute_and_asks_no_other_host() -> None:
    script = (WEB / "app.js").read_text()
    assert "style=" not in script and 'setAttribute("style"' not in script
    assert "eval(" not in script and "new Function" not in script
    assert not re.search(r"https?://", script)
    assert "credentials: \"same-origin\"" in script
    for name in ("index.html", "app.css"):
        assert not re.search(r"https?://(?!www\.w3\.org)", (WEB / name).read_text()), name
    assert "@import" not in (WEB / "app.css").read_text()


# -- colours: one source, readable -----------------------------------------------------------

def _luminance(colour: str) -> float:
    value = colour.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    channels = [int(value[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_states_css_colours_every_state_from_the_contract(client: Client) -> None:
    css = client.call("GET", "/static/states.css")[2].decode()
    for s in states.ALL:
        assert f"--state-{s.name}: {web.PALETTE[s.colour]};" in css
        assert f".state-{s.name}, .swatch-{s.name} {{ background-color: " \
            f"var(--state-{s.name});" in css
    assert ".stale, .swatch-stale {" in css
    for background in [web.PALETTE[s.colour] for s in states.ALL] + [web.STALE_BACKGROUND]:
        assert contrast(web.TEXT_ON_STATE, background) >= 4.5, background


def _theme(css: str, dark: bool) -> dict[str, str]:
    light = re.search(r":root \{([^}]*)\}", css)
    night = re.search(r"prefers-color-scheme: dark\) \{\s*:root \{([^}]*)\}", css)
    assert light and night
    found = dict(re.findall(r"--([\w-]+): (#[0-9a-fA-F]{3,6});", light.group(1)))
    if dark:
        found.update(re.findall(r"--([\w-]+): (#[0-9a-fA-F]{3,6});", night.group(1)))
    return found


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_the_page_s_text_has_aa_contrast_in_both_themes(dark: bool) -> None:
    colours = _theme((WEB / "app.css").read_text(), dark)
    for text, background in (("fg", "bg"), ("muted", "bg"), ("fg", "panel"), ("muted", "panel"),
                             ("link", "bg"), ("error", "bg"), ("error", "panel"),
                             ("banner-fg", "banner-bg"), ("fg", "button-bg")):
        ratio = contrast(colours[text], colours[background])
        assert ratio >= 4.5, (text, background, ratio)


# -- /api/v1/session -------------------------------------------------------------------------

def test_the_session_says_who_asks_how_often_to_refresh_and_when_data_is_stale(
        tmp_path: Path, fleet: Fleet, clock: Clock) -> None:
    with serving(tmp_path, fleet, clock, refresh_seconds=30.0,
                 grafana_url="https://grafana.lab") as s:
        client = Client(s)
        status, answer = client.json("GET", "/api/v1/session", user="root")
        assert status == 200
        assert answer == {"user": "root", "admin": True, "refresh_seconds": 30.0,
                          "public_names": True, "grafana_url": "https://grafana.lab",
                          "stale_after_seconds": 60.0, "version": answer["version"]}
        _, nobody = client.json("GET", "/api/v1/session")
        assert nobody["user"] is None and nobody["admin"] is False


def test_the_refresh_is_the_scrape_interval_prometheus_says(tmp_path: Path, fleet: Fleet,
                                                            clock: Clock) -> None:
    asked: list[int] = []

    def interval() -> float | None:
        asked.append(1)
        return 5.0

    with serve_app.start(replace(_options(tmp_path)), fleet=fleet, clock=clock,
                         interval=interval) as s:
        _, answer = Client(s).json("GET", "/api/v1/session")
        Client(s).json("GET", "/api/v1/session")
    assert answer["refresh_seconds"] == 5.0 and answer["stale_after_seconds"] == 10.0
    assert asked == [1]  # once, not per question


def _options(tmp_path: Path) -> Any:
    from gpuwatch.serve.options import ServeOptions
    return ServeOptions(reservations_file=tmp_path / "reservations.yml",
                        listen_address="127.0.0.1:0", own_process_metrics=False,
                        claim_poll_seconds=3600)


def test_the_cadence_asks_again_after_a_while_and_outlives_a_failure() -> None:
    now = [0.0]
    answers: list[float | Exception | None] = [
        PrometheusError("cannot reach Prometheus at http://x: refused"), 10.0, 20.0]

    def source() -> float | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cadence = Cadence(None, source, clock=lambda: now[0], recheck=300)
    assert cadence.scrape_interval() is None
    assert cadence.refresh_seconds(None) == 15.0 and cadence.stale_after_seconds(None) == 30.0
    now[0] = 299
    assert cadence.scrape_interval() is None  # not asked again yet
    now[0] = 300
    assert cadence.scrape_interval() == 10.0
    now[0] = 500
    assert cadence.scrape_interval() == 10.0
    now[0] = 600
    assert cadence.scrape_interval() == 20.0 and cadence.stale_after_seconds(20.0) == 40.0
    assert Cadence(7.0, None).refresh_seconds(None) == 7.0


def test_the_interval_of_prometheus_is_the_job_s_scrape_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    targets = [{"labels": {"job": "other"}, "scrapeInterval": "1m"},
               {"labels": {"job": states.JOB}, "scrapeInterval": "15s"}]
    groups: list[dict[str, Any]] = [{"name": "gpuwatch-state", "interval": 30,
                                     "rules": [{"name": states.STATE_INFO}]}]
    monkeypatch.setattr(Prometheus, "targets", lambda self, state="active": targets)
    monkeypatch.setattr(Prometheus, "rules", lambda self, kind=None: groups)
    interval = serve_app.prometheus_interval("http://127.0.0.1:9", 1.0)
    assert interval() == 30.0  # rules evaluated less often than scraped: that counts
    groups[0]["interval"] = 5
    assert interval() == 15.0
    targets.pop()
    assert interval() is None


# -- the fleet for the page, and privacy -----------------------------------------------------

def _rich(fleet: Fleet) -> None:
    from gpuwatch.fleet import ActiveClaim, ActiveReservation
    fleet.gpus = [
        replace(g, updated=START - 3, processes=(
            GpuProcess(pid=41, user="alice", command="python train.py", memory_bytes=2e9,
                       start_time=START - 60),), users=("alice",), state="busy")
        if (g.host, g.gpu) == ("node-a", 0) else
        replace(g, updated=START - 3, state="reserved", reservation=ActiveReservation(
            "bob", "2027-01-16T08:00:00+00:00", START + 86400, "thesis"))
        if (g.host, g.gpu) == ("node-a", 1) else
        replace(g, updated=START - 3, state="claimed", claim=ActiveClaim(
            "c1", "carol", "2027-01-15T08:05:00+00:00"))
        if (g.host, g.gpu) == ("node-a", 2) else replace(g, updated=START - 3)
        for g in fleet.gpus]


def test_the_fleet_says_when_it_was_evaluated_and_the_server_s_time(
        client: Client, fleet: Fleet) -> None:
    _, answer = client.json("GET", "/api/v1/fleet")
    assert answer["updated"] is None  # the fake GPUs do not say
    _rich(fleet)
    fleet.gpus[3] = replace(fleet.gpus[3], updated=START - 9)
    _, answer = client.json("GET", "/api/v1/fleet")
    assert answer["updated"] == START - 9 and answer["now"] == START  # the oldest
    assert answer["names_hidden"] is False
    busy = answer["gpus"][0]
    assert busy["processes"] == [{"pid": 41, "user": "alice", "command": "python train.py",
                                  "memory_bytes": 2e9, "start_time": START - 60}]


def test_without_public_names_nobody_sees_names_but_the_signed_in_do(
        tmp_path: Path, fleet: Fleet, clock: Clock) -> None:
    _rich(fleet)
    with serving(tmp_path, fleet, clock, public_names=False) as s:
        client = Client(s)
        book(client, "dave", (3,), comment="secret project")
        client.json("POST", "/api/v1/claims", {"host": "node-b", "count": 1}, user="erin")
        _, hidden = client.json("GET", "/api/v1/fleet")
        assert hidden["names_hidden"] is True
        text = json.dumps(hidden)
        for name in ("alice", "bob", "carol", "train.py", "thesis"):
            assert name not in text, name
        by = {(g["host"], g["gpu"]): g for g in hidden["gpus"]}
        assert by["node-a", 0]["users"] == [] and by["node-a", 0]["state"] == "busy"
        assert by["node-a", 0]["processes"] == [{"pid": 41, "memory_bytes": 2e9,
                                                 "start_time": START - 60}]
        assert by["node-a", 1]["reservation"]["until_timestamp"] == START + 86400
        assert by["node-a", 2]["claim"] == {"id": "c1", "until": "2027-01-15T08:05:00+00:00"}
        _, bookings = client.json("GET", "/api/v1/reservations")
        assert bookings["reservations"] and all(
            "user" not in r and "comment" not in r for r in bookings["reservations"])
        _, claims = client.json("GET", "/api/v1/claims")
        assert claims["claims"] and all("user" not in c for c in claims["claims"])
        _, seen = client.json("GET", "/api/v1/fleet", user="frank")
        assert seen["names_hidden"] is False and "alice" in json.dumps(seen)
        _, theirs = client.json("GET", "/api/v1/reservations", user="frank")
        assert theirs["reservations"][0]["comment"] == "secret project"
        _, session = client.json("GET", "/api/v1/session")
        assert session["public_names"] is False


def test_the_service_tells_since_when_a_gpu_is_in_its_state(tmp_path: Path, fleet: Fleet,
                                                            clock: Clock) -> None:
    _rich(fleet)
    service = Service(tmp_path / "r.yml", fleet, clock=clock)
    first = {(g.host, g.gpu): g for g in service.fleet()}
    assert first["node-b", 0].since is None  # free since before the service looked
    fleet.gpus = [replace(g, state="busy", updated=START + 7) if (g.host, g.gpu) ==
                  ("node-b", 0) else g for g in fleet.gpus]
    clock.now = START + 10
    second = {(g.host, g.gpu): g for g in service.fleet()}
    assert second["node-b", 0].since == START + 7  # the reading that showed the change
    assert second["node-b", 1].since is None
    clock.now = START + 20
    third = {(g.host, g.gpu): g for g in service.fleet()}
    assert third["node-b", 0].since == START + 7
    given = replace(fleet.gpus[0], since=START - 500)
    fleet.gpus[0] = given
    assert service.fleet()[0].since == START - 500  # what the series tell wins


# -- extending a booking ---------------------------------------------------------------------

def test_a_booking_is_extended_by_its_owner_or_an_admin_only(tmp_path: Path,
                                                             client: Client) -> None:
    _, made = book(client, "alice", (0, 1), comment="ablation")
    path = f"/api/v1/reservations/{made['id']}"
    status, changed = client.json("PATCH", path, {"until": "+3d"}, user="alice")
    assert status == 200
    assert changed["id"] == made["id"] and changed["comment"] == "ablation"
    assert changed["until"] == "2027-01-18T08:00:00+00:00"
    status, refused = client.json("PATCH", path, {"until": "+5d"}, user="bob")
    assert status == 403 and "alice" in refused["error"]
    status, _ = client.json("PATCH", path, {"until": "+1h"}, user="root")
    assert status == 200
    _, listed = client.json("GET", "/api/v1/reservations")
    assert [r["until"] for r in listed["reservations"]] == ["2027-01-15T09:00:00+00:00"]
    _, history = client.json("GET", "/api/v1/history", user="root")
    assert [e["action"] for e in history["entries"]] == ["add", "update", "update"]


@pytest.mark.parametrize("body, status", [
    ({"until": "yesterday"}, 400), ({"until": "2020-01-01T00:00Z"}, 400), ({}, 400),
    ({"until": "+1d", "host": "node-b"}, 400), ({"until": 5}, 400)])
def test_a_bad_extension_is_a_one_line_refusal(client: Client, body: Any, status: int) -> None:
    _, made = book(client, "alice")
    got, answer = client.json("PATCH", f"/api/v1/reservations/{made['id']}", body, user="alice")
    assert got == status and set(answer) == {"error"} and "\n" not in answer["error"]


def test_an_extension_into_someone_else_s_booking_is_a_409_and_unknown_ids_404(
        client: Client) -> None:
    _, mine = book(client, "alice", (0,), until="+2h")
    book(client, "bob", (0,), until="+1d", start="+3h")
    status, answer = client.json("PATCH", f"/api/v1/reservations/{mine['id']}",
                                 {"until": "+5h"}, user="alice")
    assert status == 409 and "bob" in answer["error"]
    assert client.json("PATCH", "/api/v1/reservations/ffffffff", {"until": "+5h"},
                       user="alice")[0] == 404
    assert client.json("PATCH", f"/api/v1/reservations/{mine['id']}", {"until": "+5h"})[0] == 401


def test_an_extension_is_a_write_a_browser_cannot_forge(client: Client) -> None:
    _, made = book(client, "alice")
    path = f"/api/v1/reservations/{made['id']}"
    status, _, _ = client.call("PATCH", path, raw=b'{"until": "+1d"}', user="alice",
                               headers={"Content-Type": "text/plain"})
    assert status == 403
    status, _, _ = client.call("PATCH", path, {"until": "+1d"}, user="alice",
                               headers={"Origin": "https://evil.example"})
    assert status == 403


# -- /runbook --------------------------------------------------------------------------------

def test_the_runbook_is_the_runbook_module_s_page_or_a_404_in_words(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, serve_app.RUNBOOK_MODULE, None)  # not there
    status, headers, body = client.call("GET", "/runbook")
    assert status == 404 and b"runbook" in body and headers["content-type"].startswith(
        "text/plain")
    module = types.ModuleType(serve_app.RUNBOOK_MODULE)
    module.page = lambda: (b"<h1>Runbook</h1>", "text/html; charset=utf-8")  # type: ignore
    monkeypatch.setitem(sys.modules, serve_app.RUNBOOK_MODULE, module)
    status, headers, body = client.call("GET", "/runbook")
    assert status == 200 and body == b"<h1>Runbook</h1>"
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert client.call("POST", "/runbook", {}, user="alice")[0] == 405


# -- what Prometheus says of each GPU --------------------------------------------------------

class SeriesPrometheus(Prometheus):
    """Answers the reader's instant queries from a list of series, as Prometheus would."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")
        self.samples: list[Sample] = []
        self.evaluated = START - 4

    def add(self, name: str, value: float, **labels: str) -> None:
        self.samples.append(Sample({"__name__": name, **labels}, value, 0.0))

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        stamp = re.fullmatch(r"timestamp\((.+)\)", expr)
        if stamp:
            return [Sample({k: v for k, v in s.labels.items() if k != "__name__"},
                           self.evaluated) for s in self.samples
                    if s.labels["__name__"] == stamp.group(1)]
        selector = re.fullmatch(r'\{__name__=~"([^"]*)"\}', expr)
        names = set(selector.group(1).split("|")) if selector else {expr}
        return [s for s in self.samples if s.labels["__name__"] in names]


def test_the_fleet_reads_processes_temperature_since_cluster_and_evaluation_time() -> None:
    prom = SeriesPrometheus()
    ids = {"instance": "n1:9839", "host": "n1", "gpu": "0", "uuid": "GPU-1"}
    other = {**ids, "gpu": "1", "uuid": "GPU-2"}
    prom.add(states.STATE_INFO, 1, **ids, state="busy", users="alice,bob", model="H100",
             cluster="cluster-a")
    prom.add(states.STATE_INFO, 1, **other, state="idle", users="erin", model="H100")
    for key in (ids, other):
        prom.add(metrics.UP.name, 1, **key)
    prom.add(metrics.TEMPERATURE.name, 61, **ids)
    for pid, user, memory, started in (("7", "alice", 1e9, START - 100),
                                       ("9", "bob", 3e9, START - 50)):
        labels = {**ids, "pid": pid, "user": user, "command": f"python {user}.py",
                  "container_id": "", "slurm_job_id": ""}
        prom.add(metrics.PROCESS_MEMORY.name, memory, **labels)
        prom.add(metrics.PROCESS_START.name, started, **labels)
    prom.add(states.INACTIVE_SINCE, START - 3600, **other)
    busy, idle = read_fleet(prom)
    assert busy.processes == (
        GpuProcess(9, "bob", "python bob.py", 3e9, START - 50),
        GpuProcess(7, "alice", "python alice.py", 1e9, START - 100))
    assert busy.temperature_celsius == 61 and busy.cluster == "cluster-a"
    assert busy.since == START - 100  # its oldest process
    assert busy.updated == START - 4
    assert idle.since == START - 3600 and idle.cluster is None and idle.processes == ()
    assert idle.temperature_celsius is None
    status = busy.to_json()  # gpuwatch status --json: keys only added, none that move
    assert set(status) == {
        "host", "instance", "gpu", "uuid", "state", "users", "model", "display_name",
        "memory_used_bytes", "memory_total_bytes", "utilization_ratio", "inactive_since",
        "reservation", "claim", "temperature_celsius", "cluster", "gpu_instance_id",
        "profile", "mig_uuid"}
    assert (status["gpu_instance_id"], status["profile"], status["mig_uuid"]) == \
        (None, None, None)  # a whole GPU
    out = busy.to_api()
    assert set(out) == set(status) | {"processes", "since", "updated"}
    assert out["since"] == START - 100 and out["updated"] == START - 4
    assert out["processes"] == [{"pid": 9, "user": "bob", "command": "python bob.py",
                                   "memory_bytes": 3e9, "start_time": START - 50},
                                  {"pid": 7, "user": "alice", "command": "python alice.py",
                                   "memory_bytes": 1e9, "start_time": START - 100}]
    json.dumps(out)


# -- MIG slices as the page reads them -------------------------------------------------------

def _slice(host: str, index: int, instance: int, state: str = "free",
           users: tuple[str, ...] = (), profile: str = "1g.10gb") -> GpuStatus:
    """A MIG slice as gpuwatch.fleet reads it: its parent's index and UUID, its own memory,
    no utilisation, the parent's temperature."""
    whole = test_serve.gpu(host, index, state, users)
    return replace(whole, display_name=f"{whole.display_name} {profile}",
                   memory_total_bytes=10e9, utilization_ratio=None, temperature_celsius=44.0,
                   updated=START - 3, gpu_instance_id=instance, profile=profile,
                   mig_uuid=f"MIG-{index}-{instance}", processes=tuple(
                       GpuProcess(pid=60 + n, user=u, command=f"python {u}.py",
                                  memory_bytes=1e9, start_time=START - 60)
                       for n, u in enumerate(users)))


def _mig_fleet(fleet: Fleet) -> None:
    fleet.gpus = [_slice("node-m", 0, 7, "busy", ("alice",)), _slice("node-m", 0, 8),
                  replace(test_serve.gpu("node-m", 1), updated=START - 3)]


def test_every_field_the_script_reads_of_a_cell_is_in_the_fleet_s_json(
        client: Client, fleet: Fleet) -> None:
    _mig_fleet(fleet)
    _, answer = client.json("GET", "/api/v1/fleet")
    read = set(re.findall(r"\bg\.([a-z_]+)", (WEB / "app.js").read_text()))
    assert {"gpu_instance_id", "profile", "mig_uuid"} <= read
    busy, free, whole = answer["gpus"]
    for cell in answer["gpus"]:
        assert read - set(cell) == set(), cell
    assert (busy["gpu"], busy["gpu_instance_id"], busy["profile"], busy["mig_uuid"]) == \
        (0, 7, "1g.10gb", "MIG-0-7")
    assert busy["utilization_ratio"] is None and busy["processes"][0]["user"] == "alice"
    assert busy["display_name"].endswith(" 1g.10gb") and free["gpu_instance_id"] == 8
    assert (whole["gpu"], whole["gpu_instance_id"], whole["profile"]) == (1, None, None)


def test_without_public_names_a_slice_hides_its_names_as_a_gpu_does(
        tmp_path: Path, fleet: Fleet, clock: Clock) -> None:
    _mig_fleet(fleet)
    with serving(tmp_path, fleet, clock, public_names=False) as s:
        _, hidden = Client(s).json("GET", "/api/v1/fleet")
    busy = hidden["gpus"][0]
    assert busy["users"] == [] and busy["processes"] == [
        {"pid": 60, "memory_bytes": 1e9, "start_time": START - 60}]
    assert busy["mig_uuid"] == "MIG-0-7" and "alice" not in json.dumps(hidden)


def test_a_slice_is_booked_with_the_body_the_page_sends(client: Client, fleet: Fleet) -> None:
    _mig_fleet(fleet)
    # what the page's dialog sends for a slice (tests/browser checks the page sends it)
    status, made = book(client, "bob", ["0/8"], host="node-m")
    assert status == 201, made
    assert made["gpus"] == ["0/8"]
    _, listed = client.json("GET", "/api/v1/reservations", user="bob")
    assert [r["gpus"] for r in listed["reservations"]] == [["0/8"]]


# -- flags -----------------------------------------------------------------------------------

def _options_of(*argv: str) -> Any:
    args = cli.build_parser().parse_args(["serve", "--reservations.file", "r.yml", *argv])
    return serve_command.options_from_args(args)


def test_the_page_s_flags_land_in_their_options() -> None:
    got = _options_of("--web.refresh", "1m30s", "--web.public-names=false",
                      "--web.grafana-url", "https://grafana.lab/")
    assert got.refresh_seconds == 90 and got.public_names is False
    assert got.grafana_url == "https://grafana.lab"
    default = _options_of()
    assert default.refresh_seconds is None and default.public_names is True
    assert default.grafana_url is None


@pytest.mark.parametrize("argv, named", [
    (("--web.refresh", "soon"), "--web.refresh"), (("--web.refresh", "0s"), "--web.refresh"),
    (("--web.public-names", "maybe"), "--web.public-names"),
    (("--web.grafana-url", "javascript:alert(1)"), "--web.grafana-url"),
    (("--web.grafana-url", 'http://x/"><script>'), "--web.grafana-url")])
def test_a_bad_page_flag_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                argv: tuple[str, ...], named: str) -> None:
    assert cli.main(["serve", "--reservations.file", "r.yml", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_every_element_the_script_looks_up_is_in_the_page(client: Client) -> None:
    ids = {a["id"] for _, a in _page(client).elements if a.get("id")}
    wanted = set(re.findall(r'\$\("([\w-]+)"\)', (WEB / "app.js").read_text()))
    assert wanted and wanted - ids == set()
