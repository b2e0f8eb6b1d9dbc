"""`gpuwatch reservations [list] [--history]`: the bookings, through gpuwatch serve (--server)
or of the file (--file), as a table or as JSON, or the audit log; and the `import` action
(gpuwatch.cli.import_)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from gpuwatch import reservations
from gpuwatch.cli import client, import_
from gpuwatch.cli.common import Command, UserError, default_or_suppress, file_arguments, now
from gpuwatch.reservations import Reservation


def _listing_arguments(p: argparse.ArgumentParser, defaults: bool) -> None:
    default = default_or_suppress(defaults)
    p.add_argument("--json", action="store_true", default=default(False),
                   help="a JSON list of bookings, for scripts")
    p.add_argument("--all", action="store_true", default=default(False),
                   help="bookings that have ended too")
    p.add_argument("--host", default=default(None), metavar="NAME", help="only this host's")
    p.add_argument("--user", default=default(None), metavar="NAME", help="only NAME's")
    p.add_argument("--history", action="store_true", default=default(False),
                   help="the audit log instead: who booked, changed or released what, when, "
                   "from where")


def _arguments(p: argparse.ArgumentParser) -> None:
    _listing_arguments(p, defaults=True)
    client.server_arguments(p)
    file_arguments(p)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="the bookings (the default)",
                                 description="the bookings (the default)")
    _listing_arguments(listing, defaults=False)
    client.server_arguments(listing, defaults=False)
    file_arguments(listing, defaults=False)
    import_.add_arguments(actions.add_parser("import", help=import_.HELP,
                                             description=import_.DESCRIPTION))


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "import":
        return import_.run(args, out)
    where = client.service_or_file(args)
    if args.history:
        return _history(where, args, out)
    moment = now()
    service = isinstance(where, client.Service)
    every = client.bookings_from_api(where.get("/api/v1/reservations"), where.url) \
        if isinstance(where, client.Service) else reservations.load(where, moment)
    listed = [b for b in every
              if (args.all or not b.expired(moment))
              and (args.host is None or b.host == args.host)
              and (args.user is None or b.user == args.user)]
    listed.sort(key=lambda b: (b.host, -1 if b.gpus is None else b.gpus[0], b.until))
    if args.json:
        json.dump([{"id": b.id} | b.to_json(moment) for b in listed], out, indent=2)
        out.write("\n")
        return 0
    if not listed:
        source = where.url if isinstance(where, client.Service) else where
        out.write(f"no {'' if args.all else 'current '}bookings in {source}\n")
        return 0
    out.write(render_reservations(listed, moment, status=args.all, ids=service))
    return 0


def render_reservations(listed: Sequence[Reservation], now: dt.datetime, status: bool,
                        ids: bool = False) -> str:
    """The table; with `ids`, the booking's id first (what `gpuwatch release ID` takes)."""
    header = (("ID",) if ids else ()) + ("HOST", "GPUS", "USER", "FROM", "UNTIL") \
        + (("STATUS",) if status else ()) + ("COMMENT",)
    rows = [((b.id,) if ids else ())
            + (b.host, reservations.gpus_text(b.gpus), b.user,
               reservations.short(b.start) if b.start else "-", reservations.short(b.until))
            + ((("ended" if b.expired(now) else "active" if b.active(now) else "upcoming"),)
               if status else ())
            + (b.comment or "-",) for b in listed]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in [header, *rows])


def _history(where: client.Service | Path, args: argparse.Namespace, out: TextIO) -> int:
    """The audit log, oldest first: GET /api/v1/history, or the log beside --file."""
    if isinstance(where, client.Service):
        answer = where.get("/api/v1/history")
        entries = answer.get("entries") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise client.ServiceError(f"{where.url}/api/v1/history did not answer a list of "
                                      "entries; is it gpuwatch serve?")
    else:
        read = getattr(reservations, "history", None)  # the store's audit log reader
        if read is None:
            raise UserError("this gpuwatch cannot read the audit log of a file; ask gpuwatch "
                            "serve (--server)")
        entries = [dict(e) for e in read(where)]
    entries = [e for e in entries if isinstance(e, dict)
               and (args.host is None or e.get("host") == args.host)
               and (args.user is None or args.user in (e.get("user"), e.get("by")))]
    if args.json:
        json.dump(entries, out, indent=2)
        out.write("\n")
        return 0
    if not entries:
        out.write(f"no history in {where.url if isinstance(where, client.Service) else where}\n")
        return 0
    for e in entries:
        out.write(history_line(e) + "\n")
    return 0


def history_line(entry: dict[str, Any]) -> str:
    """One entry of the audit log as a line: when, who, what, from where."""
    def text(key: str) -> str:
        value = entry.get(key)
        return "" if value is None else " ".join(str(value).split())
    what = text("what") or text("action")
    booking = entry.get("reservation") or entry.get("booking")
    detail = text("describe") or (json.dumps(booking, sort_keys=True) if booking else "")
    where = f" from {text('from')}" if text("from") else ""
    return " ".join(filter(None, [text("when") or text("time"), text("who") or text("by"),
                                  what, detail])) + where


COMMAND = Command("reservations", "the bookings (list), or import the old comments.json",
                  _arguments, _run)
