"""`make bench-page` runs: a quick run (100 GPUs, two page loads in Debian's Chromium) prints
every figure and the target line, and writes them as JSON.

Timings depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from paths import REPO

FIGURES = ("first render", "first render max", "page loaded", "fleet answer",
           "render after the answer", "re-render (refresh)", "re-render (filter)")


def test_a_quick_run_prints_every_figure(chromium: str, tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench_page", "--quick",
                           "--json", str(figures)],
                          capture_output=True, text=True, timeout=240, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"^Chromium \S+ headless, 1280x900; 100 GPUs on 13 hosts; "
                     r"/api/v1/fleet \d+ KiB; median of 2 page loads$", out, re.MULTILINE), out
    for name in FIGURES:
        assert re.search(rf"^\s+{re.escape(name)}\s+\d+\.\d ms$", out, re.MULTILINE), name
    assert re.search(r"^Target: first render of 100 GPUs under 1000 ms: (met|MISSED)$", out,
                     re.MULTILINE), out
    written = json.loads(figures.read_text())
    assert written["gpus"] == 100 and written["runs"] == 2
    assert set(FIGURES) <= set(written)
    assert all(written[name] >= 0 for name in FIGURES), written


def test_sizes_are_checked() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench_page", "--gpus", "0"],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 2 and "--gpus and --runs must be at least 1" in done.stderr
