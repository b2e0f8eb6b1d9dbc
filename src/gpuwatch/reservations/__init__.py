"""Reservations: who has booked which GPUs of which host, until when. One YAML file.

The file is the source of truth. ``gpuwatch reserve / release / reservations`` edit it, each
edit under a lock on a file beside it (``PATH.lock``) and written in one step (a temporary
file in the same directory, fsync, rename), so two people booking at once never lose each
other's booking and a failed write leaves the old file as it was. The exporter's reservation
collector reads it on each scrape. A booking counts from ``from`` (when it was made, unless
booked ahead) until ``until``; expired bookings stop counting by themselves and may stay in
the file.

    reservations:
      - host: gpu-srv-01
        gpus: [0, 1]                       # GPU indices, or: all
        user: alice
        from: '2024-05-20T09:12:00+02:00'  # optional
        until: '2024-05-31T23:59:59+02:00'
        comment: NeurIPS deadline

Times are ISO 8601 with their zone. A bare date means the end of that day (``until``) or
its start (``from``) in the local time zone of the machine that reads it; the command
writes full times with their offset. Every problem is a ReservationError: one line that
names the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from gpuwatch.exporter.webconfig import parse_yaml

ENV_FILE = "GPUWATCH_RESERVATIONS"
"""The environment variable naming the file when --file is not given."""
LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT = 10.0
"""Seconds an edit waits for another one to finish before it gives up."""
FILE_MODE = 0o644
"""A new file is readable by everyone: the exporter, running as its own user, reads it."""
HEADER = (
    "# GPU reservations. Edit with `gpuwatch reserve`, `gpuwatch release` and\n"
    "# `gpuwatch reservations` (docs/reservations.md), which lock the file and check it.\n"
    "# Times are ISO 8601 with their zone; bookings that have ended stop counting.\n"
)
_KEYS = ("host", "gpus", "user", "from", "until", "comment")
_RELATIVE = re.compile(r"\+((?:\d+[wdhms])+)")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
WHEN_FORMATS = ("ISO 8601 with a zone (2024-05-31T18:00+02:00 or ...Z), a date (2024-05-31: "
                "the end of that day, local time), or a time from now (+3d, +12h, +1d12h, "
                "+30m)")


class ReservationError(ValueError):
    """A booking or a reservations file that cannot be used; the message is one line."""


# -- times ------------------------------------------------------------------------------------

def _local(naive: dt.datetime, tz: dt.tzinfo | None) -> dt.datetime:
    """A wall-clock time in `tz`, or in the system's zone (with its offset on that date)."""
    return naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()


def _day_bound(day: dt.date, end: bool, tz: dt.tzinfo | None) -> dt.datetime:
    clock = dt.time(23, 59, 59) if end else dt.time(0, 0)
    return _local(dt.datetime.combine(day, clock), tz)


