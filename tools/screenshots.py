"""make screenshots: docs/screenshots/grid-light.png, grid-dark.png and grid-phone.png, the lab's
page (`/` of `gpuwatch serve`) in Debian's Chromium over the demo's fleet.

The fleet is the demo's (tools/demo.py: its nodes, its booking of frank's and the booking its
`gpuwatch reserve` example makes, its basic-auth users through its web config; its MIG node's
slices are cells in the group of their GPU), started with tools.localstack as the demo starts
it, on 127.0.0.1 only; the viewer is alice, who runs jobs on the workstation and the server.
Rules run every second with no idle duration, so every state shows at once, and alice claims
a GPU as `gpuwatch run` would, so the claimed state shows too. Playwright drives
/usr/bin/chromium headless (it never downloads a browser). The light screenshot has the detail
of a GPU that two people share open, the phone's shows the MIG node; every process started
here is stopped at the end.

    python -m tools.screenshots [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, sync_playwright

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.contract import states
from gpuwatch.contract.thresholds import IDLE_DURATION
from gpuwatch.fleet import read_fleet
from gpuwatch.fleet.prometheus import Prometheus, PrometheusError
from gpuwatch.sim import load_scenario
from tools import demo, localstack

PROG = "screenshots"
CHROMIUM = "/usr/bin/chromium"
OUT = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
VIEWER = "alice"
MIG_HOST = next(host for host, scenario in demo.NODES if scenario == "mig")
"""What the phone's screenshot shows: the MIG node, its slices in the groups of their GPUs."""
SHARED = ("ws-01", 1)
"""The GPU whose detail the light screenshot shows: alice and bob share it (workstation)."""
OVERRIDES = dataclasses.replace(demo.OVERRIDES, scrape_interval="1s", evaluation_interval="1s",
                                refresh_interval="1s", thresholds={IDLE_DURATION: 0})
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DEADLINE = 90.0


