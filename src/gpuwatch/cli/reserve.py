"""`gpuwatch reserve HOST:GPUS --until WHEN`: book GPUs or MIG slices, through gpuwatch serve
(--server) or in the reservations file (--file, the admin on the monitoring host)."""

from __future__ import annotations

import argparse
import getpass
from typing import TextIO

from gpuwatch import reservations
from gpuwatch.cli import client
from gpuwatch.cli.common import Command, UserError, file_arguments, now, when
from gpuwatch.contract.states import ALL_GPUS
from gpuwatch.reservations import Reservation, ReservationError


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="HOST:GPUS",
                   help="the host as `gpuwatch status` names it and its GPUs: 0,2 or 0-3 or "
                   f"MIG slices 0/7,0/8 (GPU/GPU-instance, as the grid shows them) or {ALL_GPUS} "
                   "(an IPv6 address in brackets: [fe80::1]:0)")
    p.add_argument("--until", required=True, metavar="WHEN",
                   help=f"when the booking ends: {reservations.WHEN_FORMATS}")
    p.add_argument("--user", default=None, metavar="NAME",
                   help="who the GPUs are for (default: you)")
    p.add_argument("--comment", default="", metavar="TEXT", help="why, for the others")
    p.add_argument("--from", dest="start", default="now", metavar="WHEN",
                   help="when the booking starts (default: now); a date means its start")
    p.add_argument("--replace", action="store_true",
                   help="your own bookings of these GPUs give way to this one (to extend or "
                   "shorten a booking; with --file only)")
    p.add_argument("--force", action="store_true",
                   help="book a host the fleet does not know yet (admins; through --server)")
    client.server_arguments(p)
    file_arguments(p)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    where = client.service_or_file(args)
    moment = now()
    try:
        host, gpus = reservations.parse_target(args.target)
    except ReservationError as e:
        raise UserError(str(e)) from None
    user = args.user or getpass.getuser()
    if not user.strip() or any(c.isspace() for c in user):
        raise UserError(f"--user {user!r}: a user name, without spaces")
    reservation = Reservation(host=host, gpus=gpus, user=user,
                              until=when(args.until, moment, True, "--until"),
                              start=when(args.start, moment, False, "--from"),
                              comment=" ".join(args.comment.split()))
    booked_as = ""
    if isinstance(where, client.Service):
        if args.replace:
            raise UserError("--replace works with --file only; through gpuwatch serve, "
                            "`gpuwatch release ID` your booking, then book again")
        body = client.booking_to_api(reservation, user=args.user is not None)
        if args.start == "now":
            del body["start"]  # the service's now
        if args.force:
            body["force"] = True
        reservation = client.booking_from_api(where.post("/api/v1/reservations", body),
                                              where.url)
        booked_as = f" [{reservation.id}]"
    else:
        if args.force:
            raise UserError("--force is for --server (the file is not checked against the "
                            "fleet)")
        reservations.add(where, reservation, moment, replace_own=args.replace)
    starts = "" if reservation.start is None or reservation.start <= moment else \
        f", from {reservations.short(reservation.start)}"
    out.write(f"booked {reservation.describe()}{starts}{booked_as}\n")
    return 0


COMMAND = Command("reserve", "book GPUs of a host for someone until a time, with a comment",
                  _arguments, _run)
