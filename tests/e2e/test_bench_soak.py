"""`make bench-soak` runs: a short soak prints the checkpoints and the before/after figures.

Figures depend on the machine; they are printed, never checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys

from fakenvml import GCC


def test_a_short_soak_prints_rss_threads_and_fds_before_and_after() -> None:
    done = subprocess.run([sys.executable, "-m", "tools.bench_soak", "--scrapes", "50",
                           "--gpus", "2", "--processes", "2", "--churn-every", "10"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    if GCC is not None:
        assert "fake libnvidia-ml through nvidia-ml-py" in out, out
        assert re.search(r"processes started on the GPUs: \d+$", out, re.MULTILINE), out
    # scrapes, RSS, peak RSS, threads, fds, CPU: before (0) and after (50)
    for scrapes in (0, 50):
        assert re.search(rf"^\s*{scrapes}\s+\d+\.\d\s+\d+\.\d\s+\d+\s+\d+\s+\d+\.\d$", out,
                         re.MULTILINE), f"no checkpoint at {scrapes} scrapes:\n{out}"
    assert re.search(r"RSS: \d+\.\d -> \d+\.\d MiB", out), out
    assert re.search(r"threads: \d+ -> \d+", out), out
    assert re.search(r"fds: \d+ -> \d+", out), out
    assert re.search(r"scrapes: 50 \(0 failed\)", out), out
