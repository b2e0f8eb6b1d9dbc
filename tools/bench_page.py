"""make bench-page: how fast the lab's page (`/` of `gpuwatch serve`) renders a 1,000-GPU fleet in
Debian's Chromium.

`gpuwatch serve` runs in this process (gpuwatch.serve.app.build) over a synthetic fleet instead
of Prometheus: 125 hosts of 8 cells in 5 clusters and 3 models, in every state, with 1 to 3
processes of 12 users on the held ones, some booked and some claimed, every cell fresh (its
`updated` is the moment of the answer); on the A100 hosts seven of the eight cells are MIG
slices (1g.5gb) of GPU 0, shown in its group, and the eighth is GPU 1. A signed-in user
(basic auth) opens the page in headless Chromium (Playwright, /usr/bin/chromium, 1280x900)
several times, each in a fresh browser context; the page refreshes every second
(--web.refresh 1s). A script Playwright adds before the page's own (a MutationObserver on
document.body's data-rendered, not subject to the page's Content-Security-Policy) notes
when each render ends, by the page's own clock (performance.now(), 0 at the start of the
navigation). Medians over the runs, in milliseconds:

- first render: from the start of the navigation to the end of the first complete render
  (document.body.dataset.rendered = 1, every cell in the DOM);
- of which: the page and its scripts loaded (DOMContentLoaded), the /api/v1/fleet request of
  that render from sent to last byte (Resource Timing; the size of its JSON is printed too),
  and the render itself, from that last byte to the end of the render;
- re-render (refresh): from the last byte of a refresh's /api/v1/fleet answer to the end of
  the render it causes;
- re-render (filter): "only free" ticked and unticked in the page: the two synchronous
  renders and the next frame after them, halved.

It prints figures and asserts nothing about them (tests/e2e/test_bench_page.py runs `--quick`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from playwright.sync_api import Browser, sync_playwright

from gpuwatch.contract import states
from gpuwatch.fleet import ActiveClaim, ActiveReservation, GpuProcess, GpuStatus
from gpuwatch.serve.app import Serving, build
from gpuwatch.serve.options import ServeOptions
from tools.bench import _environment

PROG = "bench-page"
CHROMIUM = "/usr/bin/chromium"
USER = "alice"
PASSWORD = "bench-page-password"
GPUS_PER_HOST = 8
MODELS = (("NVIDIA H100 80GB HBM3", "H100 80GB HBM3", 80), ("NVIDIA A100-SXM4-40GB",
          "A100-SXM4-40GB", 40), ("NVIDIA GeForce RTX 3090", "RTX 3090", 24))
MIG_MODEL, MIG_PROFILE, MIG_GIB = MODELS[1][0], "1g.5gb", 5
"""The A100 hosts' GPU 0 is in seven slices of this profile."""
USERS = tuple(f"user{i:02d}" for i in range(11)) + (USER,)
GIB = float(1 << 30)
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 60_000

RENDERS_JS = """() => {
  window.__renders = [];
  new MutationObserver(() => window.__renders.push(
      [Number(document.body.dataset.rendered || 0), performance.now(),
       document.querySelectorAll('#grid .cell').length]))
    .observe(document, {attributes: true, subtree: true,
                        attributeFilter: ['data-rendered']});
}"""
FILTER_JS = """() => new Promise(done => {
  const box = document.getElementById('only-free');
  const start = performance.now();
  box.click();
  box.click();
  requestAnimationFrame(() => setTimeout(() => done(performance.now() - start), 0));
})"""


