"""`gpuwatch reservations import comments.json`: the reservations of the old format, added to the
reservations file (gpuwatch.reservations.legacy reads them)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from gpuwatch import reservations
from gpuwatch.cli.common import PROG, UserError, file_arguments, now, reservations_file
from gpuwatch.reservations import ReservationError, legacy

HELP = "bookings of the old comments.json (machine -> GPU index -> name, date, comment)"
DESCRIPTION = (
    "Adds the bookings of the old comments.json to the reservations file: per machine, per GPU "
    "index, name (who), date (booked until, that day included; local time) and comment. "
    "Entries without a name are free GPUs; those that have ended are listed, not imported. Any "
    "entry that cannot be read stops the import (nothing is written) unless --skip-invalid.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, metavar="comments.json")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--day-first", dest="day_first", action="store_true", default=None,
                       help="read 05/06/2024 as 5 June")
    order.add_argument("--month-first", dest="day_first", action="store_false",
                       help="read 05/06/2024 as May 6")
    p.add_argument("--skip-invalid", action="store_true",
                   help="import what can be read, list the rest")
    p.add_argument("--dry-run", action="store_true", help="say what would be imported")
    file_arguments(p, defaults=False)


def run(args: argparse.Namespace, out: TextIO) -> int:
    path = reservations_file(args)
    moment = now()
    source: Path = args.source
    try:
        data: Any = json.loads(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{source}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{source}: not JSON: {e}") from None
    try:
        found = legacy.convert_comments(data, moment, args.day_first)
    except ReservationError as e:
        raise UserError(f"{source}: {e}") from None
    for problem in found.problems:
        print(f"{PROG}: {source}: cannot import {problem}", file=sys.stderr)
    if found.problems and not args.skip_invalid:
        raise UserError(f"{source}: {len(found.problems)} entr"
                        f"{'y' if len(found.problems) == 1 else 'ies'} cannot be read (above); "
                        "nothing imported. Fix them, or import the rest with --skip-invalid")
    if args.dry_run:
        added = [b for b in found.reservations
                 if not any(replace(o, start=None) == b for o in reservations.load(path, moment))]
        present = [b for b in found.reservations if b not in added]
    else:
        added, present = legacy.merge_imported(path, found.reservations, moment)
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
