"""Reading gpuwatch's Grafana provisioning files: the shipped ones under grafana/provisioning/
and the copies run-grafana, the Ansible role and the demo write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def provisioned(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the datasource, the dashboard provider) of the provisioning files below `root` (a
    provisioning directory: datasources/ and dashboards/ in it)."""
    (source,) = yaml.safe_load((root / "datasources/gpuwatch.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((root / "dashboards/gpuwatch.yml").read_text())["providers"]
    return dict(source), dict(provider)
