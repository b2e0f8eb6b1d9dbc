"""gpuwatch: which GPU is free, and who holds the others, from Prometheus.

Argument parsing and output only: the fleet comes from gpuwatch.fleet, the states from
gpuwatch.contract.states, the bookings from gpuwatch.reservations (the reservations file, which
reserve, release and reservations edit without asking Prometheus). Subcommands are registered
in one table (COMMANDS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from gpuwatch import __version__, reservations
from gpuwatch.argtypes import positive_float, positive_int
from gpuwatch.contract import states
from gpuwatch.fleet import FleetError, GpuStatus, gpus_of_host, local_names, pick, read_fleet
from gpuwatch.fleet.prometheus import DEFAULT_TIMEOUT, Prometheus, PrometheusError
from gpuwatch.reservations import Reservation, ReservationError, legacy

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
                   "utilisation, reservation), for scripts")
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
    """The grid: one line per GPU, grouped by host (named once), states coloured; a column
    with the booking (who, until when, why) when a GPU shown is booked."""
    instances_of: dict[str, set[str]] = {}
    for g in gpus:
        instances_of.setdefault(g.host, set()).add(g.instance)
    booked = any(g.reservation is not None for g in gpus)
    header = ("HOST", "GPU", "STATE", "USERS", "MODEL", "MEMORY", "UTIL") + \
        (("RESERVATION",) if booked else ())
    rows: list[tuple[str, ...]] = []
    previous = None
    for g in gpus:
        node = g.host if len(instances_of[g.host]) == 1 else g.instance
        rows.append((node if node != previous else "", str(g.gpu), _state_text(g, now),
                     _users_text(g), g.display_name or "-", _memory_text(g), _util_text(g))
                    + ((g.reservation.text if g.reservation else "-",) if booked else ()))
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
    p.add_argument("count", type=positive_int, metavar="N", help="how many GPUs")
    p.add_argument("--host", metavar="NAME",
                   help="the host (its host label, or its target HOST:PORT); default: this "
                   "machine, by its host names")
    p.add_argument("--user", metavar="NAME",
                   help="GPUs reserved for NAME and not in use come first (default: you)")


def _pick(args: argparse.Namespace, out: TextIO) -> int:
    fleet = _fleet(args)
    names = [args.host] if args.host else local_names(args.prometheus)
    chosen = pick(gpus_of_host(fleet, names), args.count, args.user or getpass.getuser())
    out.write(",".join(map(str, chosen)) + "\n")
    return 0


# -- reserve, release, reservations ------------------------------------------------------------

def _file_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--file", type=Path, metavar="PATH",
                   default=os.environ.get(reservations.ENV_FILE) or None if defaults
                   else argparse.SUPPRESS,
                   help=f"the reservations file (default: ${reservations.ENV_FILE})")


def _reservations_file(args: argparse.Namespace) -> Path:
    path: Path | None = args.file
    if path is None:
        raise UserError(f"which reservations file? Pass --file PATH or set "
                        f"{reservations.ENV_FILE} (the file that the reservations endpoint "
                        "on the monitoring host reads)")
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _when(text: str, now: dt.datetime, end: bool, option: str) -> dt.datetime:
    try:
        return reservations.parse_when(text, now, end=end).replace(microsecond=0)
    except ReservationError as e:
        raise UserError(f"{option} {e}") from None


def _reserve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="HOST:GPUS",
                   help="the host as `gpuwatch status` names it and its GPUs: 0,2 or 0-3 or "
                   "all (an IPv6 address in brackets: [fe80::1]:0)")
    p.add_argument("--until", required=True, metavar="WHEN",
                   help=f"when the booking ends: {reservations.WHEN_FORMATS}")
    p.add_argument("--user", default=None, metavar="NAME",
                   help="who the GPUs are for (default: you)")
    p.add_argument("--comment", default="", metavar="TEXT", help="why, for the others")
    p.add_argument("--from", dest="start", default="now", metavar="WHEN",
                   help="when the booking starts (default: now); a date means its start")
    p.add_argument("--replace", action="store_true",
                   help="your own bookings of these GPUs give way to this one (to extend or "
                   "shorten a booking)")
    _file_arguments(p)


def _reserve(args: argparse.Namespace, out: TextIO) -> int:
    path = _reservations_file(args)
    now = _now()
    try:
        host, gpus = reservations.parse_target(args.target)
    except ReservationError as e:
        raise UserError(str(e)) from None
    user = args.user or getpass.getuser()
    if not user.strip() or any(c.isspace() for c in user):
        raise UserError(f"--user {user!r}: a user name, without spaces")
    booking = Reservation(host=host, gpus=gpus, user=user,
                          until=_when(args.until, now, True, "--until"),
                          start=_when(args.start, now, False, "--from"),
                          comment=" ".join(args.comment.split()))
    reservations.add(path, booking, now, replace_own=args.replace)
    starts = "" if booking.start is None or booking.start <= now else \
        f", from {reservations.short(booking.start)}"
    out.write(f"booked {booking.describe()}{starts}\n")
    return 0


def _release_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="HOST[:GPUS]",
                   help="the GPUs to give back (all of the host's without :GPUS)")
    p.add_argument("--user", metavar="NAME", help="only the bookings of NAME; alone: all of them")
    p.add_argument("--expired", action="store_true",
                   help="remove bookings that have ended (they no longer count; this only "
                   "tidies the file)")
    _file_arguments(p)


def _release(args: argparse.Namespace, out: TextIO) -> int:
    path = _reservations_file(args)
    host, gpus = None, None
    if args.target:
        try:
            host, gpus = reservations.parse_target(args.target, gpus_required=False)
        except ReservationError as e:
            raise UserError(str(e)) from None
    if host is None and args.user is None and not args.expired:
        raise UserError("say what to release: HOST:GPUS, --user NAME or --expired")
    done = reservations.release(path, _now(), host=host, gpus=gpus, user=args.user,
                                expired=args.expired)
    for b in done.removed:
        given, kept = b, ""
        if host is not None and gpus is not None and b.gpus is not None:
            given = replace(b, gpus=tuple(i for i in b.gpus if i in gpus))
            left = tuple(i for i in b.gpus if i not in gpus)
            if left:
                kept = f"; GPU{'s' if len(left) > 1 else ''} {reservations.gpus_text(left)} " \
                    f"stay{'' if len(left) > 1 else 's'} booked"
        out.write(f"released {given.describe()}{kept}\n")
    return 0


def _listing_arguments(p: argparse.ArgumentParser, defaults: bool) -> None:
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--json", action="store_true", default=default(False),
                   help="a JSON list of bookings, for scripts")
    p.add_argument("--all", action="store_true", default=default(False),
                   help="bookings that have ended too")
    p.add_argument("--host", default=default(None), metavar="NAME", help="only this host's")
    p.add_argument("--user", default=default(None), metavar="NAME", help="only NAME's")


def _reservations_arguments(p: argparse.ArgumentParser) -> None:
    _listing_arguments(p, defaults=True)
    _file_arguments(p)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="the bookings (the default)",
                                 description="the bookings (the default)")
    _listing_arguments(listing, defaults=False)
    _file_arguments(listing, defaults=False)
    old = actions.add_parser(
        "import", help="bookings of the old comments.json (machine -> GPU index -> name, date, "
        "comment)", description="Adds the bookings of the old comments.json to the "
        "reservations file: per machine, per GPU index, name (who), date (booked until, that "
        "day included; local time) and comment. Entries without a name are free GPUs; those "
        "that have ended are listed, not imported. Any entry that cannot be read stops the "
        "import (nothing is written) unless --skip-invalid.")
    old.add_argument("source", type=Path, metavar="comments.json")
    order = old.add_mutually_exclusive_group()
    order.add_argument("--day-first", dest="day_first", action="store_true", default=None,
                       help="read 05/06/2024 as 5 June")
    order.add_argument("--month-first", dest="day_first", action="store_false",
                       help="read 05/06/2024 as May 6")
    old.add_argument("--skip-invalid", action="store_true",
                     help="import what can be read, list the rest")
    old.add_argument("--dry-run", action="store_true", help="say what would be imported")
    _file_arguments(old, defaults=False)


def _reservations(args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "import":
        return _import(args, out)
    path = _reservations_file(args)
    now = _now()
    bookings = [b for b in reservations.load(path, now)
                if (args.all or not b.expired(now))
                and (args.host is None or b.host == args.host)
                and (args.user is None or b.user == args.user)]
    bookings.sort(key=lambda b: (b.host, -1 if b.gpus is None else b.gpus[0], b.until))
    if args.json:
        json.dump([b.to_json(now) for b in bookings], out, indent=2)
        out.write("\n")
        return 0
    if not bookings:
        out.write(f"no {'' if args.all else 'current '}bookings in {path}\n")
        return 0
    out.write(render_bookings(bookings, now, status=args.all))
    return 0


def render_bookings(bookings: Sequence[Reservation], now: dt.datetime, status: bool) -> str:
    header = ("HOST", "GPUS", "USER", "FROM", "UNTIL") + (("STATUS",) if status else ()) + \
        ("COMMENT",)
    rows = [(b.host, reservations.gpus_text(b.gpus), b.user,
             reservations.short(b.start) if b.start else "-", reservations.short(b.until))
            + ((("ended" if b.expired(now) else "active" if b.active(now) else "upcoming"),)
               if status else ())
            + (b.comment or "-",) for b in bookings]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in [header, *rows])


def _import(args: argparse.Namespace, out: TextIO) -> int:
    path = _reservations_file(args)
    now = _now()
    source: Path = args.source
    try:
        data: Any = json.loads(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{source}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{source}: not JSON: {e}") from None
    try:
        found = legacy.convert_comments(data, now, args.day_first)
    except ReservationError as e:
        raise UserError(f"{source}: {e}") from None
    for problem in found.problems:
        print(f"{PROG}: {source}: cannot import {problem}", file=sys.stderr)
    if found.problems and not args.skip_invalid:
        raise UserError(f"{source}: {len(found.problems)} entr"
                        f"{'y' if len(found.problems) == 1 else 'ies'} cannot be read (above); "
                        "nothing imported. Fix them, or import the rest with --skip-invalid")
    if args.dry_run:
        added = [b for b in found.bookings
                 if not any(replace(o, start=None) == b for o in reservations.load(path, now))]
        present = [b for b in found.bookings if b not in added]
    else:
        added, present = legacy.merge_imported(path, found.bookings, now)
    verb = "would import" if args.dry_run else "imported"
    for b in added:
        out.write(f"{verb} {b.describe()}\n")
    for b in present:
        out.write(f"already booked {b.describe()}\n")
    for old in found.expired:
        out.write(f"ended, not imported: {old}\n")
    out.write(f"{len(added)} booking{'' if len(added) == 1 else 's'} {verb}, "
              f"{len(present)} already there, {len(found.expired)} ended, "
              f"{len(found.problems)} unreadable\n")
    return 0


# -- wiring ------------------------------------------------------------------------------------

COMMANDS = (
    Command("status", "the fleet: every GPU with its state, users, memory and utilisation",
            _status_arguments, _status),
    Command("pick", "the indices of N free GPUs on this host (yours first, when you have "
            "booked some), comma-separated, for CUDA_VISIBLE_DEVICES=$(gpuwatch pick N)",
            _pick_arguments, _pick),
    Command("reserve", "book GPUs of a host for someone until a time, with a comment",
            _reserve_arguments, _reserve),
    Command("release", "give booked GPUs back (of a host, of a user, or those that ended)",
            _release_arguments, _release),
    Command("reservations", "the bookings (list), or import the old comments.json",
            _reservations_arguments, _reservations),
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
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS",
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
    except (PrometheusError, FleetError, UserError, ReservationError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (gpuwatch status | head): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code