def _date_only(text: str, end: bool, tz: dt.tzinfo | None, where: str = "") -> dt.datetime | None:
    """The bound of the day `text` names when it is a date alone (YYYY-MM-DD), else None;
    `where` starts the error message of an impossible date."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return None
    try:
        return _day_bound(dt.date.fromisoformat(text), end, tz)
    except ValueError as e:
        prefix = f"{where}: " if where else ""
        raise ReservationError(f"{prefix}{text!r} is not a date: {e}") from None


def _fromisoformat(text: str) -> dt.datetime:
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
    day = _date_only(text, end, tz)
    if day is not None:
        return day
    try:
        parsed = _fromisoformat(text)
    except ValueError:
        raise ReservationError(f"{text!r} is not a time: use {WHEN_FORMATS}") from None
    return parsed if parsed.tzinfo is not None else _local(parsed, tz)


def _file_time(value: Any, end: bool, where: str, tz: dt.tzinfo | None) -> dt.datetime:
    """A time as the file holds it: a string, or what YAML made of an unquoted one."""
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, dt.date):
        return _day_bound(value, end, tz)
    elif isinstance(value, str):
        text = value.strip()
        day = _date_only(text, end, tz, where)
        if day is not None:
            return day
        try:
            parsed = _fromisoformat(text)
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
    """How people read a time: 2024-05-31 23:59+02:00 (the booking's own zone)."""
    return moment.isoformat(sep=" ", timespec="minutes")


# -- GPUs and targets -------------------------------------------------------------------------

Gpus = tuple[int, ...] | None
"""GPU indices, sorted; None: every GPU of the host."""


def parse_gpus(text: str) -> Gpus:
    """``all``, ``0,2``, ``0-3`` or a mix (``0,4-6``) -> sorted indices, or None for all."""
    text = text.strip()
    if text.lower() == "all":
        return None
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        bounds = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", part)
        if not bounds:
            raise ReservationError(f"{text!r} is not a list of GPU indices: use all, 0,2, 0-3 "
                                   "or 0,4-6")
        low = int(bounds.group(1))
        high = int(bounds.group(2)) if bounds.group(2) is not None else low
        if min(low, high) < 0:
            raise ReservationError(f"{text!r}: GPU indices start at 0, {min(low, high)} is "
                                   "negative")
        if high < low:
            raise ReservationError(f"{text!r}: the range {part} runs backwards; write "
                                   f"{high}-{low}")
        indices.update(range(low, high + 1))
    return tuple(sorted(indices))


def gpus_text(gpus: Gpus) -> str:
    """The indices as people write them: all, 3, 0,2, 0-3, 0,4-6."""
    if gpus is None:
        return "all"
    runs: list[str] = []
    start = previous = None
    for index in [*gpus, None]:
        if index is not None and previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ",".join(runs)


def parse_target(text: str, gpus_required: bool = True) -> tuple[str, Gpus]:
    """``HOST:GPUS`` (``[fe80::1]:0`` for an IPv6 address) -> (host, gpus). Without
    `gpus_required`, a bare HOST means every GPU of it."""
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", text.strip())
    if bracketed:
        host, gpus = bracketed.group(1), bracketed.group(2)
    else:
        host, sep, gpus_part = text.strip().rpartition(":")
        host, gpus = (host, gpus_part) if sep else (text.strip(), None)
    if not host:
        raise ReservationError(f"{text!r}: name the host, as `gpuwatch status` shows it "
                               "(HOST:GPUS, e.g. gpu-srv-01:0,1)")
    if gpus is None or gpus == "":
        if gpus_required:
            raise ReservationError(f"{text!r}: name the GPUs too: {host}:0,1, {host}:0-3 or "
                                   f"{host}:all")
        return host, None
    return host, parse_gpus(gpus)


# -- bookings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reservation:
    host: str
    gpus: Gpus
    user: str
    until: dt.datetime
    start: dt.datetime | None = None
    """When the booking starts counting (`from` in the file); None: it counts until its end
    (`gpuwatch reserve` writes when it was made)."""
    comment: str = ""

    def active(self, now: dt.datetime) -> bool:
        return (self.start is None or self.start <= now) and now < self.until

    def expired(self, now: dt.datetime) -> bool:
        return self.until <= now

    def shares_gpus(self, host: str, gpus: Gpus) -> bool:
        if host != self.host:
            return False
        return gpus is None or self.gpus is None or bool(set(gpus) & set(self.gpus))

    def overlaps(self, other: Reservation) -> bool:
        """The same GPU of the same host, at the same time."""
        return (self.shares_gpus(other.host, other.gpus)
                and (other.start is None or other.start < self.until)
                and (self.start is None or self.start < other.until))

    def describe(self) -> str:
        """One line: GPU 0,1 of gpu-srv-01 for alice until 2024-05-31 23:59+02:00 (why)."""
        which = "every GPU" if self.gpus is None else \
            f"GPU{'s' if len(self.gpus) > 1 else ''} {gpus_text(self.gpus)}"
        note = f" ({self.comment})" if self.comment else ""
        return f"{which} of {self.host} for {self.user} until {short(self.until)}{note}"

    def to_yaml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"host": self.host,
                                 "gpus": "all" if self.gpus is None else _Indices(self.gpus),
                                 "user": self.user}
        if self.start is not None:
            entry["from"] = iso(self.start)
        entry["until"] = iso(self.until)
        if self.comment:
            entry["comment"] = self.comment
        return entry

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        return {"host": self.host, "gpus": "all" if self.gpus is None else list(self.gpus),
                "user": self.user, "from": iso(self.start) if self.start else None,
                "until": iso(self.until), "until_timestamp": self.until.timestamp(),
                "comment": self.comment, "active": self.active(now),
                "expired": self.expired(now)}


