"""A Prometheus client that answers from a list of series, for tests of the fleet reader.

It answers the instant queries the reader asks (a name, timestamp(name) and
{__name__=~"a|b"}) as Prometheus would, without a server.
"""

from __future__ import annotations

import re

from gpuwatch.fleet.prometheus import Prometheus, Sample


class SeriesPrometheus(Prometheus):
    """Answers the reader's instant queries from `samples`, as Prometheus would."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")
        self.samples: list[Sample] = []

    def add(self, metric: str, value: float, **labels: str) -> None:
        self.samples.append(Sample({"__name__": metric, **labels}, value, 0.0))

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        stamp = re.fullmatch(r"timestamp\(([\w:]+)\)", expr)
        if stamp:
            return [Sample({k: v for k, v in s.labels.items() if k != "__name__"}, 1e9)
                    for s in self.samples if s.labels["__name__"] == stamp.group(1)]
        selector = re.fullmatch(r'\{__name__=~"([^"]*)"\}', expr)
        names = set(selector.group(1).split("|")) if selector else {expr}
        return [s for s in self.samples if s.labels["__name__"] in names]
