"""The lab's page in a real browser: Debian's Chromium (/usr/bin/chromium, headless) driven by
Playwright, which never downloads a browser of its own, over a simulated fleet, a real
Prometheus and `gpuwatch serve` on 127.0.0.1 (tests/prom_harness.py).

- `lab` (one a module): the fleet of LAB_NODES (free GPUs, GPUs busy with one and with two
  users, one idle-held, one booked, a lost GPU, a node whose exporter is stopped, so all
  its GPUs are down, and a MIG node whose slices are the cells of its MIG-enabled GPUs)
  behind a service with basic-auth users alice, bob and the admin ADMIN; beside it a second
  `gpuwatch serve` over the same Prometheus without any identity, with
  --web.public-names=false and a Grafana URL.
- `fed` (one a module): `gpuwatch serve` in this process over a fixed fleet of MIG slices
  (browser_lab.FedLab: no Prometheus, fresh or as old as a test makes it) with the same
  users.
- `browser` (one a session), `pages` (per test): a page per identity, theme and screen, whose
  console errors, uncaught errors and requests to any other origin fail the test
  (browser_lab.Pages; waiting on the page's render counter and axe-core: browser_lab).
- `chromium` (tests/conftest.py): Debian's Chromium, an apt program; `axe_source`: axe-core
  (tests/browser/package-lock.json, `npm ci` by the Makefile).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from browser_lab import (
    ADMIN,
    AXE,
    BOOKED,
    GRAFANA,
    LAB_NODES,
    PASSWORDS,
    STOPPED,
    FedLab,
    Lab,
    Pages,
)
from playwright.sync_api import Browser, sync_playwright
from prom_harness import Fleet, serve, write_web_config

from gpuwatch.cells import Cell
from gpuwatch.contract import states
from gpuwatch.contract.thresholds import IDLE_DURATION
from gpuwatch.reservations import Reservation
from gpuwatch.serve.app import build
from gpuwatch.serve.options import ServeOptions
from tools import localstack


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    if not AXE.is_file():
        pytest.fail(f"{AXE} is missing: `make test` installs it (cd tests/browser && npm ci)")
    return AXE.read_text()


def lab_reservations() -> list[Reservation]:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    host, gpu, user, comment = BOOKED
    return [Reservation(host, (Cell(gpu),), user, now + dt.timedelta(days=2),
                        comment=comment)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # The idle duration is 0 so erin's held-but-unused GPU is idle at once.
    workdir = tmp_path_factory.mktemp("lab")
    with Fleet(workdir, LAB_NODES, thresholds={IDLE_DURATION: 0},
               reservations=lab_reservations(), web_users=PASSWORDS,
               admins=(ADMIN,)) as fleet:
        lab = Lab(fleet, "")
        fleet.wait_for_rules()
        fleet.node(STOPPED).stop()
        fleet.wait_for(f"{STOPPED}'s GPUs down", lambda: {
            s.labels.get("state") for s in fleet.api.query(
                f'{states.STATE_INFO}{{host="{STOPPED}"}}')}, lambda found: found == {"down"})
        host, gpu, _, _ = BOOKED
        fleet.wait_for("the booking in the grid", lambda: [
            s.labels.get("state") for s in fleet.api.query(
                f'{states.STATE_INFO}{{host="{host}",gpu="{gpu}"}}')],
            lambda found: found == [states.RESERVED.name])
        port = localstack.free_port()
        anonymous = serve(workdir / "anonymous-reservations.yml", port, fleet.url,
                          workdir / "anonymous-serve.log", flags=["--web.public-names=false",
                                 f"--web.grafana-url={GRAFANA}"])
        anonymous.start()
        try:
            lab.anonymous_url = f"http://{localstack.LOCALHOST}:{port}"
            yield lab
        finally:
            anonymous.stop()


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FedLab]:
    workdir = tmp_path_factory.mktemp("fed")
    config = workdir / "web-config.yml"
    write_web_config(config, PASSWORDS)
    options = ServeOptions(reservations_file=workdir / "reservations.yml",
                           listen_address=f"{localstack.LOCALHOST}:0", web_config_file=config,
                           admins=frozenset({ADMIN}), own_process_metrics=False,
                           claim_poll_seconds=3600, refresh_seconds=1.0)
    holder: list[FedLab] = []
    serving = build(options, fleet=lambda: holder[0].gpus())
    holder.append(FedLab(serving.url, options.reservations_file))
    serving.start()
    try:
        yield holder[0]
    finally:
        serving.stop()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Pages]:
    opened = Pages(browser)
    try:
        yield opened
    finally:
        opened.close()
    assert opened.problems == [], "the page went wrong:\n" + "\n".join(opened.problems)
