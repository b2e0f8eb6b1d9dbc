"""The lab's page (`/` of `gpuwatch serve`) in headless Chromium over the simulated lab of
conftest.py: every GPU's cell as the harness's oracle says (state in words, the state's colour
from gpuwatch.contract.states, users), the detail on hover and on keyboard focus, bookings made
in the page reaching the reservations file, `gpuwatch status` and /metrics, owner-only release,
filters and counts, the phone layout, both themes, axe-core, the Content-Security-Policy, no
request to another host, the names hidden from people without an identity, and last the
banner when Prometheus is stopped (no GPU shown free then).

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
    GRAFANA,
    LAB_NODES,
    PASSWORDS,
    STOPPED,
    Lab,
    Pages,
    axe_violations,
    rendered,
    wait_page,
    wait_rendered,
)
from cli_run import run
from playwright.sync_api import Page
from prom_harness import ExpectedGpu
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch.contract import metrics, states
from gpuwatch.exporter.collectors.gpu import display_name
from gpuwatch.serve.web import PALETTE

PHONE = {"width": 390, "height": 844}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
CSP_DIRECTIVES = ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                  "img-src 'self' data:", "connect-src 'self'", "form-action 'self'",
                  "frame-ancestors 'none'", "base-uri 'none'")

CELLS_JS = """() => [...document.querySelectorAll('#grid .cell')].map(c => ({
    host: c.dataset.host, gpu: Number(c.dataset.gpu), state: c.dataset.state,
    classes: [...c.classList], text: c.innerText, tabindex: c.getAttribute('tabindex'),
    users: c.querySelector('.users') ? c.querySelector('.users').innerText : '',
    background: getComputedStyle(c).backgroundColor, visible: c.checkVisibility(),
    right: c.getBoundingClientRect().right}))"""
COLOUR_JS = """name => { const probe = document.createElement('div');
    probe.style.backgroundColor = name; document.body.append(probe);
    const colour = getComputedStyle(probe).backgroundColor; probe.remove(); return colour }"""


def cells(page: Page) -> dict[tuple[str, int], dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate(CELLS_JS)
    return {(c["host"], c["gpu"]): c for c in found}


def states_shown(page: Page) -> dict[tuple[str, int], str]:
    return {key: c["state"] for key, c in cells(page).items()}


def oracle_states(lab: Lab) -> dict[tuple[str, int], str]:
    return {key: e.state for key, e in lab.fleet.expected().items()}


def wait_for_grid(page: Page, lab: Lab) -> dict[tuple[str, int], ExpectedGpu]:
    """Waits until the page shows every GPU of the fleet in the oracle's state; the oracle."""
    wait_page(page, "the grid in the oracle's states", lambda: (states_shown(page),
                                                               oracle_states(lab)),
              lambda both: both[0] == both[1])
    return lab.fleet.expected()


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


def cell(page: Page, host: str, gpu: int) -> Any:
    return page.locator(f'#grid .cell[data-host="{host}"][data-gpu="{gpu}"]')


def service_json(page: Page, path: str) -> Any:
    """GET `path` of the page's service as the page's own user (its browser context)."""
    answer = page.request.get(path)
    assert answer.ok, (path, answer.status, answer.text())
    return answer.json()


def free_gpu(lab: Lab, page: Page, host: str) -> int:
    """A free GPU of `host` that the page shows free."""
    expected = wait_for_grid(page, lab)
    free = sorted(e.gpu for e in expected.values()
                  if e.host == host and e.state == states.FREE.name)
    assert free, f"no free GPU on {host}: {expected}"
    return free[0]


def until_text(hours: float) -> str:
    """A datetime-local value `hours` from now (the pages run in UTC)."""
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours)
    return when.strftime("%Y-%m-%dT%H:%M")


# -- the grid ----------------------------------------------------------------------------------

