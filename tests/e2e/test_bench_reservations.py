"""`make bench-reservations` runs: a quick run prints the figures of each size.

Figures depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys

from paths import REPO


def test_a_quick_run_prints_load_list_add_and_release_for_each_size() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench_reservations", "--quick"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"^\s*bookings\s+load\s+load \(warm\)\s+list\s+add\s+add \(warm\)\s+"
                     r"release$", out, re.MULTILINE), out
    for size in (100, 1000):
        assert re.search(rf"^\s*{size}(\s+\d+\.\d{{4}}){{6}}$", out, re.MULTILINE), \
            f"no figures for {size} bookings:\n{out}"
    assert "libyaml: " in out, out


def test_sizes_are_checked() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench_reservations", "--sizes", "x"],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 2 and "--sizes 'x': numbers of bookings" in done.stderr
