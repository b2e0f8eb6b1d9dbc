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
                      without_jobs: Collection[str] = ()) -> dict[str, Any]:
    """prometheus.yml from the repository's `source` (parsed):

    - relative rule_files as the files of those names in `rules_dir`, relative file_sd_configs
      files in `file_sd_dir` (Prometheus would read relative paths next to the source);
    - `global_settings` merged into `global` (a scrape interval or timeout there also replaces
      the one a job sets);
    - `file_sd_settings` (e.g. refresh_interval) merged into every file_sd_configs entry;
    - `scrape_config_overrides`, per job_name, merged into that job (after the paths);
    - the jobs in `without_jobs` left out;
    - `remote_write` appended to the source's remote_write blocks, when there are any.

    Raises ValueError when an override or an omission names a job the source does not have.
    """
    config: dict[str, Any] = _plain(source)
    overrides = _plain(scrape_config_overrides or {})
    settings = _plain(global_settings or {})
    jobs = config.get("scrape_configs") or []
    names = [job.get("job_name") for job in jobs]
    unknown = sorted((set(overrides) | set(without_jobs)) - set(names))
    if unknown:
        raise ValueError(f"prometheus.yml has no scrape job {', '.join(unknown)} "
                         f"(its jobs: {', '.join(map(str, names))})")
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
        rendered.append(_merged(job, overrides.get(job.get("job_name"), {})))
    config["rule_files"] = [_in_dir(f, rules_dir) for f in config.get("rule_files") or []]
    config["scrape_configs"] = rendered
    if settings:
        config["global"] = _merged(config.get("global") or {}, settings)
    if remote_write:
        config["remote_write"] = (config.get("remote_write") or []) + _plain(remote_write)
    return config


class FilterModule:
    """gpuwatch_prometheus_config."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"gpuwatch_prometheus_config": prometheus_config}
