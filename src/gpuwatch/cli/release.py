"""`gpuwatch release [ID | HOST[:GPUS]] [--user NAME] [--expired]`: give booked GPUs back,
through gpuwatch serve (--server) or in the reservations file (--file).

A host's GPUs are given back of your own bookings only, unless --user names whose."""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO

from gpuwatch import reservations
from gpuwatch.cells import Cell
from gpuwatch.cli import client
from gpuwatch.cli.common import Command, UserError, file_arguments, now
from gpuwatch.reservations import Gpus, Reservation, ReservationError
from gpuwatch.reservations.store import kept_cells


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="ID | HOST[:GPUS]",
                   help="the booking to give back by its id (`gpuwatch reservations` lists "
                   "them), or GPUs of a host (all of the host's without :GPUS); of your own "
                   "bookings unless --user")
    p.add_argument("--user", metavar="NAME", help="only the bookings of NAME; alone: all of them")
    p.add_argument("--expired", action="store_true",
                   help="remove bookings that have ended (they no longer count; this only "
                   "tidies the file)")
    client.server_arguments(p)
    file_arguments(p)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    where = client.service_or_file(args)
    if isinstance(where, client.Service):
        listed = client.bookings_from_api(where.get("/api/v1/reservations"), where.url)
        by_id = {b.id: b for b in listed}
        if args.target in by_id:
            where.delete(f"/api/v1/reservations/{args.target}")
            out.write(f"released {by_id[args.target].describe()}\n")
            return 0
    elif args.target and not args.user and not args.expired:
        try:
            booking = reservations.find(where, args.target, now())
        except reservations.NotFound:
            pass
        else:
            reservations.release_by_id(where, booking.id, now())
            out.write(f"released {booking.describe()}\n")
            return 0
    host, gpus = _target(args)
    if host is None and args.user is None and not args.expired:
        raise UserError("say what to release: ID, HOST:GPUS, --user NAME or --expired")
    if isinstance(where, client.Service):
        removed = _release_through(where, listed, host, gpus, args)
    else:
        user = args.user
        if user is None and host is not None and not args.expired:
            user = getpass.getuser()  # a host's GPUs: yours, unless told whose
        removed = reservations.release(where, now(), host=host, gpus=gpus, user=user,
                                       expired=args.expired).removed
    for b in removed:
        given, kept = b, ""
        if host is not None and gpus is not None and b.gpus is not None:
            left = _left(b, gpus)
            given = replace(b, gpus=tuple(c for c in b.gpus if c not in left))
            if left:
                kept = f"; {reservations.cells_phrase(left)} " \
                    f"stay{'' if len(left) > 1 else 's'} booked"
        out.write(f"released {given.describe()}{kept}\n")
    return 0


def _target(args: argparse.Namespace) -> tuple[str | None, Gpus]:
    if not args.target:
        return None, None
    try:
        return reservations.parse_target(args.target, gpus_required=False)
    except ReservationError as e:
        raise UserError(str(e)) from None


def _left(b: Reservation, gpus: Gpus) -> tuple[Cell, ...]:
    """What stays booked of `b` when `gpus` are given back."""
    return kept_cells(b.gpus or (), gpus) if gpus is not None else ()


def _release_through(service: client.Service, listed: Sequence[Reservation],
                     host: str | None, gpus: Gpus, args: argparse.Namespace
                     ) -> list[Reservation]:
    """What the file's release does, as the API's deletes: a booking that keeps some GPUs is
    booked again for those (same owner, start, end and comment)."""
    moment = now()
    mine = {n for n in (service.login, getpass.getuser()) if n}
    users = {args.user} if args.user is not None else \
        mine if host is not None and not args.expired else None
    concerned = [b for b in listed
                 if b.expired(moment) == args.expired
                 and (users is None or b.user in users)
                 and (host is None or b.shares_gpus(host, gpus))]
    if not concerned:
        what = " ".join(filter(None, [
            "ended" if args.expired else "", "booking",
            f"of {host}:{reservations.gpus_text(gpus)}" if host else "",
            f"by {' or '.join(sorted(users))}" if users else ""]))
        raise UserError(f"gpuwatch serve at {service.url}: there is no {what}; `gpuwatch "
                        f"reservations{' --all' if args.expired else ''}` lists them")
    for b in concerned:
        if host is not None and gpus is not None and b.gpus is None:
            raise UserError(f"{b.describe()} books every GPU of {b.host}; release "
                            f"{b.host}:all, then book the GPUs to keep")
        part = next((c for c in gpus or () for whole in b.gpus or ()
                     if whole.covers(c) and whole != c), None)
        if host is not None and part is not None:
            raise UserError(f"{b.describe()} books GPU {part.gpu} whole; release "
                            f"{b.host}:{part.gpu}, then book the slices to keep")
    for b in concerned:
        service.delete(f"/api/v1/reservations/{b.id}")
        left = _left(b, gpus) if host is not None else ()
        if left:
            service.post("/api/v1/reservations", client.booking_to_api(
                replace(b, gpus=left), user=b.user not in mine))
    return concerned


COMMAND = Command("release", "give booked GPUs back (by id, of a host, of a user, or those that "
                  "ended)", _arguments, _run)
