"""The old comments.json, imported into the reservations file (`gpuwatch reservations
import`): per machine, per GPU index, `name` (who), `date` (booked until, that day included)
and `comment`. Only the command imports this; the exporter never does.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpuwatch.cells import Cell
from gpuwatch.reservations.errors import ReservationError
from gpuwatch.reservations.model import Reservation, check, gpus_text, parse_gpus
from gpuwatch.reservations.store import update
from gpuwatch.reservations.times import day_bound, fromisoformat, local_time, short

_DATE_FORMATS = (
    ("%Y-%m-%d", False), ("%Y/%m/%d", False), ("%d.%m.%Y", False), ("%d.%m.%y", False),
    ("%d %B %Y", False), ("%d %b %Y", False), ("%B %d, %Y", False), ("%b %d, %Y", False),
    ("%B %d %Y", False), ("%b %d %Y", False),
    ("%Y-%m-%d %H:%M", True), ("%Y-%m-%dT%H:%M", True), ("%Y-%m-%d %H:%M:%S", True),
    ("%Y-%m-%dT%H:%M:%S", True), ("%d.%m.%Y %H:%M", True),
)


def parse_old_date(text: str, day_first: bool | None, tz: dt.tzinfo | None = None
                   ) -> dt.datetime:
    """A `date` of comments.json, the day the reservation runs until (included): ISO dates and
    times (with or without a zone), 31.05.2024, 2024/05/31, 31 May 2024, May 31, 2024, and
    31/05/2024 or 05/31/2024 when the order is plain (a part above 12) or given by
    `day_first`. Dates and times without a zone are local time."""
    text = " ".join(str(text).split())
    try:
        parsed = fromisoformat(text)
    except ValueError:
        pass
    else:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return day_bound(parsed.date(), True, tz)
        return parsed if parsed.tzinfo is not None else local_time(parsed, tz)
    slashed = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})", text)
    if slashed:
        a, b, year = int(slashed.group(1)), int(slashed.group(2)), int(slashed.group(3))
        year += 2000 if year < 100 else 0
        if a > 12 >= b or (day_first is True and b <= 12):
            day, month = a, b
        elif b > 12 >= a or (day_first is False and a <= 12):
            day, month = b, a
        else:
            raise ValueError(f"{text!r} could be day/month or month/day; import with "
                             "--day-first or --month-first")
        return day_bound(dt.date(year, month, day), True, tz)
    for form, with_time in _DATE_FORMATS:
        try:
            parsed = dt.datetime.strptime(text, form)
        except ValueError:
            continue
        if "%y" in form and parsed.year < 2000:  # a reservation ends in this century: 99 is 2099
            parsed = parsed.replace(year=parsed.year + 100)
        return local_time(parsed, tz) if with_time else day_bound(parsed.date(), True, tz)
    raise ValueError(f"{text!r} is not a date gpuwatch knows (2024-05-31, 31.05.2024, "
                     "2024/05/31, 31 May 2024)")


@dataclass(frozen=True)
class Imported:
    reservations: list[Reservation]
    """New reservations, one per host, user, end and comment (GPUs merged)."""
    expired: list[str]
    """Old entries that had already ended, described."""
    problems: list[str]
    """Old entries that could not be read, each with why."""


def _old_gpus(machine: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(machine, dict):
        yield from machine.items()
    elif isinstance(machine, list):
        yield from enumerate(machine)
    else:
        raise ValueError("expected GPU index: {name, date, comment} or a list per GPU")


def convert_comments(data: Any, now: dt.datetime, day_first: bool | None = None,
                     tz: dt.tzinfo | None = None) -> Imported:
    """The reservations of the old comments.json: per machine, per GPU index, `name` (who),
    `date` (booked until, that day included) and `comment`. Entries without a name are free
    GPUs; entries that have ended are listed, not imported."""
    if not isinstance(data, dict):
        raise ReservationError("expected an object: machine -> GPU index -> {name, date, "
                               "comment}")
    grouped: dict[tuple[str, str, dt.datetime, str], list[Cell]] = {}
    expired: list[str] = []
    problems: list[str] = []
    for machine, gpus in data.items():
        try:
            entries = list(_old_gpus(gpus))
        except ValueError as e:
            problems.append(f"{machine}: {e}")
            continue
        for index_raw, entry in entries:
            where = f"{machine} GPU {index_raw}"
            if not isinstance(entry, dict):
                if entry not in (None, "", {}):
                    problems.append(f"{where}: expected {{name, date, comment}}, got {entry!r}")
                continue
            name = str(entry.get("name") or "").strip()
            if not name:
                continue  # nobody: a free GPU
            try:
                index = parse_gpus(str(index_raw))
                if index is None or len(index) != 1 or index[0].is_slice:
                    raise ValueError(f"{index_raw!r} is not one GPU index")
                if not str(entry.get("date") or "").strip():
                    raise ValueError("no date (booked until when?)")
                until = parse_old_date(str(entry["date"]), day_first, tz)
            except (ValueError, ReservationError) as e:
                problems.append(f"{where} ({name}): {e}")
                continue
            comment = " ".join(str(entry.get("comment") or "").split())
            if until <= now:
                expired.append(f"{where} ({name}, until {short(until)})")
                continue
            grouped.setdefault((str(machine), name, until, comment), []).append(index[0])
    reservations = []
    for (host, user, until, comment), indices in grouped.items():
        reservation = Reservation(host=host, gpus=tuple(sorted(set(indices),
                                                               key=Cell.sort_key)),
                                  user=user, until=until, comment=comment)
        try:
            check(reservation)  # the file's rules: what cannot be written is a problem here
        except ReservationError as e:
            problems.append(f"{host} GPU {gpus_text(reservation.gpus)} "
                            f"({user}): {e}")
            continue
        reservations.append(reservation)
    return Imported(reservations, expired, problems)


def merge_imported(path: Path, imported: Sequence[Reservation], now: dt.datetime,
                   tz: dt.tzinfo | None = None) -> tuple[list[Reservation], list[Reservation]]:
    """Adds imported reservations; those already in the file (same host, GPUs, user, end and
    comment) are left out, so an import can run twice. Returns (added, already there)."""
    added: list[Reservation] = []
    present: list[Reservation] = []

    def change(reservations: list[Reservation]) -> list[Reservation]:
        added.clear()
        present.clear()
        for reservation in imported:
            same = [b for b in reservations if replace(b, start=None) == reservation]
            (present if same else added).append(reservation)
        return [*reservations, *added]

    update(path, change, now, tz, action="import")
    return added, present
