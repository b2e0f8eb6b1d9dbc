"""The lab's page (`/` of `gpuwatch serve`) in headless Chromium over the simulated lab of
conftest.py: every GPU's cell as the harness's oracle says (state in words, the state's colour
from gpuwatch.contract.states, users), the detail on hover and on keyboard focus, bookings made
in the page reaching the reservations file, `gpuwatch status` and /metrics, owner-only release,
filters and counts, the phone layout, both themes, axe-core, the Content-Security-Policy, no
request to another host, the names hidden from people without an identity, and last the
banner when Prometheus is stopped (no GPU shown free then).

MIG: the lab's MIG node shows each slice as a cell inside the group of its GPU (which is no
cell, has no state and is never free), in the oracle's states, with its detail, and a slice is
booked, extended and released in the page; over a service fed a fixed fleet of slices (`fed`:
no Prometheus) the counts, filters, "yours", the detail, the keyboard, the booking's body and
old data take slices as cells.

Every test fails on a console error or an uncaught error of the page (the `pages` fixture).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import urllib.request
from collections import Counter
from typing import Any

import pytest
from browser_lab import (
    ADMIN,
    BOOKED,
    FED_BOOKED,
    FED_HOST,
    FED_MODELS,
    GRAFANA,
    LAB_NODES,
    MIG_HOST,
    PASSWORDS,
    STOPPED,
    ExpectedCell,
    FedLab,
    Lab,
    Pages,
    axe_violations,
    booked_cells,
    rendered,
    wait_page,
    wait_rendered,
)
from cli_run import run
from playwright.sync_api import Page
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch.cells import Cell
from gpuwatch.contract import metrics, states
from gpuwatch.exporter.collectors.gpu import display_name
from gpuwatch.serve.web import PALETTE

PHONE = {"width": 390, "height": 844}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
CSP_DIRECTIVES = ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                  "img-src 'self' data:", "connect-src 'self'", "form-action 'self'",
                  "frame-ancestors 'none'", "base-uri 'none'")

CELLS_JS = """() => [...document.querySelectorAll('#grid .cell')].map(c => ({
    host: c.dataset.host, gpu: c.dataset.gpu, state: c.dataset.state,
    group: c.closest('.mig') ? c.closest('.mig').dataset.parent : null,
    section: c.closest('section.host') ? c.closest('section.host').dataset.host : null,
    classes: [...c.classList], text: c.innerText, tabindex: c.getAttribute('tabindex'),
    role: c.getAttribute('role'),
    users: c.querySelector('.users') ? c.querySelector('.users').innerText : '',
    background: getComputedStyle(c).backgroundColor, visible: c.checkVisibility(),
    right: c.getBoundingClientRect().right}))"""
COLOUR_JS = """name => { const probe = document.createElement('div');
    probe.style.backgroundColor = name; document.body.append(probe);
    const colour = getComputedStyle(probe).backgroundColor; probe.remove(); return colour }"""


GROUPS_JS = """() => [...document.querySelectorAll('#grid .mig')].map(m => ({
    host: m.closest('section.host').dataset.host, parent: m.dataset.parent,
    role: m.getAttribute('role'), label: m.getAttribute('aria-label'),
    head: m.querySelector('.mig-head').innerText, classes: [...m.classList],
    tabindex: m.getAttribute('tabindex'), visible: m.checkVisibility(),
    cells: [...m.querySelectorAll('.cell')].map(c => c.dataset.gpu)}))"""

Key = tuple[str, str]
"""(host, cell) as the page writes a cell: "0", or "0/7" for a MIG slice."""


def cells(page: Page) -> dict[Key, dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate(CELLS_JS)
    return {(c["host"], c["gpu"]): c for c in found}


def groups(page: Page) -> dict[tuple[str, str], dict[str, Any]]:
    """The groups of MIG-enabled GPUs in the grid by (host, the GPU's index)."""
    found: list[dict[str, Any]] = page.evaluate(GROUPS_JS)
    return {(g["host"], g["parent"]): g for g in found}


def states_shown(page: Page) -> dict[Key, str]:
    return {key: c["state"] for key, c in cells(page).items()}


def oracle_states(lab: Lab) -> dict[Key, str]:
    return {key: e.state for key, e in lab.expected().items()}


def wait_for_grid(page: Page, lab: Lab) -> dict[Key, ExpectedCell]:
    """Waits until the page shows every cell of the fleet (whole GPUs and MIG slices) in the
    oracle's state; the oracle."""
    wait_page(page, "the grid in the oracle's states", lambda: (states_shown(page),
                                                               oracle_states(lab)),
              lambda both: both[0] == both[1])
    return lab.expected()


def cell_of(g: dict[str, Any]) -> str:
    """The cell of a GPU object of the API's JSON: "0", or "0/7" for a slice."""
    return str(Cell(g["gpu"], g.get("gpu_instance_id")))


def cells_text(gpus: Any) -> tuple[str, ...] | None:
    """A booking's cells as text ("0", "0/7"), None for every GPU."""
    found = booked_cells(gpus)
    return None if found is None else tuple(str(c) for c in found)


def everyone(lab: Lab) -> set[str]:
    """Every person the lab's scenarios and bookings name."""
    names = {p.user for p in lab.fleet.expected_processes()}
    return names | {r.user for r in lab.fleet.active_reservations()} | set(PASSWORDS)


def colour(page: Page, state: states.State) -> str:
    """The computed CSS colour of a state: its colour name of gpuwatch.contract.states in the
    page's palette (Grafana's shade of that name), as this browser resolves it."""
    resolved: str = page.evaluate(COLOUR_JS, PALETTE[state.colour])
    return resolved


def detail(page: Page) -> dict[str, Any]:
    shown: dict[str, Any] = page.evaluate("""() => { const d = document.getElementById('detail');
        return {visible: d.checkVisibility(), text: d.innerText, role: d.getAttribute('role')} }""")
    return shown


def cell(page: Page, host: str, gpu: str) -> Any:
    return page.locator(f'#grid .cell[data-host="{host}"][data-gpu="{gpu}"]')


def service_json(page: Page, path: str) -> Any:
    """GET `path` of the page's service as the page's own user (its browser context)."""
    answer = page.request.get(path)
    assert answer.ok, (path, answer.status, answer.text())
    return answer.json()


def free_gpu(lab: Lab, page: Page, host: str, slices: bool = False) -> str:
    """A free cell of `host` that the page shows free: a whole GPU (a MIG slice with
    `slices`)."""
    expected = wait_for_grid(page, lab)
    free = sorted((str(e.cell) for e in expected.values() if e.host == host and
                   e.state == states.FREE.name and (e.profile is not None) == slices),
                  key=lambda text: Cell.parse(text).sort_key())
    assert free, f"no free GPU on {host}: {expected}"
    return free[0]


def until_text(hours: float) -> str:
    """A datetime-local value `hours` from now (the pages run in UTC)."""
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours)
    return when.strftime("%Y-%m-%dT%H:%M")