def test_the_lab_covers_every_state_a_shared_gpu_and_a_dead_node(lab: Lab) -> None:
    expected = lab.fleet.expected().values()
    assert {e.state for e in expected} >= {states.FREE.name, states.BUSY.name,
                                            states.IDLE.name, states.RESERVED.name,
                                            states.DOWN.name}
    assert any(len(e.users) >= 2 for e in expected if e.state == states.BUSY.name)
    assert {e.state for e in expected if e.host == STOPPED} == {states.DOWN.name}


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_gpu_has_a_cell_with_its_state_in_words_colour_and_users(
        lab: Lab, pages: Pages, scheme: str) -> None:
    page = pages.open(lab.url, "alice", color_scheme=scheme)
    expected = wait_for_grid(page, lab)
    shown = cells(page)
    assert sorted(shown) == sorted(expected)
    people = everyone(lab)
    for key, e in expected.items():
        c, where = shown[key], f"{e.host} GPU {e.gpu}"
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
    shared = next(e for e in expected.values() if len(e.users) >= 2)
    processes = [p for p in lab.fleet.expected_processes()
                 if (p.host, p.gpu) == (shared.host, shared.gpu)]
    assert not detail(page)["visible"]
    cell(page, shared.host, shared.gpu).hover()
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
                              "Number(document.activeElement.dataset.gpu)]")
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
    assert not [r for r in lab.fleet.active_reservations() if (r.host, r.gpus) == (host, (gpu,))]


def test_counts_of_free_gpus_per_model_and_the_filters(lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    expected = wait_for_grid(page, lab)
    names = {(g["host"], g["gpu"]): g["display_name"] or g["model"]
             for g in service_json(page, "/api/v1/fleet")["gpus"]}
    free = Counter(names[key] for key, e in expected.items() if e.state == states.FREE.name)
    summary = page.locator("#summary").inner_text()
    for model, count in free.items():
        assert re.search(rf"\b{count}\s*[x\u00d7]\s*{re.escape(model)} free", summary), \
            (model, count, summary)

    def visible() -> set[tuple[str, int]]:
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
    model = names["ws-01", 0]
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

def book_in_page(page: Page, host: str, gpu: int, comment: str) -> str:
    """Books GPU `gpu` of `host` for 3 hours through the page's dialog; the booking's id."""
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


def booked_in_metrics(lab: Lab, host: str, gpu: int) -> list[dict[str, str]]:
    return [s.labels for family in text_string_to_metric_families(service_metrics(lab, ADMIN))
            for s in family.samples if s.name == metrics.RESERVATION_END.name
            and s.labels.get("reserved_host") == host and s.labels.get("gpu") == str(gpu)]


def test_a_booking_made_in_the_page_shows_in_status_and_metrics_and_can_be_extended(
        lab: Lab, pages: Pages) -> None:
    page = pages.open(lab.url, "alice")
    host = "srv-01"
    gpu = free_gpu(lab, page, host)
    booking = book_in_page(page, host, gpu, "from the page")
    (stored,) = [r for r in lab.fleet.active_reservations() if r.id == booking]
    assert (stored.host, stored.gpus, stored.user, stored.comment) == \
        (host, (gpu,), "alice", "from the page")
    assert abs(stored.until.timestamp() - (dt.datetime.now(dt.timezone.utc).timestamp()
                                           + 3 * 3600)) < 120
    labels = booked_in_metrics(lab, host, gpu)
    assert [(m["user"], m["comment"]) for m in labels] == [("alice", "from the page")]
    shown = lab.wait_for("the booking in gpuwatch status", lambda: [
        g for g in status_json(lab) if (g["host"], g["gpu"]) == (host, gpu)],
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
        if r.user == "alice" and (r.host, r.gpus) == (host, (gpu,))],
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
    assert not [r for r in lab.fleet.active_reservations() if (r.host, r.gpus) == (host, (gpu,))]


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

    def free_shown(p: Page) -> list[tuple[str, int]]:
        return [key for key, c in cells(p).items()
                if c["state"] == states.FREE.name or "state-free" in c["classes"]
                or re.search(r"\bfree\b", c["text"], re.IGNORECASE)]

    wait_page(page, "no cell free", lambda: free_shown(page), lambda found: found == [])
    fresh = pages.open(lab.url, "bob", rendered=False)
    fresh.locator("#banner").wait_for(state="visible")
    assert free_shown(fresh) == []