def _entry(raw: Any, where: str, tz: dt.tzinfo | None) -> Reservation:
    if not isinstance(raw, dict):
        raise ReservationError(f"{where}: expected a mapping with {', '.join(_KEYS)}")
    unknown = sorted(set(map(str, raw)) - set(_KEYS))
    if unknown:
        raise ReservationError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                               f"{', '.join(_KEYS)}")
    for key in ("host", "user", "until"):
        if raw.get(key) in (None, ""):
            raise ReservationError(f"{where}: {key} is missing")
    host, user = raw["host"], raw["user"]
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise ReservationError(f"{where}: host must be a host name, got {host!r}")
    if not isinstance(user, (str, int)) or not str(user).strip() or \
            any(c.isspace() for c in str(user).strip()):
        raise ReservationError(f"{where}: user must be a user name, without spaces, got "
                               f"{user!r}")
    gpus_raw = raw.get("gpus")
    try:
        if gpus_raw is None:
            raise ReservationError("gpus is missing: a list of indices, or all")
        if isinstance(gpus_raw, bool):
            raise ReservationError(f"gpus: expected indices or all, got {gpus_raw!r}")
        if isinstance(gpus_raw, int):
            gpus = parse_gpus(str(gpus_raw))
        elif isinstance(gpus_raw, str):
            gpus = parse_gpus(gpus_raw)
        elif isinstance(gpus_raw, list) and gpus_raw and all(
                isinstance(i, int) and not isinstance(i, bool) for i in gpus_raw):
            gpus = parse_gpus(",".join(map(str, gpus_raw)))
        else:
            raise ReservationError(f"gpus: expected a list of indices or all, got {gpus_raw!r}")
    except ReservationError as e:
        raise ReservationError(f"{where}: {e}") from None
    until = _file_time(raw["until"], True, f"{where}: until", tz)
    start = _file_time(raw["from"], False, f"{where}: from", tz) \
        if raw.get("from") not in (None, "") else None
    if start is not None and start >= until:
        raise ReservationError(f"{where}: from ({iso(start)}) is not before until "
                               f"({iso(until)})")
    comment = raw.get("comment")
    if comment is not None and not isinstance(comment, (str, int, float)):
        raise ReservationError(f"{where}: comment must be text, got {comment!r}")
    return Reservation(host=host.strip(), gpus=gpus, user=str(user).strip(), until=until,
                       start=start, comment=" ".join(str(comment or "").split()))


def _label(index: int, raw: Any) -> str:
    if isinstance(raw, dict) and raw.get("user") and raw.get("host"):
        return f"reservations[{index}] ({raw['user']} on {raw['host']})"
    return f"reservations[{index}]"


