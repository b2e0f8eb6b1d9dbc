"""Shared by every test folder: the repository's tools (`tools/`, run from a checkout and not
shipped in the wheel) are importable here and in the processes the tests start."""

from __future__ import annotations

import os

from paths import REPO

os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
