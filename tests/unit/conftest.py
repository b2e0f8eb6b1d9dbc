"""Fixtures the unit tests of the commands share."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from gpuwatch import reservations


@pytest.fixture
def rfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty reservations file that the commands use ($GPUWATCH_RESERVATIONS), as alice."""
    path = tmp_path / "reservations.yml"
    monkeypatch.setenv(reservations.ENV_FILE, str(path))
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    return path
