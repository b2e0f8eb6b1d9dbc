"""The reservations benchmark (`make bench-reservations`): what the file's reads and edits cost
at 1,000 and 10,000 bookings.

A file of N bookings is written in a temporary directory: hosts of 8 GPUs, each GPU booked
four times one after the other (so the overlap check has real neighbours to compare), with
some bookings of every GPU of a host and some that have ended. Then, each the median of a few
runs, in seconds:

- load: the file read and checked, nothing remembered from before (as one `gpuwatch` command);
- load (warm): read again unchanged (as `gpuwatch serve` does on each request);
- list: `gpuwatch reservations --file` in this process, nothing remembered;
- add: one booking added, nothing remembered (as `gpuwatch reserve --file`);
- add (warm): one added right after the last edit (as the service's next booking);
- release: that booking released by its id.

Every edit holds the lock, checks, writes the file in one step and appends to the audit log,
as in use. It prints figures and asserts nothing about them (tests/e2e/test_bench_reservations.py
runs `--quick`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import yaml

from gpuwatch import cli
from gpuwatch import reservations as store
from gpuwatch.cells import Cell
from gpuwatch.reservations import Reservation, model
from tools.bench import _environment

SIZES = (1_000, 10_000)
QUICK_SIZES = (100, 1_000)
COLUMNS = ("load", "load (warm)", "list", "add", "add (warm)", "release")
UTC = dt.timezone.utc


def bookings(count: int, now: dt.datetime) -> list[Reservation]:
    """`count` bookings that break no rule: GPU g of host h booked four times in a row; every
    32nd host booked whole; one in ten ended."""
    result: list[Reservation] = []
    index = 0
    while len(result) < count:
        host, slot = f"node-{index // 32:05d}", index % 4
        gpu = (index // 4) % 8
        start = now + dt.timedelta(days=2 * slot - (1 if index % 10 == 0 else 0) * 30)
        until = start + dt.timedelta(days=1)
        whole = (index // 32) % 32 == 31
        if whole and gpu != 0:
            index += 1
            continue
        result.append(Reservation(host=host, gpus=None if whole else (Cell(gpu),),
                                  user=f"user{index % 97}", until=until, start=start,
                                  comment="sweep" if index % 3 else ""))
        index += 1
    return result


def _median(run: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _cold() -> None:
    model._parsed.clear()


def measure(count: int, repeat: int, workdir: Path) -> dict[str, float]:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    path = workdir / f"reservations-{count}.yml"
    store.write(path, bookings(count, now))
    figures: dict[str, float] = {}

    def load_cold() -> None:
        _cold()
        store.load(path, now)

    def list_cold() -> None:
        _cold()
        cli.main(["reservations", "--file", str(path)], out=io.StringIO())

    added: list[Reservation] = []
    probe = Reservation(host="bench-node", gpus=(Cell(0),), user="bench",
                        until=now + dt.timedelta(days=1), start=now)

    def add(cold: bool) -> Callable[[], None]:
        def run() -> None:
            if added:  # leave the file as it was, outside the timing
                store.release_by_id(path, added.pop().id, now)
            if cold:
                _cold()
            started = time.perf_counter()
            added.append(store.add(path, probe, now))
            spent.append(time.perf_counter() - started)
        return run

    def release() -> None:
        if not added:
            added.append(store.add(path, probe, now))
        _cold()
        started = time.perf_counter()
        store.release_by_id(path, added.pop().id, now)
        spent.append(time.perf_counter() - started)

    figures["load"] = _median(load_cold, repeat)
    store.load(path, now)
    def load_warm() -> None:
        store.load(path, now)

    figures["load (warm)"] = _median(load_warm, repeat)
    figures["list"] = _median(list_cold, repeat)
    for name, run in (("add", add(True)), ("add (warm)", add(False)), ("release", release)):
        spent: list[float] = []
        for _ in range(repeat):
            run()
        figures[name] = statistics.median(spent)
    if added:
        store.release_by_id(path, added.pop().id, now)
    return figures


def table(sizes: Sequence[int], repeat: int, out: TextIO | None = None) -> None:
    write = (out or sys.stdout).write
    write(f"{_environment()}; libyaml: {'yes' if yaml.__with_libyaml__ else 'no'}\n")
    write(f"Reservations file: seconds, the median of {repeat} runs (lock, check, write in one "
          "step and audit log included)\n")
    header = ["bookings", *COLUMNS]
    widths = [max(len(h), 8) for h in header]
    write("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + "\n")
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-reservations-") as tmp:
        for count in sizes:
            figures = measure(count, repeat, Path(tmp))
            cells = [str(count), *(f"{figures[c]:.4f}" for c in COLUMNS)]
            write("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + "\n")
            sys.stdout.flush()
    write(f"(the lock waits {store.LOCK_TIMEOUT:g} s for another edit: every edit must be "
          "far below that)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_reservations",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"{' and '.join(map(str, QUICK_SIZES))} bookings, one run each "
                        "(a smoke test)")
    parser.add_argument("--sizes", default=None, metavar="N,N",
                        help=f"numbers of bookings (default: {','.join(map(str, SIZES))})")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="runs per figure, the median printed (default: 5, --quick: 1)")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else \
            QUICK_SIZES if args.quick else SIZES
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: numbers of bookings, e.g. 1000,10000")
    if any(n < 1 for n in sizes):
        parser.error("--sizes: at least one booking each")
    repeat = args.repeat or (1 if args.quick else 5)
    table(sizes, repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
