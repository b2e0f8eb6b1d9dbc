"""`gpuwatch release [HOST[:GPUS]] [--user NAME] [--expired]`: give booked GPUs back."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TextIO

from gpuwatch import reservations
from gpuwatch.cli.common import Command, UserError, file_arguments, now, reservations_file
from gpuwatch.reservations import ReservationError


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="HOST[:GPUS]",
                   help="the GPUs to give back (all of the host's without :GPUS)")
    p.add_argument("--user", metavar="NAME", help="only the bookings of NAME; alone: all of them")
    p.add_argument("--expired", action="store_true",
                   help="remove bookings that have ended (they no longer count; this only "
                   "tidies the file)")
    file_arguments(p)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    path = reservations_file(args)
    host, gpus = None, None
    if args.target:
        try:
            host, gpus = reservations.parse_target(args.target, gpus_required=False)
        except ReservationError as e:
            raise UserError(str(e)) from None
    if host is None and args.user is None and not args.expired:
        raise UserError("say what to release: HOST:GPUS, --user NAME or --expired")
    done = reservations.release(path, now(), host=host, gpus=gpus, user=args.user,
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


COMMAND = Command("release", "give booked GPUs back (of a host, of a user, or those that ended)",
                  _arguments, _run)
