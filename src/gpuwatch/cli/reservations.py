"""`gpuwatch reservations [list] [--history]`: the bookings, through gpuwatch serve (--server)
or of the file (--file), as a table or as JSON, or the audit log; and the `import` action
(gpuwatch.cli.import_)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from gpuwatch import reservations
from gpuwatch.cli import client, import_
from gpuwatch.cli.common import Command, default_or_suppress, file_arguments, now
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
    listed.sort(key=lambda b: (b.host, (-1, -1) if b.gpus is None else b.gpus[0].sort_key(),
                               b.until))
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
    """The audit log, oldest first: GET /api/v1/history (yours, or everyone's for an admin),
    or the log beside --file."""
    if isinstance(where, client.Service):
        answer = where.get("/api/v1/history")
        entries = answer.get("entries") if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise client.ServiceError(f"{where.url}/api/v1/history did not answer a list of "
                                      "entries; is it gpuwatch serve?")
        source: str = where.url
    else:
        entries = reservations.history(where)
        source = str(reservations.audit_path(where))
    url = source
    shown = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        booked = _bookings(entry, "reservations", url)
        if (args.host is None or any(b.host == args.host for b in booked)) and \
                (args.user is None or entry.get("who") == args.user
                 or any(b.user == args.user for b in booked)):
            shown.append(entry)
    if args.json:
        json.dump(shown, out, indent=2)
        out.write("\n")
        return 0
    if not shown:
        out.write(f"no history in {source}\n")
        return 0
    for entry in shown:
        out.write(history_line(entry, url) + "\n")
    return 0


def _bookings(entry: dict[str, Any], key: str, url: str) -> list[Reservation]:
    """The bookings an entry names under `key`; those it cannot read are left out (an old
    or hand-made line still shows who did what, when)."""
    found = []
    for raw in entry.get(key) or () if isinstance(entry.get(key), list) else ():
        with contextlib.suppress(client.ServiceError):
            found.append(client.booking_from_api(raw, url))
    return found


def history_line(entry: dict[str, Any], url: str) -> str:
    """One entry of the audit log: when, who, what, which bookings (with what stayed or went),
    from where: `2024-05-20 09:12+02:00 alice release GPU 1 of n1 for alice until ... [id]
    (GPU 0 stays) from 10.0.0.5`."""
    def text(key: str) -> str:
        value = entry.get(key)
        return "" if value is None else " ".join(str(value).split())
    when = text("time")
    with contextlib.suppress(ValueError):
        when = reservations.short(dt.datetime.fromisoformat(when))

    def listed(key: str) -> str:
        return "; ".join(f"{b.describe()} [{b.id}]" for b in _bookings(entry, key, url))
    kept, removed = listed("kept"), listed("removed")
    parts = [when, text("who") or "?", text("action") or "?", listed("reservations")]
    if kept:
        parts.append(f"(kept: {kept})")
    if removed:
        parts.append(f"(removed: {removed})")
    if text("from"):
        parts.append(f"from {text('from')}")
    return " ".join(p for p in parts if p)


COMMAND = Command("reservations", "the bookings (list), or import the old comments.json",
                  _arguments, _run)
