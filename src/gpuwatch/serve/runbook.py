"""The runbook (docs/runbook.md) as one HTML page: what `gpuwatch serve` answers at /runbook.

Every alert's runbook_url is that page and an anchor, `{{ $externalLabels.runbook_url }}#NAME`
with NAME the alert's name lower-cased (prometheus/prometheus.yml, rules/), so each heading
carries the id GitHub gives it (`## GpuHeldIdle` -> `id="gpuheldidle"`) and the same link
works on the repository's page and on the served one.

The Markdown is read from this package (`runbook.md`, package data; in a checkout a link to
docs/runbook.md, the one source) and rendered by markdown-it-py, CommonMark with tables and
raw HTML off: whatever the file says, it comes out as text, never as markup of its own. The
page has no script and no style (attributes included), so it renders under the strict
Content-Security-Policy of the service's other pages.
"""

from __future__ import annotations

import functools
import html
import re
import sys
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

SOURCE = "runbook.md"
"""The runbook's file in this package."""
CONTENT_TYPE = "text/html; charset=utf-8"
POLICY = "default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'"
"""The page's own Content-Security-Policy (a meta element, beside the service's header): it
needs nothing, so it may load nothing."""
TITLE = "gpuwatch runbook"
"""The page's title when the runbook has no first-level heading."""

_NOT_IN_ANCHORS = re.compile(r"[^\w\- ]")


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, without punctuation other
    than `-` and `_`, spaces as `-` ("GPU states" -> "gpu-states")."""
    return _NOT_IN_ANCHORS.sub("", title.strip().lower()).replace(" ", "-")


def _text(inline: Token) -> str:
    """The text of an inline token as a reader sees it (markup gone, code spans' text kept)."""
    return "".join(child.content for child in inline.children or ()
                   if child.type in ("text", "code_inline"))


def _is_page_local(href: str) -> bool:
    """A link that works from the served page: an anchor on it, or an absolute URL."""
    parts = urlsplit(href)
    return href.startswith("#") or (parts.scheme in ("http", "https", "mailto")
                                    and (parts.scheme == "mailto" or bool(parts.netloc)))


def _headings_and_links(state: StateCore) -> None:
    """Ids on the headings, GitHub's way (a repeated one gets -1, -2, ...); links to other
    files of the repository (`prometheus.md#thresholds`), which the service does not serve,
    as their text alone, images as their alt text; no style attributes (table alignment),
    which the page's policy would refuse."""
    used: dict[str, int] = {}
    tokens = state.tokens
    for i, token in enumerate(tokens):
        if token.attrs.get("style") is not None:
            del token.attrs["style"]
        if token.type == "heading_open" and i + 1 < len(tokens):
            base = anchor(_text(tokens[i + 1]))
            count = used.get(base, 0)
            used[base] = count + 1
            token.attrSet("id", base if count == 0 else f"{base}-{count}")
        if token.type == "inline" and token.children:
            token.children = _without_file_links(token.children)


def _without_file_links(children: list[Token]) -> list[Token]:
    """The inline tokens with links to other files as their text and images as their alt
    text (the page loads nothing, from this host or another)."""
    kept: list[Token] = []
    dropping = False
    for child in children:
        if child.type == "image":
            kept.append(Token("text", "", 0, content=_text(child) or child.content))
            continue
        if child.type == "link_open" and not _is_page_local(str(child.attrGet("href") or "")):
            dropping = True
            continue
        if child.type == "link_close" and dropping:
            dropping = False
            continue
        kept.append(child)
    return kept


@functools.cache
def _markdown() -> MarkdownIt:
    md = MarkdownIt("js-default", {"html": False, "linkify": False, "typographer": False})
    md.core.ruler.push("gpuwatch_runbook", _headings_and_links)
    return md


def render(markdown: str) -> bytes:
    """`markdown` as a whole HTML page (UTF-8): a list of the second-level sections to jump
    to, then the text."""
    md = _markdown()
    tokens = md.parse(markdown)
    title = TITLE
    sections: list[tuple[str, str]] = []
    for i, token in enumerate(tokens):
        if token.type != "heading_open" or i + 1 >= len(tokens):
            continue
        if token.tag == "h1" and title == TITLE:
            title = _text(tokens[i + 1]) or TITLE
        elif token.tag == "h2":
            sections.append((str(token.attrGet("id")), _text(tokens[i + 1])))
    body = md.renderer.render(tokens, md.options, {})
    contents = "".join(f'<li><a href="#{html.escape(ident)}">{html.escape(name)}</a></li>\n'
                       for ident, name in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(POLICY)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f'<nav aria-label="Sections">\n<ul>\n{contents}</ul>\n</nav>\n'
        f"<main>\n{body}</main>\n</body>\n</html>\n").encode()


def _missing(path: str, reason: str) -> bytes:
    return render(f"# {TITLE}\n\nThe runbook is missing from this installation of gpuwatch "
                  f"({path}: {reason}). Reinstall the package (`gpuwatch-stack`), or read "
                  "docs/runbook.md in the repository.\n")


def load(source: Traversable | None = None) -> bytes:
    """The page of the runbook in `source` (default: this package's)."""
    path = source if source is not None else resources.files(__package__).joinpath(SOURCE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return _missing(str(path), e.strerror or type(e).__name__)
    except UnicodeDecodeError:
        return _missing(str(path), "not UTF-8 text")
    return render(text)


@functools.cache
def page() -> tuple[bytes, str]:
    """The runbook page and its content type, read and rendered once per process (the file
    is part of the installed package)."""
    return load(), CONTENT_TYPE