def parse(text: str, path: Path | str, now: dt.datetime,
          tz: dt.tzinfo | None = None) -> list[Reservation]:
    """The bookings of a file's text; ReservationError naming `path` for the first problem,
    including two bookings of the same GPU at the same time (expired ones aside)."""
    doc = parse_yaml(text, path, ReservationError)
    if doc is None:
        return []
    if not isinstance(doc, dict) or set(doc) - {"reservations"}:
        raise ReservationError(f"{path}: expected a mapping with one key, reservations (a "
                               "list of bookings)")
    entries = doc.get("reservations") or []
    if not isinstance(entries, list):
        raise ReservationError(f"{path}: reservations: expected a list of bookings")
    bookings = []
    for index, raw in enumerate(entries):
        try:
            bookings.append(_entry(raw, _label(index, raw), tz))
        except ReservationError as e:
            raise ReservationError(f"{path}: {e}") from None
    check_overlaps(bookings, path, now)
    return bookings


def check_overlaps(bookings: Sequence[Reservation], path: Path | str,
                   now: dt.datetime) -> None:
    current = [b for b in bookings if not b.expired(now)]
    for i, a in enumerate(current):
        for b in current[i + 1:]:
            if a.overlaps(b):
                raise ReservationError(f"{path}: two bookings of the same GPU at the same time: "
                                       f"{a.describe()} and {b.describe()}")


class _Indices(list[int]):
    """GPU indices, written on one line: [0, 1]."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Indices, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def render(bookings: Iterable[Reservation]) -> str:
    body = yaml.dump({"reservations": [b.to_yaml() for b in bookings]}, Dumper=_Dumper,
                     sort_keys=False, allow_unicode=True, width=1000)
    return HEADER + body


def load(path: Path, now: dt.datetime, tz: dt.tzinfo | None = None) -> list[Reservation]:
    """The bookings of the file; none when it does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ReservationError(f"{path}: cannot read: {reason}") from None
    return parse(text, path, now, tz)


# -- editing the file: one writer at a time, replaced in one step -----------------------------

