"""The one rendering of prometheus.yml: the repository's prometheus/prometheus.yml with what a
deployment changes. The gpuwatch_prometheus role calls it as the filter
`gpuwatch_prometheus_config`; the local stack of the demo and the tests (tools/localstack.py)
imports this file and calls `prometheus_config` with its own settings.

Plain Python without Ansible imports (Ansible's data arrives as dicts, lists and strings).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

JOB_INTERVALS = ("scrape_interval", "scrape_timeout")
"""Settings a job may carry itself, which `global_settings` then overrides in every job."""

PROMETHEUS_JOB = "prometheus"
"""The self-scrape job of prometheus.yml: Prometheus' own metrics."""
ALERTMANAGER_JOB = "alertmanager"
"""The job of prometheus.yml that scrapes the Alertmanagers Prometheus sends alerts to."""
RUNBOOK_URL_LABEL = "runbook_url"
"""The external label the alerts' runbook_url annotations start with
(`{{ $externalLabels.runbook_url }}#anchor`)."""


def _plain(value: Any) -> Any:
    """A deep copy as dicts, lists and scalars (whatever container types came in)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merged(base: Any, changes: Any) -> Any:
    """`changes` merged into `base`: mappings key by key, all else (lists too) replaced, as
    Ansible's combine(recursive=true) does."""
    if not (isinstance(base, dict) and isinstance(changes, Mapping)):
        return _plain(changes)
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(merged[key], value) if key in merged else _plain(value)
    return merged


def _in_dir(path: str, directory: str) -> str:
    """A relative path of the source as the file of that name in `directory`; absolute paths
    are kept."""
    if path.startswith("/"):
        return path
    return f"{directory.rstrip('/')}/{path.rsplit('/', 1)[-1]}"


def prometheus_config(source: Mapping[str, Any], rules_dir: str, file_sd_dir: str,
                      scrape_config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                      global_settings: Mapping[str, Any] | None = None,
                      file_sd_settings: Mapping[str, Any] | None = None,
                      remote_write: Sequence[Mapping[str, Any]] | None = None,
                      without_jobs: Collection[str] = (),
                      alertmanagers: Sequence[str] | None = None,
                      alertmanager_client: Mapping[str, Any] | None = None,
                      prometheus_address: str | None = None,
                      prometheus_client: Mapping[str, Any] | None = None,
                      runbook_url: str | None = None) -> dict[str, Any]:
    """prometheus.yml from the repository's `source` (parsed):

    - relative rule_files as the files of those names in `rules_dir`, relative file_sd_configs
      files in `file_sd_dir` (Prometheus would read relative paths next to the source);
    - `global_settings` merged into `global` (a scrape interval or timeout there also replaces
      the one a job sets);
    - `file_sd_settings` (e.g. refresh_interval) merged into every file_sd_configs entry;
    - `scrape_config_overrides`, per job_name, merged into that job (after the paths);
    - the jobs in `without_jobs` left out;
    - `remote_write` appended to the source's remote_write blocks, when there are any;
    - `alertmanagers` (HOST:PORT each) as the targets of every alerting.alertmanagers entry and
      of the ALERTMANAGER_JOB; `alertmanager_client` (HTTP client settings as Prometheus takes
      them: basic_auth, scheme, tls_config, ...) merged into both, for an Alertmanager behind
      its own web config;
    - `prometheus_address` (HOST:PORT) as the target of the PROMETHEUS_JOB and
      `prometheus_client` merged into that job, for a Prometheus behind its own web config;
    - `runbook_url` as the external label RUNBOOK_URL_LABEL.

    Scrape overrides are merged last and win. Raises ValueError when an override or an
    omission names a job the source does not have, when Alertmanager or self-scrape settings
    are given for a source without the alerting block or the job they change, or when a
    target is not HOST:PORT.
    """
    config: dict[str, Any] = _plain(source)
    overrides = _plain(scrape_config_overrides or {})
    settings = _plain(global_settings or {})
    jobs = config.get("scrape_configs") or []
    names = [job.get("job_name") for job in jobs]
    asked = set(overrides) | set(without_jobs)
    if alertmanagers is not None or alertmanager_client:
        asked.add(ALERTMANAGER_JOB)
    if prometheus_address is not None or prometheus_client:
        asked.add(PROMETHEUS_JOB)
    unknown = sorted(asked - set(names))
    if unknown:
        raise ValueError(f"prometheus.yml has no scrape job {', '.join(unknown)} "
                         f"(its jobs: {', '.join(map(str, names))})")
    for target in [*(alertmanagers or []), *([prometheus_address] if prometheus_address else [])]:
        _check_target(target)
    service_jobs = {
        ALERTMANAGER_JOB: _service(alertmanagers, alertmanager_client),
        PROMETHEUS_JOB: _service(None if prometheus_address is None else [prometheus_address],
                                 prometheus_client)}
    rendered = []
    for job in jobs:
        if job.get("job_name") in without_jobs:
            continue
        for key in JOB_INTERVALS:
            if key in settings:
                job.pop(key, None)
        if "file_sd_configs" in job:
            job["file_sd_configs"] = [
                _merged({**sd, "files": [_in_dir(f, file_sd_dir) for f in sd.get("files", [])]},
                        file_sd_settings or {})
                for sd in job["file_sd_configs"]]
        job = _merged(job, service_jobs.get(job.get("job_name"), {}))
        rendered.append(_merged(job, overrides.get(job.get("job_name"), {})))
    config["rule_files"] = [_in_dir(f, rules_dir) for f in config.get("rule_files") or []]
    config["scrape_configs"] = rendered
    if settings:
        config["global"] = _merged(config.get("global") or {}, settings)
    if remote_write:
        config["remote_write"] = (config.get("remote_write") or []) + _plain(remote_write)
    if config.get("remote_write"):
        config["remote_write"] = [remote_write_block(block) for block in config["remote_write"]]
    if runbook_url is not None:
        config["global"] = _merged(config.get("global") or {},
                                   {"external_labels": {RUNBOOK_URL_LABEL: runbook_url}})
    if alertmanagers is not None or alertmanager_client:
        config["alerting"] = _alerting(config.get("alerting"),
                                       _service(alertmanagers, alertmanager_client))
    return config


