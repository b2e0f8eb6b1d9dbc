"""The lab's page of `gpuwatch serve`: its files (index.html, app.js, app.css, favicon.svg,
package data beside this module) and the one stylesheet made from contract/states.py
(states.css: a colour and a class per state), read once and served from memory with an ETag.

The page is plain HTML, CSS and JavaScript under a strict Content-Security-Policy: no inline
script or style anywhere (no style attribute in the markup the script writes either), no
request to another host.

    assets = Assets.load()
    asset = assets.get("app.js")   # Asset(body, content_type, etag) or None
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from importlib import resources

from gpuwatch import __version__
from gpuwatch.contract import states

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
     "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
     "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)
"""The headers of the page and its files."""

FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The files under /static/ and their types: nothing else is served from there."""

PALETTE: dict[str, str] = {
    "green": "#73bf69", "yellow": "#fade2a", "purple": "#c08ee0", "blue": "#6fa4f4",
    "red": "#f2495c", "orange": "#ff9830",
}
"""Grafana's shades of the colour names states.py gives (dark text reads on each of them
with a contrast of at least 4.5:1, in both themes: tests check)."""
TEXT_ON_STATE = "#111111"
STALE_BACKGROUND = "#a3a3a3"
"""A GPU without fresh data: neither free nor any state, grey."""


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(body: bytes, content_type: str) -> Asset:
    return Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:20]}"')


def states_css() -> str:
    """Custom properties and one class per state, from contract/states.py."""
    lines = [":root {"]
    for s in states.ALL:
        lines.append(f"  --state-{s.name}: {PALETTE[s.colour]};")
    lines += [f"  --state-text: {TEXT_ON_STATE};", f"  --state-stale: {STALE_BACKGROUND};",
              "}"]
    for s in states.ALL:  # a cell's class, and the legend's swatch
        lines.append(f".state-{s.name}, .swatch-{s.name} {{ background-color: "
                     f"var(--state-{s.name}); color: var(--state-text); }}")
    lines.append(".stale, .swatch-stale { background-color: var(--state-stale); "
                 "color: var(--state-text); }")
    return "\n".join(lines) + "\n"


def index_html(template: str) -> str:
    """The page with the legend and the state filter's options of states.py."""
    legend = "\n".join(
        f'      <li data-state="{s.name}"><span class="swatch swatch-{s.name}" '
        f'aria-hidden="true"></span> {s.name}</li>' for s in states.ALL)
    options = "\n".join(f'          <option value="{s.name}">{s.name}</option>'
                        for s in states.ALL)
    return (template.replace("<!--LEGEND-->", legend)
            .replace("<!--STATE-OPTIONS-->", options)
            .replace("{{FREE}}", states.FREE.name).replace("{{DOWN}}", states.DOWN.name)
            .replace("{{VERSION}}", html.escape(__version__)))


@dataclass(frozen=True)
class Assets:
    page: Asset
    files: dict[str, Asset]

    @classmethod
    def load(cls) -> Assets:
        folder = resources.files(__name__)
        files = {name: _asset(folder.joinpath(name).read_bytes(), kind)
                 for name, kind in FILES.items()}
        files["states.css"] = _asset(states_css().encode(), "text/css; charset=utf-8")
        page = _asset(index_html(folder.joinpath("index.html").read_text("utf-8")).encode(),
                      "text/html; charset=utf-8")
        return cls(page, files)

    def get(self, name: str) -> Asset | None:
        return self.files.get(name)