# -- the grid ----------------------------------------------------------------------------------

def test_the_lab_covers_every_state_a_shared_gpu_a_dead_node_and_mig_slices(lab: Lab) -> None:
    expected = lab.expected().values()
    assert {e.state for e in expected} >= {states.FREE.name, states.BUSY.name,
                                            states.IDLE.name, states.RESERVED.name,
                                            states.DOWN.name}
    assert any(len(e.users) >= 2 for e in expected if e.state == states.BUSY.name)
    assert {e.state for e in expected if e.host == STOPPED} == {states.DOWN.name}
    slices = [e for e in expected if e.profile]
    assert {e.state for e in slices} >= {states.FREE.name, states.BUSY.name}
    assert len({e.cell.gpu for e in slices}) >= 2 and any(
        not e.profile for e in expected if e.host == MIG_HOST)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_gpu_has_a_cell_with_its_state_in_words_colour_and_users(
        lab: Lab, pages: Pages, scheme: str) -> None:
    page = pages.open(lab.url, "alice", color_scheme=scheme)
    expected = wait_for_grid(page, lab)
    shown = cells(page)
    assert sorted(shown) == sorted(expected)
    people = everyone(lab)
    for key, e in expected.items():
        c, where = shown[key], f"{e.host} GPU {e.cell}"
        state = states.BY_NAME[e.state]
        assert f"state-{state.name}" in c["classes"], (where, c["classes"])
        assert re.search(rf"\b{state.name}\b", c["text"], re.IGNORECASE), (where, c["text"])
        assert c["background"] == colour(page, state), (where, state, c["background"])
        assert c["tabindex"] == "0", where
        named = set(NAME.findall(c["users"])) & people
        booked = {r for r in (e.reservation and e.reservation.split()[0],
                              e.claim) if r}
        assert set(e.users) <= named <= set(e.users) | booked, (where, c["users"], e.users)
        mine = "alice" in e.users or (e.reservation or "").startswith("alice ")
        assert ("mine" in c["classes"]) == mine, (where, c["classes"])
    sections = page.evaluate("""() => [...document.querySelectorAll('#grid section.host')]
        .map(s => [s.dataset.host, s.classList.contains('host-down'),
                   (s.querySelector('h1,h2,h3,h4') || {innerText: ''}).innerText])""")
    assert sorted(h for h, _, _ in sections) == sorted({e.host for e in expected.values()})
    for host, down, heading in sections:
        assert down == (host == STOPPED), (host, down)
        assert host in heading, (host, heading)


