"""What the browser tests share (conftest.py has the fixtures): the lab the page is tested
over, pages whose console errors, uncaught errors and requests to another origin fail the
test, waiting on the page's render counter (document.body.dataset.rendered) instead of
sleeping, and axe-core in the page."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from playwright.sync_api import Browser, ConsoleMessage, Page, Request
from prom_harness import DEADLINE, Fleet, Node

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
)
STOPPED = "old-01"
GRAFANA = "http://127.0.0.1:3000/grafana"
"""The anonymous service's --web.grafana-url (never asked: the page only links to it)."""
BOOKED = ("srv-01", 7, "frank", "camera-ready")
"""The booking the lab starts with: host, GPU, user, comment."""


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
