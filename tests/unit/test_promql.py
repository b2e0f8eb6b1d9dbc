"""tests/promql.py: the metric names a PromQL expression (or a Grafana query) reads."""

from __future__ import annotations

import pytest
from promql import PromQLError, grafana_expanded, grafana_metric_names, metric_names


def test_names_inside_nested_functions_aggregations_and_subqueries() -> None:
    expr = ("max_over_time(sum by (host) (rate(nvidia_gpu_energy_joules_total[5m]))[1h:1m]) "
            "/ clamp_min(abs(-nvidia_gpu_power_limit_watts offset 1m), 1)")
    assert metric_names(expr) == {"nvidia_gpu_energy_joules_total",
                                  "nvidia_gpu_power_limit_watts"}


def test_label_names_of_by_on_and_group_left_are_not_names() -> None:
    expr = ('sum by (job, user) (nvidia_gpu_up) * on (instance) group_left (model) '
            'count without (gpu) (nvidia_gpu_info) unless ignoring (pid) '
            'nvidia_gpu_ecc_errors_total')
    assert metric_names(expr) == {"nvidia_gpu_up", "nvidia_gpu_info",
                                  "nvidia_gpu_ecc_errors_total"}


def test_recording_rule_names_with_colons_are_names() -> None:
    assert metric_names("instance_gpu:gpuwatch_state:code == 3") == \
        {"instance_gpu:gpuwatch_state:code"}


def test_strings_keywords_numbers_and_functions_are_not_names() -> None:
    expr = ('label_replace(x:y:z{a="up"}, "a", "$1", "b", "(nvidia_.+)") > bool 1e9 '
            'or vector(time()) or absent(up{job="gpuwatch"})')
    assert metric_names(expr) == {"x:y:z", "up"}


def test_a_name_given_as_a_matcher_counts() -> None:
    assert metric_names('{__name__="nvidia_gpu_up", gpu="0"} or {__name__=~"nvidia_.*"}') == \
        {"nvidia_gpu_up"}


def test_an_expression_that_is_not_promql_is_one_clear_error() -> None:
    with pytest.raises(PromQLError, match=r"'sum\(up' is not PromQL"):
        metric_names("sum(up")


def test_grafana_variables_are_replaced_before_parsing() -> None:
    expr = ('sum by (user) (sum_over_time(user:gpuwatch_gpus_held:count{user=~"$user", '
            'host=~"${host:regex}"}[$__range:$__interval])) * $__interval_ms / 3600000 '
            '+ rate(nvidia_gpu_energy_joules_total{cluster=~"[[cluster]]"}[$__rate_interval])')
    assert "$" not in grafana_expanded(expr) and "[[" not in grafana_expanded(expr)
    assert "[3600s:1s]" in grafana_expanded(expr, 1.0)
    assert grafana_metric_names(expr) == {"user:gpuwatch_gpus_held:count",
                                          "nvidia_gpu_energy_joules_total"}


def test_given_variable_values_are_used() -> None:
    assert grafana_expanded('up{host="$host"}', values={"host": "ws-01"}) == 'up{host="ws-01"}'
