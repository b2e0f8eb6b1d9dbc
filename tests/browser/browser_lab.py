"""What the browser tests share (conftest.py has the fixtures): the lab the page is tested
over and what its grid should show (Lab.expected(): every cell, whole GPUs and MIG slices,
as the harness's oracle has them), a service fed a fixed fleet of MIG slices (FedLab), pages
whose console errors, uncaught errors and requests to another origin fail the test, waiting
on the page's render counter (document.body.dataset.rendered) instead of sleeping, and
axe-core in the page."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from playwright.sync_api import Browser, ConsoleMessage, Page, Request
from prom_harness import DEADLINE, ExpectedCell, Fleet, Node

from gpuwatch.cells import Cell
from gpuwatch.exporter.collectors.gpu import display_name
from gpuwatch.fleet import ActiveReservation, GpuProcess, GpuStatus

T = TypeVar("T")

AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"

ADMIN = "ops"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", ADMIN: "ops-pw-3"}
"""The basic-auth users of the lab's service (ADMIN is in its --admins)."""

LAB_NODES = (
    Node("ws-01", "workstation", {"cluster": "lab"}),  # alice; alice and bob; bob; free
    Node("srv-01", "server", {"cluster": "dc"}),  # erin idle-held, free 4, 5; 7 booked
    Node("a100-01", "lost-gpu", {"cluster": "dc"}),  # GPU 1 lost (down)
    Node("old-01", "workstation", {"cluster": "lab"}),  # its exporter is stopped: all down
    Node("mig-01", "mig", {"cluster": "dc"}),  # GPU 0: 7 slices, GPU 1: 3, GPU 2 whole
)
STOPPED = "old-01"
MIG_HOST = "mig-01"
GRAFANA = "http://127.0.0.1:3000/grafana"
"""The anonymous service's --web.grafana-url (never asked: the page only links to it)."""
BOOKED = ("srv-01", 7, "frank", "camera-ready")
"""The booking the lab starts with: host, GPU, user, comment."""


def booked_cells(gpus: Any) -> tuple[Cell, ...] | None:
    """The cells of a booking's or a claim's gpus (Cells, indices or "0/7"; None: all)."""
    if gpus is None:
        return None
    return tuple(g if isinstance(g, Cell) else Cell.from_json(g) for g in gpus)


@dataclass
class Lab:
    fleet: Fleet
    anonymous_url: str
    """A second `gpuwatch serve` over the same Prometheus: nobody signs in there,
    --web.public-names=false hides the names, and each host links to Grafana (GRAFANA)."""

    @property
    def url(self) -> str:
        return self.fleet.service_url

    def wait_for(self, what: str, probe: Callable[[], T], ok: Callable[[T], bool]) -> T:
        return self.fleet.wait_for(what, probe, ok)

    def expected(self, at: float | None = None) -> dict[tuple[str, str], ExpectedCell]:
        """Every cell the grid should show at `at` (now) (the harness's oracle,
        Fleet.expected_cells), by (host, cell text) as the page writes them ("0", "0/7")."""
        return {(host, str(cell)): e for (host, cell), e in self.fleet.expected_cells(at).items()}


# -- pages ---------------------------------------------------------------------------------

@dataclass
class Pages:
    """Opens pages of a service, one browser context each, and fails the test on a console
    error, an uncaught error or a request to another origin in any of them."""

    browser: Browser
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)
    _contexts: list[Any] = field(default_factory=list)

    def open(self, url: str, user: str | None = None, *, path: str = "/",
             color_scheme: str = "light", viewport: Mapping[str, int] | None = None,
             rendered: bool = True, **context: Any) -> Page:
        """A page of `url` (the service) signed in as `user` (None: nobody), rendered once
        (unless `rendered` is False: loaded)."""
        origin = url.rstrip("/")
        ctx = self.browser.new_context(
            base_url=origin,
            http_credentials=({"username": user, "password": PASSWORDS[user]}
                              if user else None),
            color_scheme=color_scheme,  # type: ignore[arg-type]
            viewport=dict(viewport or {"width": 1280, "height": 900}),  # type: ignore[arg-type]
            timezone_id="UTC", locale="en-GB", **context)
        self._contexts.append(ctx)
        page = ctx.new_page()
        page.on("console", lambda m: self._console(origin, m))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught error: {e}"))
        page.on("request", lambda r: self._request(origin, r))
        page.on("dialog", lambda d: d.accept())  # a confirm() before a release, say
        page.goto(origin + path)
        if rendered:
            wait_rendered(page)
        return page

    def allow(self, pattern: str) -> None:
        """Console errors matching `pattern` are expected in this test (a 503 while
        Prometheus is stopped, say)."""
        self.allowed.append(re.compile(pattern))

    def _console(self, origin: str, message: ConsoleMessage) -> None:
        if message.type == "error" and not any(p.search(message.text) for p in self.allowed):
            self.problems.append(f"console error on {origin}: {message.text} "
                                 f"({message.location.get('url', '')})")

    def _request(self, origin: str, request: Request) -> None:
        self.requests.append(request.url)
        if not (request.url == origin or request.url.startswith(origin + "/")
                or request.url.startswith("data:")):
            self.problems.append(f"a request to another origin than {origin}: {request.url}")

    def close(self) -> None:
        for ctx in self._contexts:
            ctx.close()
        self._contexts.clear()


# -- waiting on the page ---------------------------------------------------------------------

def rendered(page: Page) -> int:
    """How many times the page has rendered the grid (0: not yet)."""
    count: int = page.evaluate("() => Number(document.body.dataset.rendered || 0)")
    return count