class ScreenshotError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__
                                else None)
    p.add_argument("--out", type=Path, default=OUT,
                   help="where the PNG files go (default docs/screenshots of this checkout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        localstack.prometheus_binary()
        if not Path(CHROMIUM).is_file():
            raise ScreenshotError(f"{CHROMIUM} is missing: run scripts/ensure-chromium "
                                  "(Debian's chromium package)")
        with tempfile.TemporaryDirectory(prefix="gpuwatch-screenshots-") as tmp, \
                ExitStack() as stack:
            url, password = start_fleet(stack, Path(tmp))
            args.out.mkdir(parents=True, exist_ok=True)
            for path in take(url, password, args.out):
                print(f"wrote {path}")
    except (ScreenshotError, localstack.LocalStackError, PrometheusError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


def start_fleet(stack: ExitStack, workdir: Path) -> tuple[str, str]:
    """The demo's fleet (exporters, gpuwatch serve, Prometheus) in `workdir`, stopped by
    `stack`; the service's URL and the viewer's password, once Prometheus shows every state."""
    (workdir / "targets").mkdir(parents=True)
    groups = []
    for host, scenario in demo.NODES:
        port = localstack.free_port()
        exporter = localstack.exporter(scenario, port, workdir / f"exporter-{host}.log")
        stack.callback(exporter.stop)
        exporter.start()
        groups.append({"targets": [f"{localstack.LOCALHOST}:{port}"],
                       "labels": {"host": host}})
    localstack.write_targets(workdir / "targets" / "nodes.yml", groups)
    booking_file = workdir / "reservations.yml"
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    host, gpus, user, comment = demo.BOOKED
    reservations.add(booking_file, reservations.Reservation(
        host=host, gpus=tuple(Cell(g) if isinstance(g, int) else g for g in gpus), user=user,
        start=now, until=now + dt.timedelta(days=3),
        comment=comment), now)
    prometheus_port = localstack.free_port()
    prometheus_url = f"http://{localstack.LOCALHOST}:{prometheus_port}"
    password_file, scraper_password_file = demo._web_users(workdir, VIEWER)
    service_port = localstack.free_port()
    service = localstack.reservations_service(
        booking_file, service_port, workdir / "serve.log", prometheus_url,
        web_config=workdir / "web-config.yml")
    stack.callback(service.stop)
    service.start()
    config = localstack.render_config(workdir / "prometheus", workdir / "targets", OVERRIDES,
                                      reservations=f"{localstack.LOCALHOST}:{service_port}")
    localstack.scrape_with_basic_auth(config, states.RESERVATIONS_JOB, demo.SCRAPER,
                                      scraper_password_file)
    prometheus = localstack.prometheus(config, workdir / "data", prometheus_port,
                                       workdir / "prometheus.log")
    stack.callback(prometheus.stop)
    prometheus.start()
    url = f"http://{localstack.LOCALHOST}:{service_port}"
    password = password_file.read_text()
    api = Prometheus(prometheus_url)
    every = sum(cells(scenario) for _, scenario in demo.NODES)
    wait("every node's cells in Prometheus", lambda: len(read_fleet(api)) >= every)
    target, until, why = demo.TRY
    try_host, try_gpu = target.split(":")
    ask(url, password, "POST", "/api/v1/reservations",
        {"host": try_host, "gpus": [int(try_gpu)], "until": until, "comment": why})
    ask(url, password, "POST", "/api/v1/claims", {"count": 1, "host": demo.RUN_HOST,
                                                  "minutes": 60})
    wait("every state in the grid", lambda: {g.state for g in read_fleet(api)} >=
         {s.name for s in states.ALL})
    return url, password


def ask(url: str, password: str, method: str, path: str, body: dict[str, Any]) -> Any:
    token = base64.b64encode(f"{VIEWER}:{password}".encode()).decode()
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as e:
        raise ScreenshotError(f"{method} {path}: HTTP {e.code} {e.read()[:200]!r}") from None


def wait(what: str, done: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise ScreenshotError(f"{what}: not within {DEADLINE:g} s")
        time.sleep(0.25)


def take(url: str, password: str, out: Path) -> list[Path]:
    """The three screenshots; their paths."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            light = shoot(browser, url, password, out / "grid-light.png", "light", DESKTOP,
                          detail=True)
            dark = shoot(browser, url, password, out / "grid-dark.png", "dark", DESKTOP)
            phone = shoot(browser, url, password, out / "grid-phone.png", "light", PHONE,
                          is_mobile=True, has_touch=True, device_scale_factor=2)
        finally:
            browser.close()
    return [light, dark, phone]


def shoot(browser: Browser, url: str, password: str, path: Path, scheme: str,
          viewport: dict[str, int], detail: bool = False, **context: Any) -> Path:
    ctx = browser.new_context(http_credentials={"username": VIEWER, "password": password},
                              color_scheme=scheme, viewport=viewport,  # type: ignore[arg-type]
                              timezone_id="UTC", locale="en-GB", **context)
    try:
        page = ctx.new_page()
        page.goto(url)
        every = sum(cells(scenario) for _, scenario in demo.NODES)
        page.wait_for_function(
            "n => document.querySelectorAll('#grid .cell').length >= n"
            " && !document.querySelector('#grid .cell.stale')"
            " && document.querySelector('#bookings tbody tr[data-id]')", arg=every,
            timeout=DEADLINE * 1000)
        if detail:
            show_detail(page)
        if context.get("is_mobile"):  # the phone's screen: the MIG node's slices
            page.evaluate("host => document.querySelector(`section.host[data-host=\"${host}\"]`)"
                          ".scrollIntoView({block: 'start'})", MIG_HOST)
        page.screenshot(path=str(path), full_page=not context.get("is_mobile"))
    finally:
        ctx.close()
    return path


def show_detail(page: Page) -> None:
    host, gpu = SHARED
    page.locator(f'#grid .cell[data-host="{host}"][data-gpu="{gpu}"]').hover()
    page.wait_for_function("() => !document.getElementById('detail').hidden")


def demo_gpus(scenario: str) -> list[Any]:
    return list(load_scenario(scenario).gpus)


def cells(scenario: str) -> int:
    """The cells of a scenario's grid at its start: a whole GPU each, and each slice there
    from the start of a MIG-enabled GPU (not the GPU itself)."""
    return sum(len([m for m in gpu.mig if m.created_after_seconds <= 0 and
                    (m.gone_after_seconds is None or m.gone_after_seconds > 0)]) or 1
               if gpu.mig else 1 for gpu in demo_gpus(scenario))


if __name__ == "__main__":
    sys.exit(main())