def synthetic_fleet(count: int, now: float) -> list[GpuStatus]:
    """`count` cells on hosts of GPUS_PER_HOST, cycling through every state; on the A100
    hosts (MIG_MODEL) the first seven of a host are slices of its GPU 0."""
    cycle = (states.FREE, states.BUSY, states.BUSY, states.IDLE, states.BUSY, states.RESERVED,
             states.FREE, states.BUSY, states.CLAIMED, states.BUSY, states.DOWN)
    until = dt.datetime.fromtimestamp(now + 86400, dt.timezone.utc)
    gpus = []
    for i in range(count):
        host, index = f"node-{i // GPUS_PER_HOST:03d}", i % GPUS_PER_HOST
        model, display, gib = MODELS[(i // GPUS_PER_HOST) % len(MODELS)]
        state = cycle[i % len(cycle)]
        mig = model == MIG_MODEL and index < GPUS_PER_HOST - 1
        held = state in (states.BUSY, states.IDLE)
        processes = tuple(GpuProcess(pid=10_000 + i * 4 + p, user=USERS[(i + p) % len(USERS)],
                                     command="python", memory_bytes=(4 + p) * GIB,
                                     start_time=now - 3600 * (p + 1))
                          for p in range(1 + i % 3)) if held else ()
        gpus.append(GpuStatus(
            host=host, instance=f"10.0.{i // 2000}.{(i // GPUS_PER_HOST) % 250}:9835",
            gpu=(0 if mig else 1) if model == MIG_MODEL else index,
            uuid=f"GPU-{i - index if mig else i:08d}", state=state.name,
            users=tuple(sorted({p.user for p in processes})), model=model,
            display_name=f"{display} {MIG_PROFILE}" if mig else display,
            memory_used_bytes=sum(p.memory_bytes or 0 for p in processes),
            memory_total_bytes=(MIG_GIB if mig else gib) * GIB,
            utilization_ratio=None if mig else
            0.0 if state != states.BUSY else 0.5 + (i % 5) / 10,
            inactive_since=now - 1800 if state == states.IDLE else None,
            reservation=ActiveReservation(USERS[i % len(USERS)], until.isoformat(),
                                          until.timestamp(), "experiments")
            if state == states.RESERVED else None,
            claim=ActiveClaim(f"c{i:05d}", USERS[i % len(USERS)], until.isoformat())
            if state == states.CLAIMED else None,
            temperature_celsius=None if state == states.DOWN else 40.0 + i % 40,
            processes=processes, since=now - 3600, cluster=f"cluster-{i // 200}",
            updated=now, gpu_instance_id=7 + index if mig else None,
            profile=MIG_PROFILE if mig else None,
            mig_uuid=f"MIG-{i:08d}-0000-4000-8000-000000000000" if mig else None))
    return gpus


@contextlib.contextmanager
def service(count: int, workdir: Path) -> Iterator[Serving]:
    config = workdir / "web-config.yml"
    config.write_text(yaml.safe_dump({"basic_auth_users": {
        USER: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}}))
    fleet = synthetic_fleet(count, time.time())

    def answer() -> list[GpuStatus]:
        now = time.time()
        return [replace(g, updated=now) for g in fleet]

    options = ServeOptions(reservations_file=workdir / "reservations.yml",
                           listen_address="127.0.0.1:0", web_config_file=config,
                           own_process_metrics=False, claim_poll_seconds=3600,
                           refresh_seconds=1.0)
    serving = build(options, fleet=answer)
    serving.start()
    try:
        yield serving
    finally:
        serving.stop()


def fleet_bytes(url: str) -> int:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(url + "/api/v1/fleet",
                                     headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return len(answer.read())


def one_run(browser: Browser, url: str, count: int) -> dict[str, float]:
    """The figures of one page load, in milliseconds."""
    ctx = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                              viewport=VIEWPORT,  # type: ignore[arg-type]
                              timezone_id="UTC", locale="en-GB")
    try:
        ctx.add_init_script(script=f"({RENDERS_JS})()")
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        page.wait_for_function(
            "n => (window.__renders || []).some(r => r[0] >= 1 && r[2] >= n)", arg=count,
            timeout=TIMEOUT_MS)
        page.wait_for_function("() => (window.__renders || []).some(r => r[0] >= 3)",
                               timeout=TIMEOUT_MS)
        renders: list[list[float]] = page.evaluate("() => window.__renders")
        fetches: list[dict[str, float]] = page.evaluate(
            "() => performance.getEntriesByType('resource')"
            ".filter(e => e.name.endsWith('/api/v1/fleet'))"
            ".map(e => ({start: e.startTime, end: e.responseEnd}))")
        loaded: float = page.evaluate(
            "() => performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
        filter_ms: float = page.evaluate(FILTER_JS)
        if errors:
            raise RuntimeError(f"the page logged errors: {errors[:3]}")
    finally:
        ctx.close()
    first = next(r for r in renders if r[0] >= 1)
    if first[2] < count:
        raise RuntimeError(f"the first render showed {first[2]:g} cells of {count}")
    third = next(r for r in renders if r[0] >= 3)
    # the answer the third render shows: the last fleet answer that ended before it
    answered = max(f["end"] for f in fetches if f["end"] <= third[1])
    return {"first render": first[1],
            "page loaded": loaded,
            "fleet answer": fetches[0]["end"] - fetches[0]["start"],
            "render after the answer": first[1] - fetches[0]["end"],
            "re-render (refresh)": third[1] - answered,
            "re-render (filter)": filter_ms / 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__
                                else None)
    p.add_argument("--gpus", type=int, default=1000, help="GPUs in the fleet (default %(default)s)")
    p.add_argument("--runs", type=int, default=7, help="page loads (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="the smoke run of the tests: 100 GPUs, 2 runs (figures not for quoting)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures there")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count, runs = (100, 2) if args.quick else (args.gpus, args.runs)
    if count < 1 or runs < 1:
        print(f"{PROG}: error: --gpus and --runs must be at least 1", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).is_file():
        print(f"{PROG}: error: {CHROMIUM} is missing: run scripts/ensure-chromium "
              "(Debian's chromium package)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-page-") as tmp, \
            service(count, Path(tmp)) as serving, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            size = fleet_bytes(serving.url)
            results = [one_run(browser, serving.url, count) for _ in range(runs)]
            version = browser.version
        finally:
            browser.close()
    figures: dict[str, Any] = {
        "gpus": count, "runs": runs, "fleet_json_bytes": size, "chromium": version,
        **{name: statistics.median(r[name] for r in results) for name in results[0]},
        "first render max": max(r["first render"] for r in results)}
    print(_environment())
    print(f"Chromium {version} headless, {VIEWPORT['width']}x{VIEWPORT['height']}; "
          f"{count} GPUs on {-(-count // GPUS_PER_HOST)} hosts; /api/v1/fleet "
          f"{size / 1024:.0f} KiB; median of {runs} page loads")
    for name in ("first render", "first render max", "page loaded", "fleet answer",
                 "render after the answer", "re-render (refresh)", "re-render (filter)"):
        print(f"  {name:<24} {figures[name]:8.1f} ms")
    target = "met" if figures["first render"] < 1000 else "MISSED"
    print(f"Target: first render of {count} GPUs under 1000 ms: {target}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