def wait_rendered(page: Page, after: int = 0) -> int:
    """Waits until the page has rendered more than `after` times; the new count."""
    page.wait_for_function("n => Number(document.body.dataset.rendered || 0) > n", arg=after,
                           timeout=DEADLINE * 1000)
    return rendered(page)


def wait_page(page: Page, what: str, probe: Callable[[], T], ok: Callable[[T], bool]) -> T:
    """probe() after each render until ok(value), at most DEADLINE seconds; AssertionError
    with the last value otherwise."""
    deadline = time.monotonic() + DEADLINE
    while True:
        count = rendered(page)
        value = probe()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE:g} s; last {value!r}"
        wait_rendered(page, count)


def axe_violations(page: Page, source: str) -> list[str]:
    """axe-core's violations in the page, one line each (rule, impact, what, where).

    axe goes in through DevTools' evaluate, which the page's Content-Security-Policy does not
    govern; page.add_script_tag would inline it as a <script> element, which that policy
    (script-src 'self', no inline script) rightly refuses, and bypass_csp would run the whole
    page without the policy the tests also check."""
    page.evaluate(source)
    found: list[dict[str, Any]] = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' ') + ': ' + n.failureSummary)}))")
    return [f"{v['id']} ({v['impact']}): {v['help']}: {'; '.join(v['nodes'][:5])}"
            for v in found]


# -- a service fed a fixed fleet of MIG slices -------------------------------------------------

GIB = 1024 ** 3
FED_HOST = "dgx-01"
FED_MODELS = {0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA A100-SXM4-80GB", 2: "NVIDIA H100 80GB HBM3"}
FED_TEMPERATURES = {0: 47.0, 1: 35.0, 2: 52.0}
FED_CELLS: tuple[tuple[str, str | None, str, tuple[str, ...], float], ...] = (
    # cell, profile, state, users (each with a process), GiB used
    ("0/7", "1g.10gb", "busy", ("alice",), 6.0),
    ("0/8", "1g.10gb", "busy", ("bob", "carol"), 8.5),
    ("0/9", "1g.10gb", "idle", ("erin",), 3.0),
    ("0/10", "1g.10gb", "reserved", (), 0.0),
    ("0/11", "1g.10gb", "free", (), 0.0),
    ("0/12", "1g.10gb", "free", (), 0.0),
    ("0/13", "1g.10gb", "free", (), 0.0),
    ("1", None, "free", (), 0.0),
    ("2/1", "3g.40gb", "busy", ("ivan",), 30.0),
    ("2/5", "2g.20gb", "free", (), 0.0),
    ("2/9", "1g.10gb", "down", (), 0.0),
)
"""The fed fleet's one host: GPU 0 an A100 in seven 1g.10gb slices, GPU 1 a whole A100, GPU 2
an H100 in three slices of three profiles, one of them down."""
FED_BOOKED = ("0/10", "frank", "camera-ready")


def fed_fleet(now: float) -> list[GpuStatus]:
    """The cells of FED_CELLS as gpuwatch.fleet reads them from Prometheus (the service's
    /api/v1/fleet writes them as for a real fleet)."""
    out = []
    for n, (text, profile, state, users, used) in enumerate(FED_CELLS):
        cell = Cell.parse(text)
        model = FED_MODELS[cell.gpu]
        total = (int(profile.split("g.")[1].removesuffix("gb")) if profile else 80) * GIB
        booked = FED_BOOKED[0] == text
        out.append(GpuStatus(
            host=FED_HOST, instance=f"{FED_HOST}:9839", gpu=cell.gpu,
            uuid=f"GPU-{cell.gpu:08d}-0000-4000-8000-000000000000", state=state,
            users=users, model=model,
            display_name=display_name(model, {}) + (f" {profile}" if profile else ""),
            memory_used_bytes=None if state == "down" else used * GIB + 300 * 2 ** 20,
            memory_total_bytes=float(total),
            utilization_ratio=None if profile or state == "down" else 0.0,
            inactive_since=now - 600 if state == "idle" else None,
            reservation=ActiveReservation(FED_BOOKED[1], "2027-01-16T08:00:00+00:00",
                                          now + 86400, FED_BOOKED[2]) if booked else None,
            temperature_celsius=FED_TEMPERATURES[cell.gpu],
            processes=tuple(GpuProcess(pid=4000 + 10 * n + i, user=u,
                                       command=f"python {u}-job.py", memory_bytes=used * GIB
                                       / len(users), start_time=now - 3600)
                            for i, u in enumerate(users)),
            cluster="dc", updated=now, gpu_instance_id=cell.instance,
            profile=profile,
            mig_uuid=None if profile is None else
            f"MIG-{cell.gpu:04d}{cell.instance:04d}-1111-4222-8333-{n:012d}"))
    return out


@dataclass
class FedLab:
    """`gpuwatch serve` in this process over fed_fleet() instead of Prometheus, with the lab's
    basic-auth users: every answer is as fresh as the moment, unless `age` (seconds) makes it
    old. Booking through it is real (its reservations file)."""

    url: str
    reservations_file: Path
    age: float = 0.0
    posted: list[Any] = field(default_factory=list)
    """The bodies the pages POSTed to /api/v1/reservations (watch_posts)."""

    def gpus(self) -> list[GpuStatus]:
        return fed_fleet(time.time() - self.age)

    def by_cell(self) -> dict[str, GpuStatus]:
        return {str(g.cell): g for g in self.gpus()}

    def watch_posts(self, page: Page) -> None:
        """Keeps the JSON body of every booking `page` asks for in `posted`."""
        page.on("request", lambda r: self.posted.append(r.post_data_json) if (
            r.method == "POST" and r.url.endswith("/api/v1/reservations")) else None)