def test_the_legend_names_every_state_with_its_colour(lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    legend = page.locator("#legend").inner_text()
    for state in states.ALL:
        assert re.search(rf"\b{state.name}\b", legend, re.IGNORECASE), (state, legend)
    backgrounds = page.evaluate("""() => [...document.querySelectorAll('#legend *')]
        .map(e => getComputedStyle(e).backgroundColor)""")
    for state in states.ALL:
        assert colour(page, state) in backgrounds, state


def test_hovering_a_cell_shows_its_detail_and_leaving_hides_it(lab: Lab,
                                                               pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    expected = wait_for_grid(page, lab)
    shared = next(e for e in expected.values() if len(e.users) >= 2 and not e.profile)
    processes = [p for p in lab.fleet.expected_processes()
                 if (p.host, p.cell) == (shared.host, shared.cell)]
    assert not detail(page)["visible"]
    cell(page, shared.host, str(shared.cell)).hover()
    page.wait_for_function("() => document.getElementById('detail').checkVisibility()")
    shown = detail(page)
    assert shown["role"] == "tooltip"
    text = shown["text"]
    assert display_name(shared.model, {}) in text, text
    for user in shared.users:
        assert user in text, (user, text)
    for p in processes:
        assert p.command in text, (p, text)
    assert re.search(r"\d+(\.\d+)?\s*°?\s*C\b", text), f"no temperature in {text!r}"
    page.mouse.move(1, 1)
    page.wait_for_function("() => !document.getElementById('detail').checkVisibility()")


def test_keyboard_focus_shows_the_detail_enter_books_and_escape_closes(lab: Lab,
                                                                      pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    expected = wait_for_grid(page, lab)
    for _ in range(200):  # Tab reaches the cells, in the page's order
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.matches('#grid .cell')"):
            break
    else:
        pytest.fail("Tab never reached a cell of the grid")
    page.wait_for_function("() => document.getElementById('detail').checkVisibility()")
    host, gpu = page.evaluate("() => [document.activeElement.dataset.host, "
                              "document.activeElement.dataset.gpu]")
    model = expected[host, gpu].model
    assert not model or display_name(model, {}) in detail(page)["text"], detail(page)
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('detail').checkVisibility()")
    host = next(e.host for e in expected.values() if e.state == states.FREE.name)
    gpu = free_gpu(lab, page, host)
    cell(page, host, gpu).focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#book-dialog[open]")
    assert host in page.locator("#book-host").evaluate(
        "e => e.value || e.innerText"), "the dialog names another host"
    page.keyboard.press("Escape")
    page.wait_for_selector("#book-dialog[open]", state="detached")
    assert not [r for r in lab.fleet.active_reservations()
                if (r.host, cells_text(r.gpus)) == (host, (gpu,))]


def test_counts_of_free_gpus_per_model_and_the_filters(lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    expected = wait_for_grid(page, lab)
    names = {(g["host"], cell_of(g)): g["display_name"] or g["model"]
             for g in service_json(page, "/api/v1/fleet")["gpus"]}
    free = Counter(names[key] for key, e in expected.items() if e.state == states.FREE.name)
    summary = page.locator("#summary").inner_text()
    for model, count in free.items():
        assert re.search(rf"\b{count}\s*[x\u00d7]\s*{re.escape(model)} free", summary), \
            (model, count, summary)

    def visible() -> set[Key]:
        return {key for key, c in cells(page).items() if c["visible"]}

    page.locator("#only-free").check()
    wanted = {key for key, e in expected.items() if e.state == states.FREE.name}
    wait_page(page, "only the free cells", visible, lambda shown: shown == wanted)
    page.locator("#only-free").uncheck()
    page.locator("#search").fill("bob")
    wanted = {key for key, e in expected.items() if "bob" in e.users}
    wait_page(page, "only bob's cells", visible, lambda shown: shown == wanted)
    page.locator("#search").fill("")
    wait_page(page, "every cell again", visible, lambda shown: shown == set(expected))
    clusters = {n.host: n.labels["cluster"] for n in LAB_NODES}
    page.locator("#filter-cluster").select_option("lab")
    wanted = {key for key in expected if clusters[key[0]] == "lab"}
    wait_page(page, "the cells of cluster lab", visible, lambda shown: shown == wanted)
    page.locator("#filter-cluster").select_option("")
    page.locator("#filter-state").select_option(states.IDLE.name)
    wanted = {key for key, e in expected.items() if e.state == states.IDLE.name}
    wait_page(page, "the idle cells", visible, lambda shown: shown == wanted)
    page.locator("#filter-state").select_option("")
    model = names["ws-01", "0"]
    page.locator("#filter-model").select_option(model)
    wanted = {key for key in expected if names[key] == model}
    wait_page(page, f"the {model} cells", visible, lambda shown: shown == wanted)


def test_the_whoami_names_the_signed_in_user(lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "bob")
    assert "bob" in page.locator("#whoami").inner_text()
    session = service_json(page, "/api/v1/session")
    assert session["user"] == "bob" and session["admin"] is False
    assert session["refresh_seconds"] == pytest.approx(lab.fleet.interval)


# -- bookings ----------------------------------------------------------------------------------

def book_in_page(page: Page, host: str, gpu: str, comment: str) -> str:
    """Books cell `gpu` of `host` (a GPU or a MIG slice) for 3 hours through the page's
    dialog; the booking's id."""
    before = set(page.locator("#bookings tr[data-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"))
    cell(page, host, gpu).click()
    page.wait_for_selector("#book-dialog[open]")
    page.locator("#book-until").fill(until_text(3))
    page.locator("#book-comment").fill(comment)
    page.locator("#book-submit").click()
    page.wait_for_selector("#book-dialog[open]", state="detached")
    page.wait_for_function("""before => [...document.querySelectorAll('#bookings tr[data-id]')]
        .some(r => !before.includes(r.dataset.id))""", arg=sorted(before))
    ids = page.locator("#bookings tr[data-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.id)")
    (new,) = set(ids) - before
    return str(new)


def status_json(lab: Lab) -> list[dict[str, Any]]:
    code, out = run("--prometheus", lab.fleet.url, "status", "--json")
    assert code == 0, out
    gpus: list[dict[str, Any]] = json.loads(out)
    return gpus


def service_metrics(lab: Lab, user: str) -> str:
    token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    request = urllib.request.Request(lab.url + "/metrics",
                                     headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        text: str = answer.read().decode()
    return text


def booked_in_metrics(lab: Lab, host: str, gpu: str) -> list[dict[str, str]]:
    return [s.labels for family in text_string_to_metric_families(service_metrics(lab, ADMIN))
            for s in family.samples if s.name == metrics.RESERVATION_END.name
            and s.labels.get("reserved_host") == host and s.labels.get("gpu") == gpu]


def test_a_booking_made_in_the_page_shows_in_status_and_metrics_and_can_be_extended(
        lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    host = "srv-01"
    gpu = free_gpu(lab, page, host)
    booking = book_in_page(page, host, gpu, "from the page")
    (stored,) = [r for r in lab.fleet.active_reservations() if r.id == booking]
    assert (stored.host, cells_text(stored.gpus), stored.user, stored.comment) == \
        (host, (gpu,), "alice", "from the page")
    assert abs(stored.until.timestamp() - (dt.datetime.now(dt.timezone.utc).timestamp()
                                           + 3 * 3600)) < 120
    labels = booked_in_metrics(lab, host, gpu)
    assert [(m["user"], m["comment"]) for m in labels] == [("alice", "from the page")]
    shown = lab.wait_for("the booking in gpuwatch status", lambda: [
        g for g in status_json(lab) if (g["host"], cell_of(g)) == (host, gpu)],
        lambda found: len(found) == 1 and found[0]["state"] == states.RESERVED.name)
    assert shown[0]["reservation"]["user"] == "alice"
    assert shown[0]["reservation"]["comment"] == "from the page"
    wait_page(page, "the booked cell reserved and mine", lambda: cells(page)[host, gpu],
              lambda c: c["state"] == states.RESERVED.name and "mine" in c["classes"])
    row = page.locator(f'#bookings tr[data-id="{booking}"]')
    assert host in row.inner_text()
    row.locator("button.extend").click()
    page.wait_for_selector("#extend-dialog[open]")
    page.locator("#extend-until").fill(until_text(6))
    page.locator("#extend-submit").click()
    page.wait_for_selector("#extend-dialog[open]", state="detached")
    extended = lab.wait_for("the booking extended", lambda: [
        r for r in lab.fleet.active_reservations()
        if r.user == "alice" and (r.host, cells_text(r.gpus)) == (host, (gpu,))],
        lambda found: len(found) == 1 and found[0].until > stored.until)
    assert abs(extended[0].until.timestamp() - (stored.until.timestamp() + 3 * 3600)) < 120


def test_only_the_owner_or_an_admin_releases_a_booking(lab: Lab, pages: Pages) -> None:
    alice = pages.open(lab.url, "alice")
    host = "srv-01"
    gpu = free_gpu(lab, alice, host)
    booking = book_in_page(alice, host, gpu, "mine, not bob's")
    bob = pages.open(lab.url, "bob")
    wait_rendered(bob, rendered(bob))
    assert bob.locator(f'#bookings tr[data-id="{booking}"] button.release').count() == 0
    refused = bob.request.delete(f"/api/v1/reservations/{booking}")
    assert refused.status == 403
    assert "alice" in refused.json()["error"]
    assert [r.id for r in lab.fleet.active_reservations()].count(booking) == 1
    admin = pages.open(lab.url, ADMIN)
    row = admin.locator(f'#bookings tr[data-id="{booking}"]')
    row.wait_for()
    assert "alice" in row.inner_text()
    frank = [r.id for r in lab.fleet.active_reservations() if r.user == BOOKED[2]]
    assert admin.locator(f'#bookings tr[data-id="{frank[0]}"]').count() == 1, \
        "an admin sees everyone's bookings"
    row.locator("button.release").click()
    row.wait_for(state="detached")
    assert booking not in [r.id for r in lab.fleet.active_reservations()]
    alice.locator(f'#bookings tr[data-id="{booking}"]').wait_for(state="detached")


def test_a_refused_booking_says_why_in_words(lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    host = "srv-01"
    gpu = free_gpu(lab, page, host)
    pages.allow(r"status of 400")  # the API's refusal, which the page shows
    cell(page, host, gpu).click()
    page.wait_for_selector("#book-dialog[open]")
    page.locator("#book-gpus").fill("99")  # no such GPU on the host
    page.locator("#book-submit").click()
    error = page.locator("#book-error")
    error.wait_for()
    page.wait_for_function("() => document.getElementById('book-error').innerText.trim()")
    assert error.get_attribute("role") == "alert"
    assert "99" in error.inner_text() and re.search(r"[a-z]{3,} [a-z]{3,}", error.inner_text(),
                                                     re.IGNORECASE), error.inner_text()
    assert not [r for r in lab.fleet.active_reservations()
                if (r.host, cells_text(r.gpus)) == (host, (gpu,))]


def test_pause_stops_the_refresh_and_old_data_shows_nothing_free(lab: Lab,
                                                                 pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    wait_for_grid(page, lab)
    pause = page.locator("#pause")
    assert pause.get_attribute("aria-pressed") == "false"
    pause.click()
    assert pause.get_attribute("aria-pressed") == "true"
    asked = len([u for u in pages.requests if "/api/v1/fleet" in u])
    banner = page.locator("#banner")
    banner.wait_for(state="visible")  # the shown data grows older than two scrape intervals
    assert not [key for key, c in cells(page).items()
                if c["state"] == states.FREE.name or "state-free" in c["classes"]]
    assert len([u for u in pages.requests if "/api/v1/fleet" in u]) == asked
    pause.click()
    assert pause.get_attribute("aria-pressed") == "false"
    banner.wait_for(state="hidden")
    wait_for_grid(page, lab)


# -- made for people ---------------------------------------------------------------------------

def test_phone_layout_has_no_horizontal_scroll(lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice", viewport=PHONE, is_mobile=True, has_touch=True,
                      device_scale_factor=2)
    wait_for_grid(page, lab)
    width = page.evaluate("() => [document.documentElement.scrollWidth, "
                          "document.documentElement.clientWidth, window.innerWidth]")
    wider = page.evaluate("""w => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > w && e.checkVisibility())
        .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + '.' + e.className + ' '
             + Math.round(e.getBoundingClientRect().right))""", PHONE["width"])
    assert width[0] <= width[1] == PHONE["width"], (width, wider)
    too_wide = [key for key, c in cells(page).items() if c["right"] > PHONE["width"]]
    assert too_wide == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_no_accessibility_violations(lab: Lab, pages: Pages, axe_source: str,
                                     scheme: str) -> None:
    page = pages.open(lab.url, "alice", color_scheme=scheme)
    wait_for_grid(page, lab)
    assert axe_violations(page, axe_source) == []


def test_the_dark_theme_follows_the_system_setting(lab: Lab, pages: Pages) -> None:
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = pages.open(lab.url, "alice", color_scheme=scheme)
        backgrounds[scheme] = page.evaluate(
            "() => getComputedStyle(document.body).backgroundColor")
    assert backgrounds["light"] != backgrounds["dark"], backgrounds


def test_strict_content_security_policy_and_no_request_elsewhere(lab: Lab,
                                                                 pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    wait_rendered(page, rendered(page))
    for path in ["/", *sorted({u.removeprefix(lab.url) for u in pages.requests
                               if u.startswith(lab.url + "/static/")})]:
        answer = page.request.get(path)
        assert answer.ok, path
        policy = [d.strip() for d in answer.headers["content-security-policy"].split(";")]
        assert set(policy) >= set(CSP_DIRECTIVES), (path, policy)
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["referrer-policy"] == "same-origin", path
    assert any("/static/" in u for u in pages.requests), pages.requests
    assert any("/api/v1/fleet" in u for u in pages.requests), pages.requests
    assert all(u.startswith(lab.url + "/") for u in pages.requests), pages.requests
    for outside in ("/static/../pyproject.toml", "/static/%2e%2e/pyproject.toml",
                    "/static/", "/static/nothing.js"):
        assert page.request.get(outside).status == 404, outside


def test_without_identity_public_names_false_hides_every_name(lab: Lab,
                                                              pages: Pages) -> None:
    page = pages.open(lab.anonymous_url)
    wait_for_grid(page, lab)
    assert "not signed in" in page.locator("#whoami").inner_text().lower()
    text = page.evaluate("() => document.body.innerText")
    hidden = everyone(lab) | {BOOKED[3]}
    assert [n for n in hidden if re.search(rf"\b{re.escape(n)}\b", text)] == []
    fleet = service_json(page, "/api/v1/fleet")
    assert fleet["names_hidden"] is True
    for g in fleet["gpus"]:
        assert g["users"] == [], g
        for p in g.get("processes") or []:
            assert not p.get("user") and not p.get("command"), p
        for key in ("reservation", "claim"):
            if g.get(key):
                assert not g[key].get("user") and not g[key].get("comment"), g
    for r in service_json(page, "/api/v1/reservations")["reservations"]:
        assert not r.get("user") and not r.get("comment"), r


def test_each_host_links_to_its_grafana_dashboard_where_configured(lab: Lab,
                                                                   pages: Pages) -> None:
    page = pages.open(lab.anonymous_url)
    expected = wait_for_grid(page, lab)
    links = dict(page.evaluate("""() => [...document.querySelectorAll('#grid section.host')]
        .map(s => [s.dataset.host, (s.querySelector('a.grafana') || {}).href || null])"""))
    assert links == {e.host: f"{GRAFANA}/d/gpuwatch-node?var-host={e.host}"
                     for e in expected.values()}
    signed_in = pages.open(lab.url, "alice")
    assert signed_in.locator("#grid a.grafana").count() == 0, "no Grafana URL, no link"


# -- MIG slices --------------------------------------------------------------------------------

def mig_detail_text(page: Page) -> str:
    page.wait_for_function("() => document.getElementById('detail').checkVisibility()")
    text: str = detail(page)["text"]
    return text


def test_the_mig_node_shows_each_slice_in_the_group_of_its_gpu_in_the_oracle_s_state(
        lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    expected = wait_for_grid(page, lab)
    node = {key: e for key, e in expected.items() if e.host == MIG_HOST}
    slices = {key: e for key, e in node.items() if e.profile}
    parents = sorted({e.cell.gpu for e in slices.values()})
    shown, found = cells(page), groups(page)
    assert sorted(p for h, p in found if h == MIG_HOST) == [str(i) for i in parents]
    for key, e in slices.items():
        c = shown[key]
        assert (c["group"], c["section"]) == (str(e.cell.gpu), MIG_HOST), (key, c)
        assert e.profile in c["text"] and str(e.cell) in c["text"], (key, c["text"])
    for index in parents:  # a MIG-enabled GPU is no cell and says no state
        assert (MIG_HOST, str(index)) not in shown
        group = found[MIG_HOST, str(index)]
        model = next(e.model for e in slices.values() if e.cell.gpu == index)
        assert f"GPU {index}" in group["head"] and "MIG" in group["head"], group
        assert display_name(model, {}) in group["head"], group
        assert group["cells"] == sorted((str(e.cell) for e in slices.values()
                                         if e.cell.gpu == index),
                                        key=lambda text: Cell.parse(text).sort_key())
        assert not re.search(r"\bfree\b", group["head"] + group["label"], re.IGNORECASE)
        assert not [k for k in group["classes"] if k.startswith("state-")], group
    assert [shown[key]["group"] for key, e in node.items() if not e.profile] == [None]
    api = {(g["host"], cell_of(g)): g for g in service_json(page, "/api/v1/fleet")["gpus"]}
    busy = next(e for e in slices.values() if e.users)
    g = api[MIG_HOST, str(busy.cell)]
    assert (g["profile"], g["gpu"]) == (busy.profile, busy.cell.gpu) and g["mig_uuid"]
    cell(page, MIG_HOST, str(busy.cell)).hover()
    text = mig_detail_text(page)
    assert g["mig_uuid"] in text and busy.profile in text and str(busy.cell) in text, text
    for user in busy.users:
        assert user in text, (user, text)
    assert g["processes"] and all(p["command"] in text for p in g["processes"]), text
    assert re.search(rf"\d+\s*°C \(of GPU {busy.cell.gpu}\)", text), text


def test_a_slice_booked_in_the_page_is_reserved_then_extended_and_released(
        lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    gpu = free_gpu(lab, page, MIG_HOST, slices=True)
    booking = book_in_page(page, MIG_HOST, gpu, "a slice from the page")
    (stored,) = [r for r in lab.fleet.active_reservations() if r.id == booking]
    assert (cells_text(stored.gpus), stored.user) == ((gpu,), "alice")
    assert [m["user"] for m in booked_in_metrics(lab, MIG_HOST, gpu)] == ["alice"]
    wait_page(page, "the booked slice reserved and mine", lambda: cells(page)[MIG_HOST, gpu],
              lambda c: c["state"] == states.RESERVED.name and "mine" in c["classes"])
    wait_for_grid(page, lab)  # its neighbours as they were
    row = page.locator(f'#bookings tr[data-id="{booking}"]')
    assert gpu in row.inner_text()
    row.locator("button.extend").click()
    page.wait_for_selector("#extend-dialog[open]")
    assert gpu in page.locator("#extend-what").inner_text()
    page.locator("#extend-until").fill(until_text(6))
    page.locator("#extend-submit").click()
    page.wait_for_selector("#extend-dialog[open]", state="detached")
    lab.wait_for("the slice's booking extended", lambda: [
        r.until for r in lab.fleet.active_reservations() if r.id == booking],
        lambda until: len(until) == 1 and until[0] > stored.until)
    row.locator("button.release").click()
    row.wait_for(state="detached")
    assert booking not in [r.id for r in lab.fleet.active_reservations()]
    wait_page(page, "the slice free again", lambda: cells(page)[MIG_HOST, gpu]["state"],
              lambda state: state == states.FREE.name)


def fed_cells(fed: FedLab) -> dict[Key, Any]:
    """The fed fleet's cells (GpuStatus) by (host, cell)."""
    return {(g.host, str(g.cell)): g for g in fed.gpus()}


def test_fed_slices_are_cells_in_the_group_of_their_gpu_which_is_no_cell(
        fed: FedLab, pages: Pages, axe_source: str) -> None:
    page = pages.open(fed.url, "alice")
    gpus = fed_cells(fed)
    shown = cells(page)
    assert list(shown) == list(gpus)  # the API's order: slices after the lower GPUs
    for key, g in gpus.items():
        c, state = shown[key], states.BY_NAME[g.state]
        assert c["state"] == g.state and f"state-{g.state}" in c["classes"], (key, c)
        assert c["background"] == colour(page, state), (key, c["background"])
        assert re.search(rf"\b{g.state}\b", c["text"], re.IGNORECASE), (key, c["text"])
        assert c["tabindex"] == "0" and (c["role"] == "button") == (g.state == "free"), key
        assert set(g.users) <= set(NAME.findall(c["users"])), (key, c["users"])
        mine = "alice" in g.users
        assert ("mine" in c["classes"]) == mine and ("(yours)" in c["text"]) == mine, key
        if g.profile:
            assert c["group"] == str(g.gpu) and "slice" in c["classes"], (key, c)
            assert g.profile in c["text"] and str(g.cell) in c["text"], (key, c["text"])
        else:
            assert c["group"] is None, (key, c)
    parents = sorted({g.gpu for g in gpus.values() if g.profile})
    found = groups(page)
    assert list(found) == [(FED_HOST, str(i)) for i in parents]
    for index in parents:
        assert (FED_HOST, str(index)) not in shown  # the MIG-enabled GPU is no cell
        group = found[FED_HOST, str(index)]
        assert group["role"] == "group" and group["tabindex"] is None, group
        assert f"GPU {index}" in group["head"] and "MIG" in group["head"], group
        assert display_name(FED_MODELS[index], {}) in group["head"], group
        assert group["cells"] == [str(g.cell) for g in gpus.values() if g.gpu == index]
        assert not re.search(r"\bfree\b", group["head"] + group["label"], re.IGNORECASE)
    assert axe_violations(page, axe_source) == []


def test_fed_free_slices_count_as_model_and_profile_and_the_filters_take_slices(
        fed: FedLab, pages: Pages) -> None:
    page = pages.open(fed.url, "alice")
    gpus = fed_cells(fed)
    free = Counter(g.display_name for g in gpus.values() if g.state == states.FREE.name)
    assert any(g.profile and g.state == states.FREE.name for g in gpus.values())
    summary = page.locator("#summary").inner_text()
    assert set(summary.split(" · ")) == {f"{n} x {model} free" for model, n in free.items()}

    def visible() -> tuple[set[Key], set[str]]:
        return ({key for key, c in cells(page).items() if c["visible"]},
                {parent for (_, parent), g in groups(page).items() if g["visible"]})

    def parents(keys: set[Key]) -> set[str]:
        return {str(gpus[k].gpu) for k in keys if gpus[k].profile}

    def only(what: str, wanted: set[Key]) -> None:
        wait_page(page, what, visible, lambda shown: shown == (wanted, parents(wanted)))

    page.locator("#only-free").check()
    only("only the free cells", {k for k, g in gpus.items() if g.state == states.FREE.name})
    page.locator("#only-free").uncheck()
    sliced = next(g for g in gpus.values() if g.profile)
    page.locator("#filter-model").select_option(sliced.display_name)
    only(f"the {sliced.display_name} cells",
         {k for k, g in gpus.items() if g.display_name == sliced.display_name})
    page.locator("#filter-model").select_option("")
    page.locator("#filter-state").select_option(states.IDLE.name)
    only("the idle cells", {k for k, g in gpus.items() if g.state == states.IDLE.name})
    page.locator("#filter-state").select_option("")
    shared = next(g for g in gpus.values() if g.profile and len(g.users) >= 2)
    page.locator("#search").fill(shared.users[-1])
    only(f"{shared.users[-1]}'s cells", {k for k, g in gpus.items()
                                         if shared.users[-1] in g.users})
    page.locator("#search").fill(FED_BOOKED[1])
    only("the booked slice", {k for k, g in gpus.items() if g.reservation})
    page.locator("#search").fill("")
    only("every cell", set(gpus))


def test_fed_a_slice_s_detail_on_hover_and_on_focus_and_the_arrows_move_through_slices(
        fed: FedLab, pages: Pages) -> None:
    page = pages.open(fed.url, "alice")
    gpus = fed_cells(fed)
    shared = next(g for g in gpus.values() if g.profile and len(g.users) >= 2)
    assert shared.mig_uuid and shared.temperature_celsius and shared.memory_total_bytes
    cell(page, FED_HOST, str(shared.cell)).hover()
    text = mig_detail_text(page)
    assert detail(page)["role"] == "tooltip"
    assert shared.profile and shared.profile in text and shared.mig_uuid in text, text
    assert f"{FED_HOST} · MIG slice {shared.cell}" in text, text
    total = round(shared.memory_total_bytes / 2 ** 30)
    assert re.search(rf"Slice memory\s+\d+(\.\d)?/{total} GiB", text), text
    for p in shared.processes:
        assert p.command in text and p.user in text, (p, text)
    assert f"{round(shared.temperature_celsius)} °C (of GPU {shared.gpu})" in text, text
    page.mouse.move(1, 1)
    page.wait_for_function("() => !document.getElementById('detail').checkVisibility()")
    order = list(cells(page))
    after = gpus[order[order.index((FED_HOST, str(shared.cell))) + 1]]
    cell(page, FED_HOST, str(shared.cell)).focus()
    assert after.mig_uuid and after.mig_uuid not in mig_detail_text(page)
    page.keyboard.press("ArrowRight")
    page.wait_for_function("uuid => document.getElementById('detail').innerText.includes(uuid)",
                           arg=after.mig_uuid)
    assert page.evaluate("() => document.activeElement.dataset.gpu") == str(after.cell)
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('detail').checkVisibility()")


def test_fed_booking_a_free_slice_sends_its_cell_and_the_dialog_names_it(
        fed: FedLab, pages: Pages) -> None:
    page = pages.open(fed.url, "alice")
    fed.watch_posts(page)
    gpus = fed_cells(fed)
    target = next(g for g in gpus.values() if g.profile and g.state == states.FREE.name)
    text = str(target.cell)
    cell(page, FED_HOST, text).click()
    page.wait_for_selector("#book-dialog[open]")
    title = page.locator("#book-title").inner_text()
    assert f"MIG slice {text}" in title and target.display_name in title, title
    assert page.locator("#book-gpus").input_value() == text
    offered = page.locator("#book-free").inner_text()
    for g in gpus.values():
        assert (re.search(rf"(?<![\d/]){re.escape(str(g.cell))}(?![\d/])", offered) is not None
                ) == (g.state == states.FREE.name), (g.cell, offered)
    page.locator("#book-until").fill(until_text(3))
    page.locator("#book-submit").click()
    page.wait_for_function("""() => !document.querySelector('#book-dialog[open]')
        || document.getElementById('book-error').innerText.trim()""")
    assert [body["gpus"] for body in fed.posted] == [[text]]
    assert page.locator("#book-error").inner_text() == ""
    row = page.locator("#bookings tr[data-id]", has_text=text)
    row.wait_for()
    row.locator("button.release").click()
    row.wait_for(state="detached")


def test_fed_old_data_shows_every_slice_without_fresh_data_and_none_free(
        fed: FedLab, pages: Pages) -> None:
    page = pages.open(fed.url, "alice")
    assert any(c["state"] == states.FREE.name for c in cells(page).values())
    fed.age = 3600.0
    try:
        page.locator("#banner").wait_for(state="visible")
        shown = wait_page(page, "every cell without fresh data", lambda: cells(page),
                          lambda found: all("stale" in c["classes"] for c in found.values()))
        assert len(shown) == len(fed.gpus())
        for key, c in shown.items():
            assert "no fresh data" in c["text"] and c["state"] == states.DOWN.name, (key, c)
            assert "state-free" not in c["classes"] and c["role"] is None, (key, c)
            assert not re.search(r"\bfree\b", c["text"], re.IGNORECASE), (key, c["text"])
        assert not [g for g in groups(page).values()
                    if re.search(r"\bfree\b", g["head"], re.IGNORECASE)]
        assert not re.search(r"\d+ x ", page.locator("#summary").inner_text())
    finally:
        fed.age = 0.0
    page.locator("#banner").wait_for(state="hidden")


# -- last: Prometheus stops ----------------------------------------------------------------------

def test_zz_banner_when_prometheus_is_stopped_and_no_gpu_shown_free(lab: Lab,
                                                                    pages: Pages) -> None:
    """Stops the lab's Prometheus: the last test of the module."""
    page = pages.open(lab.url, "alice")
    wait_for_grid(page, lab)
    assert not page.locator("#banner").is_visible()
    assert any(s == states.FREE.name for s in states_shown(page).values())
    pages.allow(r"status of 503")  # /api/v1/fleet while Prometheus cannot be asked
    assert lab.fleet.prometheus is not None
    lab.fleet.prometheus.stop()
    page.locator("#banner").wait_for(state="visible", timeout=60_000)
    assert page.locator("#banner").get_attribute("role") == "alert"
    assert re.search(r"[a-z]{3,} [a-z]{3,}", page.locator("#banner").inner_text())

    def free_shown(p: Page) -> list[Key]:
        return [key for key, c in cells(p).items()
                if c["state"] == states.FREE.name or "state-free" in c["classes"]
                or re.search(r"\bfree\b", c["text"], re.IGNORECASE)]

    wait_page(page, "no cell free", lambda: free_shown(page), lambda found: found == [])
    fresh = pages.open(lab.url, "bob", rendered=False)
    fresh.locator("#banner").wait_for(state="visible")
    assert free_shown(fresh) == []
