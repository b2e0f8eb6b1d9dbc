"""Times of reservations: what people type (parse_when), what the file holds (file_time),
and how both are written back (iso for the file and JSON, short for people).

A bare date means the end of that day (``until``) or its start (``from``) in the local time
zone of the machine that reads it; `tz` stands in for that zone in tests.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from gpuwatch.reservations.errors import ReservationError

_RELATIVE = re.compile(r"\+((?:\d+[wdhms])+)")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
WHEN_FORMATS = ("ISO 8601 with a zone (2024-05-31T18:00+02:00 or ...Z), a date (2024-05-31: "
                "the end of that day, local time), or a time from now (+3d, +12h, +1d12h, "
                "+30m)")



def local_time(naive: dt.datetime, tz: dt.tzinfo | None) -> dt.datetime:
    """A wall-clock time in `tz`, or in the system's zone (with its offset on that date)."""
    return naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()


def day_bound(day: dt.date, end: bool, tz: dt.tzinfo | None) -> dt.datetime:
    clock = dt.time(23, 59, 59) if end else dt.time(0, 0)
    return local_time(dt.datetime.combine(day, clock), tz)


def date_only(text: str, end: bool, tz: dt.tzinfo | None, where: str = "") -> dt.datetime | None:
    """The bound of the day `text` names when it is a date alone (YYYY-MM-DD), else None;
    `where` starts the error message of an impossible date."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return None
    try:
        return day_bound(dt.date.fromisoformat(text), end, tz)
    except ValueError as e:
        prefix = f"{where}: " if where else ""
        raise ReservationError(f"{prefix}{text!r} is not a date: {e}") from None


def fromisoformat(text: str) -> dt.datetime:
    """datetime.fromisoformat, with the "Z" that Python 3.10 does not read."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return dt.datetime.fromisoformat(text)


def parse_when(text: str, now: dt.datetime, end: bool = True,
               tz: dt.tzinfo | None = None) -> dt.datetime:
    """A time typed on the command line: ISO 8601 (a time without a zone is local time), a
    date (the end of that day when `end`, else its start), ``+3d``-style offsets from `now`,
    or ``now``. `tz` stands in for the system's zone (tests)."""
    text = text.strip()
    if text == "now":
        return now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([wdhms])",
                                                                 relative.group(1)))
        try:
            return now + dt.timedelta(seconds=seconds)
        except OverflowError:  # timedelta, or the datetime past year 9999
            raise ReservationError(f"{text!r} is too far from now: give an offset of less "
                                   "than 9000 years, or a date") from None
    day = date_only(text, end, tz)
    if day is not None:
        return day
    try:
        parsed = fromisoformat(text)
    except ValueError:
        raise ReservationError(f"{text!r} is not a time: use {WHEN_FORMATS}") from None
    return parsed if parsed.tzinfo is not None else local_time(parsed, tz)


def file_time(value: Any, end: bool, where: str, tz: dt.tzinfo | None) -> dt.datetime:
    """A time as the file holds it: a string, or what YAML made of an unquoted one."""
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, dt.date):
        return day_bound(value, end, tz)
    elif isinstance(value, str):
        text = value.strip()
        day = date_only(text, end, tz, where)
        if day is not None:
            return day
        try:
            parsed = fromisoformat(text)
        except ValueError:
            raise ReservationError(f"{where}: {text!r} is not an ISO 8601 time (for example "
                                   "2024-05-31T18:00:00+02:00)") from None
    else:
        raise ReservationError(f"{where}: expected an ISO 8601 time, got {value!r}")
    if parsed.tzinfo is None:
        raise ReservationError(f"{where}: {value!s} has no time zone; add one, e.g. "
                               f"{parsed.isoformat(timespec='minutes')}+02:00 or ...Z")
    return parsed


def iso(moment: dt.datetime) -> str:
    """How the file and the JSON output write a time: ISO 8601, seconds, with its offset."""
    return moment.isoformat(timespec="seconds")


def short(moment: dt.datetime) -> str:
    """How people read a time: 2024-05-31 23:59+02:00 (the reservation's own zone)."""
    return moment.isoformat(sep=" ", timespec="minutes")
