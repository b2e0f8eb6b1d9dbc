"""gpuwatch.serve.runbook: docs/runbook.md as the page `gpuwatch serve` answers at /runbook,
with GitHub's anchors on its headings and nothing of the file's own markup let through."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import tomllib
from paths import REPO

from gpuwatch.serve import runbook

RUNBOOK = REPO / "docs" / "runbook.md"


class _Page(HTMLParser):
    """The elements of a page: (tag, attributes) in order, and its text."""

    def __init__(self, body: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(body.decode())
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def ids(self) -> list[str]:
        return [str(a["id"]) for _, a in self.elements if a.get("id")]

    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}

    def hrefs(self) -> list[str]:
        return [str(a["href"]) for tag, a in self.elements if tag == "a" and "href" in a]


def test_the_page_is_the_runbook_of_the_checkout() -> None:
    body, content_type = runbook.page()
    assert content_type == "text/html; charset=utf-8"
    assert body == runbook.render(RUNBOOK.read_text())
    page = _Page(body)
    (policy,) = [a["content"] for tag, a in page.elements
                 if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert policy == "default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'"
    sections = re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.M)
    assert sections, "the runbook has sections"
    assert [runbook.anchor(s) for s in sections] == [i for i in page.ids()
                                                     if i != "gpuwatch-runbook"]
    # the list of sections links each of them
    assert [h for h in page.hrefs() if h.startswith("#")][:len(sections)] == \
        ["#" + runbook.anchor(s) for s in sections]


def test_the_packaged_runbook_is_docs_runbook_md() -> None:
    """One source: the package's file is a relative link to docs/runbook.md (git keeps it as
    a link; the wheel gets the file's text), and pyproject.toml ships it as package data."""
    packaged = REPO / "src" / "gpuwatch" / "serve" / runbook.SOURCE
    assert packaged.is_symlink()
    link = Path(packaged.readlink())
    assert not link.is_absolute()
    assert packaged.resolve() == RUNBOOK.resolve()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert runbook.SOURCE in config["tool"]["setuptools"]["package-data"]["gpuwatch.serve"]


@pytest.mark.parametrize(("title", "expected"), [
    ("GpuHeldIdle", "gpuheldidle"),
    ("GPU states", "gpu-states"),
    ("The `gpuwatch` command", "the-gpuwatch-command"),
    ("Consul instead of target files", "consul-instead-of-target-files"),
    ("Per-user usage (GPU-hours)", "per-user-usage-gpu-hours"),
    ("  Über_GPU! ", "über_gpu"),
])
def test_anchors_are_githubs(title: str, expected: str) -> None:
    assert runbook.anchor(title) == expected
    assert _Page(runbook.render(f"## {title}\n")).ids() == [expected]


def test_repeated_headings_get_numbered_anchors_as_on_github() -> None:
    page = _Page(runbook.render("## Diagnosis\n\n## Diagnosis\n\n## Diagnosis\n"))
    assert page.ids() == ["diagnosis", "diagnosis-1", "diagnosis-2"]


HOSTILE = """# <script>alert(1)</script> runbook

<script>alert(2)</script>
<img src=x onerror="alert(3)">
<style>body { display: none }</style>

## <b onclick="alert(4)">Bold</b> heading

[click](javascript:alert(5)) [data](data:text/html;base64,PHNjcmlwdD4=) [vb](vbscript:x)
![pixel](https://tracker.example/p.gif "t") "quotes" & <ampersands>

| left | right |
|:-----|------:|
| <i>x</i> | `<code>` |

[repository file](prometheus.md#thresholds) and [anchor](#gpuheldidle) and
[site](https://example.org/a?b=1&c=2)
"""


def test_hostile_markdown_comes_out_as_text() -> None:
    body = runbook.render(HOSTILE)
    page = _Page(body)
    text = "".join(page.text)
    # nothing the file says becomes markup: no script, style, handlers or unsafe links
    assert page.tags() <= {"html", "head", "meta", "title", "body", "nav", "ul", "li", "a",
                           "main", "h1", "h2", "p", "code", "table", "thead", "tbody", "tr",
                           "th", "td"}
    assert not {"script", "style", "b", "i", "img"} & page.tags()
    for _, attrs in page.elements:
        assert not any(name.startswith("on") or name == "style" for name in attrs), attrs
    assert b"<script" not in body and b"<style" not in body and b"onerror=\"" not in body
    for href in page.hrefs():
        assert href.startswith(("#", "https://")), href
    # ... and is shown as written
    assert "<script>alert(2)</script>" in text
    assert '<img src=x onerror="alert(3)">' in text
    assert "[click](javascript:alert(5))" in text
    assert "pixel" in text and b"tracker.example" not in body  # the page loads nothing
    assert "<i>x</i>" in text and "<code>" in text and "& <ampersands>" in text
    assert "<script>alert(1)</script> runbook" in "".join(
        t for t in page.text if "runbook" in t)
    # the title and the headings' anchors are plain text too
    assert re.search(rb"<title>&lt;script&gt;alert\(1\)&lt;/script&gt; runbook</title>", body)
    assert page.ids()[1] == runbook.anchor('<b onclick="alert(4)">Bold</b> heading')
    # a link to another file of the repository, which the service does not serve, is text
    assert "repository file" in text and "prometheus.md" not in " ".join(page.hrefs())
    assert "#gpuheldidle" in page.hrefs()
    assert "https://example.org/a?b=1&c=2" in page.hrefs()


def test_a_runbook_missing_from_the_installation_says_so(tmp_path: Path) -> None:
    body = runbook.load(tmp_path / "runbook.md")
    text = " ".join("".join(_Page(body).text).split())
    assert f"missing from this installation of gpuwatch ({tmp_path / 'runbook.md'}" in text
    assert "Reinstall the package (gpuwatch-stack)" in text


def test_a_runbook_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    broken = tmp_path / "runbook.md"
    broken.write_bytes(b"# runbook\n\n\xff\xfe")
    assert "not UTF-8 text" in "".join(_Page(runbook.load(broken)).text)


def test_gpuwatch_serve_answers_the_runbook_page_at_its_path(tmp_path: Path) -> None:
    """Through the service (a real server on 127.0.0.1), GET /runbook is this page, with the
    anchors the alerts' runbook_url ends in."""
    from tests.unit.test_serve import Client, Clock, four_gpu_fleet, serving

    with serving(tmp_path, four_gpu_fleet(), Clock()) as served:
        status, headers, body = Client(served).call("GET", "/runbook")
    assert status == 200
    assert (body, headers["content-type"]) == runbook.page()
    assert 'id="gpuheldidle"' in body.decode()
