"""`gpuwatch reservations [list]`: the reservations of the file, as a table or as JSON; and
the `import` action (gpuwatch.cli.import_)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from typing import TextIO

from gpuwatch import reservations
from gpuwatch.cli import import_
from gpuwatch.cli.common import (
    Command,
    default_or_suppress,
    file_arguments,
    now,
    reservations_file,
)
from gpuwatch.reservations import Reservation


def _listing_arguments(p: argparse.ArgumentParser, defaults: bool) -> None:
    default = default_or_suppress(defaults)
    p.add_argument("--json", action="store_true", default=default(False),
                   help="a JSON list of bookings, for scripts")
    p.add_argument("--all", action="store_true", default=default(False),
                   help="bookings that have ended too")
    p.add_argument("--host", default=default(None), metavar="NAME", help="only this host's")
    p.add_argument("--user", default=default(None), metavar="NAME", help="only NAME's")


def _arguments(p: argparse.ArgumentParser) -> None:
    _listing_arguments(p, defaults=True)
    file_arguments(p)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="the bookings (the default)",
                                 description="the bookings (the default)")
    _listing_arguments(listing, defaults=False)
    file_arguments(listing, defaults=False)
    import_.add_arguments(actions.add_parser("import", help=import_.HELP,
                                             description=import_.DESCRIPTION))


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "import":
        return import_.run(args, out)
    path = reservations_file(args)
    moment = now()
    listed = [b for b in reservations.load(path, moment)
              if (args.all or not b.expired(moment))
              and (args.host is None or b.host == args.host)
              and (args.user is None or b.user == args.user)]
    listed.sort(key=lambda b: (b.host, -1 if b.gpus is None else b.gpus[0], b.until))
    if args.json:
        json.dump([b.to_json(moment) for b in listed], out, indent=2)
        out.write("\n")
        return 0
    if not listed:
        out.write(f"no {'' if args.all else 'current '}bookings in {path}\n")
        return 0
    out.write(render_reservations(listed, moment, status=args.all))
    return 0


def render_reservations(listed: Sequence[Reservation], now: dt.datetime, status: bool) -> str:
    header = ("HOST", "GPUS", "USER", "FROM", "UNTIL") + (("STATUS",) if status else ()) + \
        ("COMMENT",)
    rows = [(b.host, reservations.gpus_text(b.gpus), b.user,
             reservations.short(b.start) if b.start else "-", reservations.short(b.until))
            + ((("ended" if b.expired(now) else "active" if b.active(now) else "upcoming"),)
               if status else ())
            + (b.comment or "-",) for b in listed]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in [header, *rows])


COMMAND = Command("reservations", "the bookings (list), or import the old comments.json",
                  _arguments, _run)
