"""The metric names a PromQL expression reads, from a real PromQL parser (promql-parser, the
Rust parser of GreptimeDB, compatible with Prometheus 2.45's grammar): the rules tests and
the dashboard tests ask it, so both read PromQL the same way.

Grafana's queries are PromQL with template variables in them; `grafana_metric_names`
replaces them first, as the dashboard tests do before they send a query: Grafana's own
($__interval, $__range, $__rate_interval...) by the values tools.dashboards.grafana_values
gives them, a dashboard's ($host, ${host:regex}, $datasource) by a plain value (they stand in
label matchers' strings, where any value parses).
"""

from __future__ import annotations

from collections.abc import Mapping

import promql_parser

from tools.dashboards import VARIABLE, grafana_values

DASHBOARD_VARIABLE_VALUE = "value"
"""What a dashboard variable is replaced by: the expressions use them only inside strings."""


class PromQLError(ValueError):
    """An expression the parser refuses; the message names the expression."""


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: every vector selector's name (`up`, `a:b:c`, or
    `{__name__="x"}`), not functions, label names (`by`, `on`, `group_left`), keywords or
    strings."""
    try:
        tree = promql_parser.parse(expr)
    except ValueError as e:
        raise PromQLError(f"{expr!r} is not PromQL: {e}") from e
    found: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                found.add(node.name)
            found.update(m.value for m in node.matchers.matchers
                         if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal)

    promql_parser.walk(tree, visit)
    return found


def grafana_expanded(expr: str, interval_seconds: float = 15.0,
                     values: Mapping[str, str] | None = None) -> str:
    """`expr` with Grafana's variables replaced: its own by grafana_values(interval_seconds),
    those in `values` by theirs, any other by DASHBOARD_VARIABLE_VALUE."""
    known = {**grafana_values(interval_seconds), **(values or {})}
    return VARIABLE.sub(
        lambda m: known.get(next(g for g in m.groups() if g), DASHBOARD_VARIABLE_VALUE), expr)


def grafana_metric_names(expr: str, interval_seconds: float = 15.0) -> set[str]:
    """The metric names a Grafana query reads (its variables replaced first)."""
    return metric_names(grafana_expanded(expr, interval_seconds))