@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Holds the lock beside `path` (PATH.lock) for an edit; another edit waits up to
    `timeout` seconds. flock works on a descriptor opened read-only, so people who may not
    write the lock file itself (created by someone else) can still take it."""
    lock = path.with_name(path.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ReservationError(f"{path}: cannot open the lock {lock}: {e.strerror}; people "
                               "who book need write access to its directory") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ReservationError(f"{path}: another edit has held {lock} for more "
                                           f"than {timeout:g} s; try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def write(path: Path, bookings: Iterable[Reservation]) -> None:
    """Replaces the file in one step: a temporary file beside it, written and fsynced, then
    renamed over it. On any failure the old file stays as it was and the temporary goes."""
    text = render(bookings)
    try:
        old = path.stat()
        mode, group = old.st_mode & 0o7777, old.st_gid
    except FileNotFoundError:
        mode, group = FILE_MODE, None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ReservationError(f"{path}: cannot write in {path.parent}: {e.strerror}; people "
                               "who book need write access to that directory") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if group is not None:
            with contextlib.suppress(PermissionError):  # keep the group where we may
                os.chown(tmp, -1, group)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ReservationError(f"{path}: not written ({e.strerror or e}); the file is "
                                   "unchanged") from None
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def resolve(path: Path) -> Path:
    """The file an edit replaces: a symbolic link is followed, so the link stays."""
    return Path(os.path.realpath(path))


def update(path: Path, change: Callable[[list[Reservation]], list[Reservation]],
           now: dt.datetime, tz: dt.tzinfo | None = None) -> list[Reservation]:
    """Reads the file, applies `change`, checks and writes the result, all under the lock;
    returns the new bookings. Nothing is written when `change` raises."""
    path = resolve(path)
    if not path.parent.is_dir():
        raise ReservationError(f"{path}: the directory {path.parent} does not exist")
    with locked(path):
        bookings = change(load(path, now, tz))
        check_overlaps(bookings, path, now)
        write(path, bookings)
    return bookings


# -- reserve, release -------------------------------------------------------------------------

def add(path: Path, booking: Reservation, now: dt.datetime, replace_own: bool = False,
        tz: dt.tzinfo | None = None) -> list[Reservation]:
    """Adds a booking. It must end in the future and take no GPU another booking has at the
    same time; with `replace_own`, the user's own bookings of those GPUs give way (to extend
    or shorten one)."""
    if booking.until <= now:
        raise ReservationError(f"{path}: until {iso(booking.until)} is not in the future "
                               f"(now: {iso(now)})")
    if booking.start is not None and booking.start >= booking.until:
        raise ReservationError(f"{path}: from {iso(booking.start)} is not before until "
                               f"{iso(booking.until)}")

    def change(bookings: list[Reservation]) -> list[Reservation]:
        if replace_own:
            bookings = _give_back(bookings, path, now, booking.host, booking.gpus,
                                  booking.user)[1]
        for other in bookings:
            if not other.expired(now) and other.overlaps(booking):
                hint = "; to change your own booking, add --replace" \
                    if other.user == booking.user else "; ask them, or pick other GPUs"
                which, verb = _shared(booking, other)
                raise ReservationError(f"{path}: {which} of {booking.host} {verb} already "
                                       f"booked: {other.describe()}{hint}")
        return [*bookings, booking]

    return update(path, change, now, tz)


def _shared(a: Reservation, b: Reservation) -> tuple[str, str]:
    """The GPUs two bookings of one host share, and the verb that goes with them."""
    if a.gpus is None and b.gpus is None:
        return "every GPU", "is"
    shared = tuple(sorted(set(a.gpus or b.gpus or ()) & set(b.gpus or a.gpus or ())))
    return (f"GPUs {gpus_text(shared)}", "are") if len(shared) > 1 else \
        (f"GPU {shared[0]}", "is")


def _give_back(bookings: Sequence[Reservation], path: Path | str, now: dt.datetime,
               host: str | None, gpus: Gpus, user: str | None, expired: bool = False
               ) -> tuple[list[Reservation], list[Reservation]]:
    """(the bookings concerned, as they were; all bookings after giving back): the `gpus` of
    `host` (every GPU when None; every host when `host` is None) booked by `user` (anyone
    when None), among the bookings that have ended (`expired`) or not. A booking of several
    GPUs keeps those not given back."""
    concerned: list[Reservation] = []
    result: list[Reservation] = []
    for b in bookings:
        if b.expired(now) != expired or (user is not None and b.user != user) or \
                (host is not None and not b.shares_gpus(host, gpus)):
            result.append(b)
            continue
        concerned.append(b)
        if host is None or gpus is None:
            continue  # the whole booking goes
        if b.gpus is None:
            raise ReservationError(f"{path}: {b.describe()} books every GPU of {b.host}; "
                                   f"release {b.host}:all, then book the GPUs to keep")
        left = tuple(i for i in b.gpus if i not in gpus)
        if left:
            result.append(replace(b, gpus=left))
    return concerned, result


@dataclass(frozen=True)
class Released:
    removed: list[Reservation]
    """The bookings as they were before being wholly or partly given back."""
    bookings: list[Reservation]


def release(path: Path, now: dt.datetime, host: str | None = None, gpus: Gpus = None,
            user: str | None = None, expired: bool = False,
            tz: dt.tzinfo | None = None) -> Released:
    """Gives GPUs back: the `gpus` of `host` (all of them when None), and/or everything
    `user` booked; with `expired`, the bookings that have ended (of `host`/`user`, or all).
    ReservationError when nothing matches."""
    if host is None and user is None and not expired:
        raise ReservationError("say what to release: HOST:GPUS, --user NAME, or --expired")
    removed: list[Reservation] = []

    def change(bookings: list[Reservation]) -> list[Reservation]:
        concerned, result = _give_back(bookings, path, now, host, gpus, user, expired)
        if not concerned:
            what = " ".join(filter(None, [
                "ended" if expired else "", "booking",
                f"of {host}:{gpus_text(gpus)}" if host else "",
                f"by {user}" if user else ""]))
            raise ReservationError(f"{path}: there is no {what}; `gpuwatch reservations"
                                   f"{' --all' if expired else ''}` lists them")
        removed[:] = concerned
        return result

    return Released(removed, update(path, change, now, tz))


# -- the old comments.json ---------------------------------------------------------------------

_DATE_FORMATS = (
    ("%Y-%m-%d", False), ("%Y/%m/%d", False), ("%d.%m.%Y", False), ("%d.%m.%y", False),
    ("%d %B %Y", False), ("%d %b %Y", False), ("%B %d, %Y", False), ("%b %d, %Y", False),
    ("%B %d %Y", False), ("%b %d %Y", False),
    ("%Y-%m-%d %H:%M", True), ("%Y-%m-%dT%H:%M", True), ("%Y-%m-%d %H:%M:%S", True),
    ("%Y-%m-%dT%H:%M:%S", True), ("%d.%m.%Y %H:%M", True),
)


def parse_old_date(text: str, day_first: bool | None, tz: dt.tzinfo | None = None
                   ) -> dt.datetime:
    """A `date` of comments.json, the day the booking runs until (included): ISO dates and
    times (with or without a zone), 31.05.2024, 2024/05/31, 31 May 2024, May 31, 2024, and
    31/05/2024 or 05/31/2024 when the order is plain (a part above 12) or given by
    `day_first`. Dates and times without a zone are local time."""
    text = " ".join(str(text).split())
    try:
        parsed = _fromisoformat(text)
    except ValueError:
        pass
    else:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return _day_bound(parsed.date(), True, tz)
        return parsed if parsed.tzinfo is not None else _local(parsed, tz)
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
        return _day_bound(dt.date(year, month, day), True, tz)
    for form, with_time in _DATE_FORMATS:
        try:
            parsed = dt.datetime.strptime(text, form)
        except ValueError:
            continue
        if "%y" in form and parsed.year < 2000:  # a booking ends in this century: 99 is 2099
            parsed = parsed.replace(year=parsed.year + 100)
        return _local(parsed, tz) if with_time else _day_bound(parsed.date(), True, tz)
    raise ValueError(f"{text!r} is not a date gpuwatch knows (2024-05-31, 31.05.2024, "
                     "2024/05/31, 31 May 2024)")


@dataclass(frozen=True)
class Imported:
    bookings: list[Reservation]
    """New bookings, one per host, user, end and comment (GPUs merged)."""
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
    """The bookings of the old comments.json: per machine, per GPU index, `name` (who),
    `date` (booked until, that day included) and `comment`. Entries without a name are free
    GPUs; entries that have ended are listed, not imported."""
    if not isinstance(data, dict):
        raise ReservationError("expected an object: machine -> GPU index -> {name, date, "
                               "comment}")
    grouped: dict[tuple[str, str, dt.datetime, str], list[int]] = {}
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
                if index is None or len(index) != 1:
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
    bookings = [Reservation(host=host, gpus=tuple(sorted(set(indices))), user=user,
                            until=until, comment=comment)
                for (host, user, until, comment), indices in grouped.items()]
    return Imported(bookings, expired, problems)


def merge_imported(path: Path, imported: Sequence[Reservation], now: dt.datetime,
                   tz: dt.tzinfo | None = None) -> tuple[list[Reservation], list[Reservation]]:
    """Adds imported bookings; those already in the file (same host, GPUs, user, end and
    comment) are left out, so an import can run twice. Returns (added, already there)."""
    added: list[Reservation] = []
    present: list[Reservation] = []

    def change(bookings: list[Reservation]) -> list[Reservation]:
        added.clear()
        present.clear()
        for booking in imported:
            same = [b for b in bookings if replace(b, start=None) == booking]
            (present if same else added).append(booking)
        return [*bookings, *added]

    update(path, change, now, tz)
    return added, present
