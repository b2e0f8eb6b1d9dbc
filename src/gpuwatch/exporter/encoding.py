"""The exposition: the format the client asks for, written fast, never at a scrape's cost.

prometheus_client's writers cost about 0.9 µs per sample and 0.7 µs per label (8.6 ms for
an 8-GPU node with 64 processes per GPU in text, 13 ms in OpenMetrics, which Prometheus asks
for first); a scrape budget of 5 ms cannot carry that. The writers here produce the very
bytes of prometheus_client's `generate_latest` (text 0.0.4) and
`openmetrics.generate_latest` (OpenMetrics 1.0.0) in about a third of the time, for the
families gpuwatch serves: gauges and counters with legacy names, plain samples. Label names
are checked once per name, label values escaped only when they hold a character that needs
it. Any other family (a histogram, summary, info or stateset, a sample with a timestamp or
an exemplar, a `_created` sample, a unit, a name outside the legacy character set) is
written by prometheus_client's own encoder for that family alone, so the page is always the
library's, byte for byte (tests compare them). Which format: `negotiate`, which asks the
library's `choose_encoder`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import cast

from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

log = logging.getLogger(__name__)

Writer = Callable[[Collector], bytes]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text format's, the default (a client that asks for nothing in particular)."""
OPENMETRICS_CONTENT_TYPE = openmetrics.CONTENT_TYPE_LATEST
_EOF = "# EOF\n"

# Go's float formatting, as Prometheus' own clients write values ("1e+06", "+Inf")
floatToGoString = cast(Callable[[float], str], _untyped_float_to_go_string)
_library_openmetrics = cast(Writer, openmetrics.generate_latest)

# Names both of prometheus_client's writers leave as they are (no colon: OpenMetrics sample
# lines escape one); label names starting with __ are reserved and escaped by the library.
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL_NAME = re.compile(r"(?!__)[a-zA-Z_][a-zA-Z0-9_]*")
_known_label_names: set[str] = set()
_MAX_KNOWN_LABEL_NAMES = 1024
_SAMPLE_SUFFIX = {"counter": "_total", "gauge": ""}
"""The kinds the fast writers handle, and the one sample name each may have."""
_failed_families: set[str] = set()


def text(registry: Collector) -> bytes:
    """Every family of the registry in the text format 0.0.4 (generate_latest's bytes)."""
    return _page(registry, openmetrics_format=False)


def openmetrics_text(registry: Collector) -> bytes:
    """Every family in OpenMetrics 1.0.0 with `# EOF` (openmetrics.generate_latest's bytes)."""
    return _page(registry, openmetrics_format=True)


def negotiate(accept: str) -> tuple[Writer, str]:
    """The writer and content type for a request's Accept header, as prometheus_client's
    choose_encoder picks them: OpenMetrics when the client asks for it, else text 0.0.4;
    the fast writers stand in for the library's where their bytes are the same."""
    encoder, content_type = choose_encoder(accept)
    if encoder is generate_latest:
        return text, content_type
    if isinstance(encoder, partial) and encoder.keywords.get("escaping") == \
            openmetrics.UNDERSCORES and not encoder.args:
        if encoder.func is generate_latest and set(encoder.keywords) == {"escaping"}:
            return text, content_type
        if encoder.func is openmetrics.generate_latest and \
                encoder.keywords.get("version") == "1.0.0" and \
                set(encoder.keywords) == {"escaping", "version"}:
            return openmetrics_text, content_type
    return encoder, content_type


def _page(registry: Collector, openmetrics_format: bool) -> bytes:
    out: list[str] = []
    for metric in registry.collect():
        written = _family(metric, openmetrics_format)
        out.append(written if written is not None else
                   _by_the_library(metric, openmetrics_format))
    if openmetrics_format:
        out.append(_EOF)
    page = "".join(out)
    try:
        return page.encode()
    except UnicodeEncodeError:
        # a value that is not text (a lone surrogate) must not cost the page: the sources
        # clean what they read (processes.clean_text), this is the last line of defence
        return page.encode("utf-8", "replace")


def _family(metric: Metric, openmetrics_format: bool) -> str | None:
    """The family as the library writes it, or None where the fast writer does not know
    its kind, a name or a sample."""
    suffix = _SAMPLE_SUFFIX.get(metric.type)
    if suffix is None or metric.unit or not _NAME.fullmatch(metric.name):
        return None
    sample_name = metric.name + suffix
    help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    if openmetrics_format:
        help_text = help_text.replace('"', r"\"")
        name = metric.name
    else:
        name = sample_name
    lines = [f"# HELP {name} {help_text}\n# TYPE {name} {metric.type}\n"]
    known = _known_label_names
    for sample_name_, labels, value, timestamp, exemplar, native in metric.samples:
        if sample_name_ != sample_name or timestamp is not None or exemplar is not None \
                or native is not None or value is None:
            return None
        if not labels:
            lines.append(f"{sample_name} {floatToGoString(value)}\n")
            continue
        if not known.issuperset(labels) and not _label_names_known(labels):
            return None
        pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{sample_name}{{{pairs}}} {floatToGoString(value)}\n")
    return "".join(lines)


def _label_names_known(names: Iterable[str]) -> bool:
    for name in names:
        if name not in _known_label_names:
            if not _LABEL_NAME.fullmatch(name):
                return False
            if len(_known_label_names) < _MAX_KNOWN_LABEL_NAMES:
                _known_label_names.add(name)
    return True


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class _OneFamily:
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return (self._metric,)


def _by_the_library(metric: Metric, openmetrics_format: bool) -> str:
    """The family as prometheus_client's own encoder writes it; a family even that cannot
    write is left out (logged once), not the page."""
    try:
        if openmetrics_format:
            return _library_openmetrics(_OneFamily(metric)).decode().removesuffix(_EOF)
        return generate_latest(_OneFamily(metric)).decode()
    except Exception as e:  # one family must not cost the page
        if metric.name not in _failed_families:
            _failed_families.add(metric.name)
            # the library appends the family to the exception's args: not in the log line
            reason = e.args[0] if e.args else ""
            log.error("family %s left out of /metrics: prometheus_client cannot write it: "
                      "%s: %s", metric.name, type(e).__name__, reason)
        return ""