def remote_write_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """A remote_write block that leaves out the RUNBOOK_URL_LABEL external label.

    Prometheus adds its external labels to every series it sends; that one is there for the
    alerts' runbook links only, and on every series of VictoriaMetrics, Thanos or Mimir it
    would be one more label to match, differing from the series Prometheus itself answers.
    """
    out: dict[str, Any] = _plain(block)
    drop = {"action": "labeldrop", "regex": RUNBOOK_URL_LABEL}
    relabel = list(out.get("write_relabel_configs") or [])
    if drop not in relabel:
        relabel.append(drop)
    out["write_relabel_configs"] = relabel
    return out


def _check_target(target: object) -> None:
    if not (isinstance(target, str) and ":" in target and target.rsplit(":", 1)[1].isdigit()
            and "/" not in target and target.rsplit(":", 1)[0]):
        raise ValueError(f"{target!r} is not HOST:PORT (a target, e.g. 127.0.0.1:9093)")


def _service(targets: Sequence[str] | None, client: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a service's scrape job and alerting entry take: its targets (when given; they
    replace the source's static_configs) and the HTTP client settings that reach it."""
    settings: dict[str, Any] = _plain(client or {})
    if targets is not None:
        settings["static_configs"] = [{"targets": list(targets)}]
    return settings


def _alerting(source: Any, service: Mapping[str, Any]) -> dict[str, Any]:
    """The source's alerting block with `service` merged into each Alertmanager entry."""
    if not isinstance(source, Mapping) or not source.get("alertmanagers"):
        raise ValueError("prometheus.yml has no alerting.alertmanagers block to point at the "
                         "Alertmanagers")
    alerting: dict[str, Any] = _plain(source)
    alerting["alertmanagers"] = [_merged(entry, service) for entry in alerting["alertmanagers"]]
    return alerting


class FilterModule:
    """gpuwatch_prometheus_config."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"gpuwatch_prometheus_config": prometheus_config}
