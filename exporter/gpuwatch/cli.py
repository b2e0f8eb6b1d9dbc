"""gpuwatch: which GPU is free, and who holds the others, from Prometheus.

Argument parsing and output only: the fleet comes from gpuwatch.fleet, the states from
gpuwatch.states. Subcommands are registered in one table (COMMANDS) so reserve, release and
reservations can join status and pick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from . import __version__, states
from .fleet import FleetError, GpuStatus, gpus_of_host, local_names, pick, read_fleet
from .promapi import DEFAULT_TIMEOUT, Prometheus, PrometheusError

PROG = "gpuwatch"
ENV_PROMETHEUS = "GPUWATCH_PROMETHEUS"
DEFAULT_PROMETHEUS = "http://localhost:9090"

_ANSI = {"green": "32", "yellow": "33", "purple": "35", "blue": "34", "red": "31"}
GIB = float(1 << 30)


class UserError(Exception):
    """Something to tell the user in one line, then exit 1."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


# -- status ------------------------------------------------------------------------------------

def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="one JSON object per GPU (host, gpu, state, users, model, memory, "
                   "utilisation), for scripts")
    p.add_argument("--free", action="store_true", help="only the free GPUs")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the states: auto (when the output is a terminal and NO_COLOR "
                   "is not set), always or never")


def _status(args: argparse.Namespace, out: TextIO) -> int:
    fleet = _fleet(args)
    shown = [g for g in fleet if g.state == states.FREE.name] if args.free else fleet
    if args.json:
        json.dump([g.to_json() for g in shown], out, indent=2)
        out.write("\n")
        return 0
    colour = args.color == "always" or (
        args.color == "auto" and out.isatty() and not os.environ.get("NO_COLOR"))
    out.write(render_grid(shown, colour=colour, now=time.time()))
    out.write(summary(fleet) + "\n")
    return 0


def render_grid(gpus: Sequence[GpuStatus], colour: bool, now: float) -> str:
    """The grid: one line per GPU, grouped by host (named once), states coloured."""
    instances_of: dict[str, set[str]] = {}
    for g in gpus:
        instances_of.setdefault(g.host, set()).add(g.instance)
    header = ("HOST", "GPU", "STATE", "USERS", "MODEL", "MEMORY", "UTIL")
    rows: list[tuple[str, ...]] = []
    previous = None
    for g in gpus:
        node = g.host if len(instances_of[g.host]) == 1 else g.instance
        rows.append((node if node != previous else "", str(g.gpu), _state_text(g, now),
                     _users_text(g), g.display_name or "-", _memory_text(g), _util_text(g)))
        previous = node
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 5, 6}  # numbers

    def line(cells: tuple[str, ...], state: str | None = None) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            text = cell.rjust(width) if i in right else cell.ljust(width)
            if i == 2 and state is not None and colour:
                text = _paint(text, state)
            out.append(text)
        return "  ".join(out).rstrip() + "\n"

    return line(header) + "".join(line(r, g.state) for r, g in zip(rows, gpus, strict=True))


def summary(fleet: Sequence[GpuStatus]) -> str:
    hosts = len({g.instance for g in fleet})
    counts = [f"{sum(g.state == s.name for g in fleet)} {s.name}" for s in states.ALL
              if any(g.state == s.name for g in fleet)]
    return (f"{len(fleet)} GPU{'' if len(fleet) == 1 else 's'} on {hosts} "
            f"host{'' if hosts == 1 else 's'}: {', '.join(counts) or 'none'}")


def _state_text(g: GpuStatus, now: float) -> str:
    if g.state == states.IDLE.name and g.inactive_since is not None:
        return f"{g.state} {duration(now - g.inactive_since)}"
    return g.state


def _users_text(g: GpuStatus) -> str:
    if g.users:
        return ",".join(g.users)
    # held, but by no process the exporter could see (another PID namespace)
    return "?" if g.state in (states.BUSY.name, states.IDLE.name) else "-"


def _memory_text(g: GpuStatus) -> str:
    if g.memory_used_bytes is None or g.memory_total_bytes is None:
        return "-"
    return f"{g.memory_used_bytes / GIB:.1f}/{g.memory_total_bytes / GIB:.1f} GiB"


def _util_text(g: GpuStatus) -> str:
    return "-" if g.utilization_ratio is None else f"{g.utilization_ratio * 100:.0f}%"


def _paint(text: str, state: str) -> str:
    known = states.BY_NAME.get(state)
    code = _ANSI.get(known.colour) if known else None
    return f"\033[{code}m{text}\033[0m" if code else text


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h05m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# -- pick --------------------------------------------------------------------------------------

def _pick_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("count", type=_positive_int, metavar="N", help="how many GPUs")
    p.add_argument("--host", metavar="NAME",
                   help="the host (its host label, or its target HOST:PORT); default: this "
                   "machine, by its host names")


def _pick(args: argparse.Namespace, out: TextIO) -> int:
    fleet = _fleet(args)
    names = [args.host] if args.host else local_names(args.prometheus)
    out.write(",".join(map(str, pick(gpus_of_host(fleet, names), args.count))) + "\n")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


# -- wiring ------------------------------------------------------------------------------------

COMMANDS = (
    Command("status", "the fleet: every GPU with its state, users, memory and utilisation",
            _status_arguments, _status),
    Command("pick", "the indices of N free GPUs on this host, comma-separated, for "
            "CUDA_VISIBLE_DEVICES=$(gpuwatch pick N)", _pick_arguments, _pick),
)


def _fleet(args: argparse.Namespace) -> list[GpuStatus]:
    fleet = read_fleet(Prometheus(args.prometheus, args.timeout))
    if not fleet:
        raise UserError(f"Prometheus at {args.prometheus} knows no GPUs (no "
                        f"{states.STATE_INFO} series): are the gpuwatch rules loaded and the "
                        "exporters in its targets?")
    return fleet


def _common_arguments(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Options accepted before and after the command; the defaults live on the top level."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--prometheus", metavar="URL",
                   default=default(os.environ.get(ENV_PROMETHEUS) or DEFAULT_PROMETHEUS),
                   help=f"the Prometheus to ask (default: ${ENV_PROMETHEUS}, else "
                   f"{DEFAULT_PROMETHEUS})")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   default=default(DEFAULT_TIMEOUT),
                   help=f"how long to wait for Prometheus (default {DEFAULT_TIMEOUT:g})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Which GPU is free right now, and who "
                                "holds the others: the GPU fleet from Prometheus.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common_arguments(p, defaults=True)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        _common_arguments(sub, defaults=False)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args, out or sys.stdout)
    except (PrometheusError, FleetError, UserError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (gpuwatch status | head): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
