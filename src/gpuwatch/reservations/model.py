"""What a reservation is: a host's GPUs (or MIG slices) for a user until a time, and the
file's text.

`Reservation` and the cells it holds (`Gpus`: sorted gpuwatch.cells.Cell, whole GPUs and MIG
slices, or None for every GPU), how people write GPUs and targets (parse_gpus, gpus_text,
parse_target: 0,2, 0-3, 0/7,0/8, all), and the reservations file's text both ways (parse,
render), checked for two reservations of one GPU or slice at once (Cell.overlaps: a booking
of a whole GPU holds its slices). One set of rules (`check`) decides what a reservation may
hold, for what is read and for what is about to be written alike. No file is read or written
here: gpuwatch.reservations.store does that.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
import secrets
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from gpuwatch.cells import Cell
from gpuwatch.contract.states import ALL_GPUS
from gpuwatch.reservations.errors import ReservationError
from gpuwatch.reservations.times import file_time, iso, short
from gpuwatch.yamlfile import parse_yaml

HEADER = (
    "# GPU reservations. Edit with `gpuwatch reserve`, `gpuwatch release` and\n"
    "# `gpuwatch reservations` (docs/reservations.md), which lock the file and check it.\n"
    "# Times are ISO 8601 with their zone; bookings that have ended stop counting.\n"
)
_KEYS = ("id", "host", "gpus", "user", "from", "until", "comment")

MAX_GPU_INDEX = 1023
"""The highest GPU index a reservation may name (so a set holds at most 1,024 GPUs and a
typo such as 0-100000 is refused before it becomes 100,001 series); `gpuwatch serve` bounds
a booking further by the GPUs the host really has."""
MAX_NAME = 253
"""The longest host or user name (a DNS name's limit)."""
MAX_COMMENT = 500
"""The longest comment, in characters."""
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
"""What an id may be: 8 hex digits when gpuwatch makes it; by hand, up to 32 letters, digits,
``_ . -``."""

try:  # the C loader where PyYAML has it (files not in render()'s layout)
    _Loader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader


# -- GPUs and targets -------------------------------------------------------------------------

Gpus = tuple[Cell, ...] | None
"""The cells booked (whole GPUs and MIG slices, gpuwatch.cells.Cell), in Cell.sort_key order,
none covering another; None: every GPU of the host."""

_INTERNED: dict[tuple[int, int | None], Cell] = {}


def interned(gpu: int, instance: int | None = None) -> Cell:
    """The one Cell object of that cell: reservations compare and hash their cells on every
    edit of a file of thousands, and equal tuples of the same objects compare without a call
    (a GPU index is at most 1023, an instance id too: the table stays bounded)."""
    key = (gpu, instance)
    found = _INTERNED.get(key)
    if found is None:
        found = _INTERNED.setdefault(key, Cell(gpu, instance))
    return found


_RANGE = re.compile(r"(-?\d+)\s*-\s*(-?\d+)")
_SLICE_OR_INDEX = re.compile(r"-?\d+(?:\s*/\s*-?\d+)?")


def cells(items: Iterable[Cell]) -> tuple[Cell, ...]:
    """The cells in their order without repeats; ReservationError when one covers another (a
    whole GPU and one of its slices: the GPU holds the slice already)."""
    unique = tuple(sorted(set(items), key=Cell.sort_key))
    _in_order(unique)
    return unique


def _in_order(gpus: tuple[Cell, ...]) -> bool:
    """Whether the cells are in sort_key order without repeats; ReservationError when one is
    a slice of a whole GPU among them (in that order, right after it)."""
    ordered = True
    for before, after in itertools.pairwise(gpus):
        if after.is_slice and before.instance is None and before.gpu == after.gpu:
            raise ReservationError(f"{after} is a slice of GPU {after.gpu}, which is booked "
                                   f"whole as well; name GPU {after.gpu} or its slices, not "
                                   "both")
        ordered = ordered and before.sort_key() < after.sort_key()
    return ordered


def _cell(part: str, text: str) -> Cell:
    """One cell of a list people wrote, with parse_gpus' messages."""
    if not _SLICE_OR_INDEX.fullmatch(part):
        raise ReservationError(f"{text!r} is not a list of GPUs: use all, 0,2, 0-3 or MIG "
                               "slices as GPU/GPU-instance (0/7,0/8)")
    numbers = [int(n) for n in re.findall(r"-?\d+", part)]
    if min(numbers) < 0:
        raise ReservationError(f"{text!r}: GPU indices and GPU instance ids start at 0, "
                               f"{min(numbers)} is negative")
    if max(numbers) > MAX_GPU_INDEX:
        raise ReservationError(f"{text!r}: {max(numbers)} is past the highest index gpuwatch "
                               f"accepts ({MAX_GPU_INDEX}); for every GPU write all")
    return interned(*numbers)


def parse_gpus(text: str) -> Gpus:
    """``all``, ``0,2``, ``0-3``, MIG slices ``0/7,0/8`` or a mix (``0,4-6,1/9``) -> sorted
    cells, or None for all. Ranges are of whole GPUs only."""
    text = text.strip()
    if text.lower() == ALL_GPUS:
        return None
    found: list[Cell] = []
    for part in text.split(","):
        part = part.strip()
        bounds = _RANGE.fullmatch(part)
        if bounds is None:
            found.append(_cell(part, text))
            continue
        low, high = int(bounds.group(1)), int(bounds.group(2))
        if min(low, high) < 0:
            raise ReservationError(f"{text!r}: GPU indices start at 0, {min(low, high)} is "
                                   "negative")
        if high < low:
            raise ReservationError(f"{text!r}: the range {part} runs backwards; write "
                                   f"{high}-{low}")
        if high > MAX_GPU_INDEX:
            raise ReservationError(f"{text!r}: GPU {high} is past the highest index gpuwatch "
                                   f"accepts ({MAX_GPU_INDEX}); for every GPU write all")
        found.extend(interned(i) for i in range(low, high + 1))
    return cells(found)


def listed_gpus(items: list[Any]) -> Gpus:
    """The cells of a list in the file or a request (indices, and "G/I" strings for slices),
    with parse_gpus' bounds and messages."""
    if not items or any(isinstance(i, bool) or not isinstance(i, (int, str)) for i in items):
        raise ReservationError(f"gpus: expected a list of GPU indices and MIG slices "
                               f"(\"0/7\"), or all, got {str(items)[:80]!r}")
    text = ",".join(map(str, items))
    found = []
    for item in items:
        if isinstance(item, str) and "/" not in item:
            raise ReservationError(f"gpus: {item[:40]!r} is not a GPU: write an index as a "
                                   "number (0) and a MIG slice as \"GPU/GPU-instance\" (\"0/7\")")
        try:
            found.append(_cell(str(item), text))
        except ReservationError as e:
            raise ReservationError(f"gpus: {e}") from None
    return cells(found)


def gpus_text(gpus: Gpus) -> str:
    """The cells as people write them: all, 3, 0,2, 0-3, 0,4-6, 1-3,0/7 (whole GPUs first,
    in runs, then the slices)."""
    if gpus is None:
        return ALL_GPUS
    runs: list[str] = []
    start = previous = None
    for index in [*(c.gpu for c in gpus if not c.is_slice), None]:
        if index is not None and previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ",".join([*runs, *(str(c) for c in gpus if c.is_slice)])


def cells_phrase(gpus: Gpus) -> str:
    """What a set of cells is called in a sentence: every GPU, GPU 0, GPUs 0-3, slice 0/7,
    slices 0/7,0/8, GPUs 2,0/7 (whole GPUs and slices)."""
    if gpus is None:
        return "every GPU"
    several = len(gpus) > 1
    if all(c.is_slice for c in gpus):
        return f"slice{'s' if several else ''} {gpus_text(gpus)}"
    return f"GPU{'s' if several else ''} {gpus_text(gpus)}"


def share(a: Gpus, b: Gpus) -> Gpus:
    """The cells two sets hold both: of each pair that overlaps, the narrower (a slice of a
    whole GPU booked); None when both are every GPU."""
    if a is None or b is None:
        return b if a is None else a
    return tuple(sorted({x if y.covers(x) else y for x in a for y in b if x.overlaps(y)},
                        key=Cell.sort_key))


def overlap(a: Gpus, b: Gpus) -> bool:
    """Whether two sets share hardware (a whole GPU shares it with its slices)."""
    return a is None or b is None or any(x.overlaps(y) for x in a for y in b)


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


# -- reservations ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reservation:
    host: str
    gpus: Gpus
    user: str
    until: dt.datetime
    start: dt.datetime | None = None
    """When the reservation starts counting (`from` in the file); None: it counts until its end
    (`gpuwatch reserve` writes when it was made)."""
    comment: str = ""
    id: str = field(default="", compare=False)
    """Stable and unique in its file: 8 hex digits given when it is added (for an entry of a
    file written before ids, derived from the entry until the next write stores it); "" for
    one not stored yet. Not part of equality: the same booking is equal whatever its id."""

    def __post_init__(self) -> None:
        # GPU indices given as plain numbers (code and tests written before slices) are cells;
        # anything else is left as it is for check() to name.
        gpus: Any = self.gpus
        if type(gpus) is tuple and len(gpus) == 1:  # the common case, quickly
            only = gpus[0]
            if type(only) is int and 0 <= only <= MAX_GPU_INDEX:
                object.__setattr__(self, "gpus", (interned(only),))
            elif isinstance(only, Cell):
                object.__setattr__(self, "gpus", (interned(only.gpu, only.instance),))
            return
        if isinstance(gpus, (tuple, list)) and gpus and all(
                (type(i) is int and 0 <= i <= MAX_GPU_INDEX) or isinstance(i, Cell)
                for i in gpus):
            found = [interned(i.gpu, i.instance) if isinstance(i, Cell) else interned(i)
                     for i in gpus]
            object.__setattr__(self, "gpus", tuple(sorted(set(found), key=Cell.sort_key)))

    def active(self, now: dt.datetime) -> bool:
        return (self.start is None or self.start <= now) and now < self.until

    def expired(self, now: dt.datetime) -> bool:
        return self.until <= now

    def shares_gpus(self, host: str, gpus: Gpus) -> bool:
        """Whether it books hardware of `gpus` of `host` (Cell.overlaps: a whole GPU and its
        slices share it)."""
        return host == self.host and overlap(gpus, self.gpus)

    def overlaps(self, other: Reservation) -> bool:
        """The same GPU of the same host, at the same time."""
        return (self.shares_gpus(other.host, other.gpus)
                and (other.start is None or other.start < self.until)
                and (self.start is None or self.start < other.until))

    def describe(self) -> str:
        """One line: GPUs 0,1 (or slice 0/7) of gpu-srv-01 for alice until 2024-05-31
        23:59+02:00 (why)."""
        which = cells_phrase(self.gpus)
        note = f" ({self.comment})" if self.comment else ""
        return f"{which} of {self.host} for {self.user} until {short(self.until)}{note}"

    def to_yaml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id} if self.id else {}
        entry.update({"host": self.host,
                      "gpus": gpus_json(self.gpus),
                      "user": self.user})
        if self.start is not None:
            entry["from"] = iso(self.start)
        entry["until"] = iso(self.until)
        if self.comment:
            entry["comment"] = self.comment
        return entry

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        """`gpuwatch reservations --json`."""
        return {"id": self.id, "host": self.host,
                "gpus": gpus_json(self.gpus),
                "user": self.user, "from": iso(self.start) if self.start else None,
                "until": iso(self.until), "until_timestamp": self.until.timestamp(),
                "comment": self.comment, "active": self.active(now),
                "expired": self.expired(now)}

    def to_api(self) -> dict[str, Any]:
        """The service's JSON (R of /api/v1/reservations): id, host, gpus (indices or "all"),
        user, start (ISO 8601, or null for a booking without one), until, comment."""
        return {"id": self.id, "host": self.host,
                "gpus": gpus_json(self.gpus), "user": self.user,
                "start": iso(self.start) if self.start else None, "until": iso(self.until),
                "comment": self.comment}


def gpus_json(gpus: Gpus) -> str | list[int | str]:
    """The file's and the API's gpus: "all", or indices and "G/I" strings for slices."""
    return ALL_GPUS if gpus is None else [c.to_json() for c in gpus]


def _name(kind: str, value: object) -> str | None:
    """Why `value` is not a host or user name, or None when it is one."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or \
            not value.isprintable() or " " in value:  # isprintable: no other whitespace
        return f"{kind} must be a {kind} name, without spaces, of at most {MAX_NAME} " \
            f"characters, got {value!r}"
    return None


def check(reservation: Reservation) -> None:
    """The rules every reservation meets, read from the file or about to be written to it:
    ReservationError (one line, without the file's name) for the first it breaks."""
    r = reservation
    problem = _name("host", r.host) or _name("user", r.user)
    if problem:
        raise ReservationError(problem)
    if r.gpus is not None:
        if not isinstance(r.gpus, tuple) or not r.gpus or \
                any(not isinstance(c, Cell) for c in r.gpus):
            raise ReservationError(f"gpus: expected GPU indices 0 to {MAX_GPU_INDEX}, MIG "
                                   f"slices (0/7) or all, got {str(r.gpus)[:80]}")
        if len(r.gpus) > 1 and not _in_order(r.gpus):
            raise ReservationError(f"gpus: expected sorted GPUs without repeats, got "
                                   f"{gpus_text(r.gpus)}")
    for key, moment in (("until", r.until), ("from", r.start)):
        if moment is not None and (not isinstance(moment, dt.datetime)
                                   or moment.utcoffset() is None):
            raise ReservationError(f"{key}: expected a time with its zone, got {moment!r}")
    if r.start is not None and r.start >= r.until:
        raise ReservationError(f"from ({iso(r.start)}) is not before until ({iso(r.until)})")
    if not isinstance(r.comment, str) or r.comment != " ".join(r.comment.split()) or \
            not r.comment.isprintable() or len(r.comment) > MAX_COMMENT:
        raise ReservationError(f"comment must be one line of text of at most {MAX_COMMENT} "
                               f"characters, got {str(r.comment)[:80]!r}")
    if r.id and (not isinstance(r.id, str) or not ID_PATTERN.fullmatch(r.id)):
        raise ReservationError(f"id must be up to 32 letters, digits, _ . -, got {r.id!r}")


def new_id(taken: Collection[str]) -> str:
    """A fresh id: 8 hex digits that are not in `taken`."""
    while True:
        candidate = secrets.token_hex(4)
        if candidate not in taken:
            return candidate


def _derived_id(r: Reservation, taken: Collection[str]) -> str:
    """The id of an entry written before ids: the same for the same entry on every read, so it
    is stable until the next write stores it."""
    seed = "|".join([r.host, gpus_text(r.gpus), r.user, iso(r.start) if r.start else "",
                     iso(r.until), r.comment])
    for n in range(1_000_000):
        candidate = hashlib.sha256(f"{seed}|{n}".encode()).hexdigest()[:8]
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def with_ids(reservations: Sequence[Reservation]) -> list[Reservation]:
    """The reservations, each with an id: those without one get a fresh one."""
    taken = {r.id for r in reservations if r.id}
    result = []
    for r in reservations:
        if not r.id:
            r = replace(r, id=new_id(taken))
            taken.add(r.id)
        result.append(r)
    return result


_QUICK_KEYS = frozenset(_KEYS)


def _quick_entry(raw: Any) -> Reservation | None:
    """The reservation of an entry as gpuwatch writes it (strings, indices, full times), or
    None for any other, which _entry then reads with the whole of its messages."""
    if type(raw) is not dict or not raw.keys() <= _QUICK_KEYS:
        return None
    host, user, gpus_raw = raw.get("host"), raw.get("user"), raw.get("gpus")
    until_raw, start_raw = raw.get("until"), raw.get("from")
    comment, ident = raw.get("comment", ""), raw.get("id", "")
    if type(host) is not str or type(user) is not str or type(until_raw) is not str or \
            type(comment) is not str or type(ident) is not str or \
            (start_raw is not None and type(start_raw) is not str):
        return None
    if gpus_raw == ALL_GPUS:
        gpus: Gpus = None
    elif type(gpus_raw) is list and gpus_raw and all(type(i) is int for i in gpus_raw):
        if min(gpus_raw) < 0 or max(gpus_raw) > MAX_GPU_INDEX:
            return None
        gpus = tuple(interned(i) for i in sorted(set(gpus_raw)))
    elif type(gpus_raw) is list and gpus_raw:
        try:
            gpus = listed_gpus(gpus_raw)
        except ReservationError:
            return None
    else:
        return None
    try:
        until = dt.datetime.fromisoformat(until_raw)
        start = dt.datetime.fromisoformat(start_raw) if start_raw else None
    except ValueError:
        return None
    if len(until_raw) <= 10 or (start_raw is not None and len(start_raw) <= 10):
        return None  # a date alone: _entry's rules
    reservation = Reservation(host=host, gpus=gpus, user=user, until=until, start=start,
                              comment=comment, id=ident)
    try:
        check(reservation)
    except ReservationError:
        return None
    return reservation


def _entry(raw: Any, where: str, tz: dt.tzinfo | None) -> Reservation:
    quick = _quick_entry(raw)
    return quick if quick is not None else _full_entry(raw, where, tz)


def _full_entry(raw: Any, where: str, tz: dt.tzinfo | None) -> Reservation:
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
    if not isinstance(host, str):
        raise ReservationError(f"{where}: host must be a host name, got {host!r}")
    if not isinstance(user, (str, int)) or isinstance(user, bool):
        raise ReservationError(f"{where}: user must be a user name, without spaces, got "
                               f"{user!r}")
    gpus_raw = raw.get("gpus")
    try:
        if gpus_raw is None:
            raise ReservationError("gpus is missing: a list of indices and MIG slices "
                                   "(\"0/7\"), or all")
        if isinstance(gpus_raw, bool):
            raise ReservationError(f"gpus: expected indices or all, got {gpus_raw!r}")
        if isinstance(gpus_raw, int):
            gpus = parse_gpus(str(gpus_raw))
        elif isinstance(gpus_raw, str):
            gpus = parse_gpus(gpus_raw)
        elif isinstance(gpus_raw, list) and gpus_raw:
            gpus = listed_gpus(gpus_raw)
        else:
            raise ReservationError(f"gpus: expected a list of indices and MIG slices "
                                   f"(\"0/7\"), or all, got {str(gpus_raw)[:80]!r}")
    except ReservationError as e:
        raise ReservationError(f"{where}: {e}") from None
    until = file_time(raw["until"], True, f"{where}: until", tz)
    start = file_time(raw["from"], False, f"{where}: from", tz) \
        if raw.get("from") not in (None, "") else None
    comment = raw.get("comment")
    if comment is not None and not isinstance(comment, (str, int, float)):
        raise ReservationError(f"{where}: comment must be text, got {comment!r}")
    ident = raw.get("id")
    if ident is not None and not isinstance(ident, str):
        ident = str(ident)  # an id of digits only, unquoted
    reservation = Reservation(host=host.strip(), gpus=gpus, user=str(user).strip(),
                              until=until, start=start,
                              comment=" ".join(str(comment or "").split()), id=ident or "")
    try:
        check(reservation)
    except ReservationError as e:
        raise ReservationError(f"{where}: {e}") from None
    return reservation


def _label(index: int, raw: Any) -> str:
    if isinstance(raw, dict) and raw.get("user") and raw.get("host"):
        return f"reservations[{index}] ({raw['user']} on {raw['host']})"
    return f"reservations[{index}]"


def load_yaml(text: str, path: Path | str) -> Any:
    """The YAML document of a reservations file. The file as render() writes it is read by
    a reader of that layout alone (what YAML reads it as, an order of magnitude sooner);
    anything else, by the C loader where PyYAML has it. A problem is the one line parse_yaml
    makes of it (naming the file and the line)."""
    fast = _read_rendered(text)
    if fast is not None:
        return fast
    try:
        return yaml.load(text, Loader=_Loader)  # a safe loader (C where present)
    except yaml.YAMLError:
        return parse_yaml(text, path, ReservationError)


_CACHE_SIZE = 2
_parsed: dict[tuple[str, dt.tzinfo | None], tuple[Reservation, ...]] = {}
"""The entries of the texts parsed last (a service reads the same file on every request)."""


def parse(text: str, path: Path | str, now: dt.datetime,
          tz: dt.tzinfo | None = None) -> list[Reservation]:
    """The reservations of a file's text; ReservationError naming `path` for the first problem,
    including two reservations of the same GPU at the same time (expired ones aside) and two
    of one id. Entries without an id get one derived from the entry (see Reservation.id)."""
    key = (text, tz)
    cached = _parsed.get(key)
    if cached is None:
        cached = tuple(_parse_entries(text, path, tz))
        while len(_parsed) >= _CACHE_SIZE:
            del _parsed[next(iter(_parsed))]
        _parsed[key] = cached
    reservations = list(cached)
    check_overlaps(reservations, path, now)
    return reservations


def remember(text: str, tz: dt.tzinfo | None, reservations: Sequence[Reservation]) -> None:
    """Tells parse what `text` (just written by render from `reservations`, each as_stored)
    holds, so that the next read of it is not a parse."""
    while len(_parsed) >= _CACHE_SIZE:
        del _parsed[next(iter(_parsed))]
    _parsed[(text, tz)] = tuple(reservations)


def _parse_entries(text: str, path: Path | str, tz: dt.tzinfo | None) -> list[Reservation]:
    doc = load_yaml(text, path)
    if doc is None:
        return []
    if not isinstance(doc, dict) or set(doc) - {"reservations"}:
        raise ReservationError(f"{path}: expected a mapping with one key, reservations (a "
                               "list of bookings)")
    entries = doc.get("reservations") or []
    if not isinstance(entries, list):
        raise ReservationError(f"{path}: reservations: expected a list of bookings")
    reservations = []
    ids: dict[str, int] = {}
    for index, raw in enumerate(entries):
        try:
            reservation = _entry(raw, _label(index, raw), tz)
        except ReservationError as e:
            raise ReservationError(f"{path}: {e}") from None
        if reservation.id:
            if reservation.id in ids:
                raise ReservationError(
                    f"{path}: {_label(index, raw)}: id {reservation.id} is also the id of "
                    f"{_label(ids[reservation.id], entries[ids[reservation.id]])}; remove one "
                    "of the two id lines (the next change gives it a new one)")
            ids[reservation.id] = index
        reservations.append(reservation)
    if len(ids) < len(reservations):
        taken = set(ids)
        for index, reservation in enumerate(reservations):
            if not reservation.id:
                reservations[index] = replace(reservation, id=_derived_id(reservation, taken))
                taken.add(reservations[index].id)
    return reservations


def check_overlaps(reservations: Sequence[Reservation], path: Path | str,
                   now: dt.datetime) -> None:
    """ReservationError naming `path` for two current reservations of one GPU at the same
    time. An index per host and GPU: each GPU's reservations, sorted by start, are compared
    with the one reaching furthest before them, not every pair."""
    order = {id(b): i for i, b in enumerate(reservations)}
    # host -> (bookings of every GPU, GPU index -> (bookings of it whole, id -> of a slice))
    hosts: dict[str, tuple[list[Reservation],
                           dict[int, tuple[list[Reservation], dict[int, list[Reservation]]]]]] = {}
    for b in reservations:
        if b.expired(now):
            continue
        every, per_gpu = hosts.setdefault(b.host, ([], {}))
        if b.gpus is None:
            every.append(b)
            continue
        for c in b.gpus:
            whole, slices = per_gpu.setdefault(c.gpu, ([], {}))
            if c.instance is None:
                whole.append(b)
            else:
                slices.setdefault(c.instance, []).append(b)
    for every, per_gpu in hosts.values():
        # each bucket: bookings that all share one piece of hardware
        buckets: list[list[Reservation]] = [every]
        for whole, slices in per_gpu.values():
            above = [*every, *whole] if every else whole
            buckets.append(above)
            buckets.extend([*above, *one] for one in slices.values())
        for bucket in buckets:
            clash = _first_overlap(bucket)
            if clash:
                a, b = sorted(clash, key=lambda r: order[id(r)])
                raise ReservationError(f"{path}: two bookings of the same GPU at the same time: "
                                       f"{a.describe()} and {b.describe()}; change or remove "
                                       "one of them")


def _first_overlap(bucket: Sequence[Reservation]) -> tuple[Reservation, Reservation] | None:
    """Two reservations of `bucket` (all of one piece of hardware) that overlap in time, or
    None."""
    if len(bucket) < 2:
        return None
    earliest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    furthest: Reservation | None = None
    for b in sorted(bucket, key=lambda r: r.start or earliest):
        if furthest is not None and (b.start is None or b.start < furthest.until):
            return furthest, b
        if furthest is None or b.until > furthest.until:
            furthest = b
    return None


def as_stored(reservation: Reservation) -> Reservation:
    """The reservation as the file gives it back: its times to the second (the file's)."""
    r = reservation
    if r.until.microsecond or (r.start is not None and r.start.microsecond):
        r = replace(r, until=r.until.replace(microsecond=0),
                    start=r.start.replace(microsecond=0) if r.start is not None else None)
    return r


# -- the file's text as render() writes it, both ways ---------------------------------------
# Block YAML, one key a line, as PyYAML writes it: a string plain where YAML reads it back as
# that string, else in single quotes; GPUs as [0, 1] or all. _read_rendered reads exactly
# that layout (and full-line comments) and answers None for anything else, which YAML then
# reads; tests check that both readers agree.

_PLAIN = re.compile(r"[\w][\w.@/+()=-]*(?: [\w.@/+()=-]+)*")
_NUMBER_LIKE = re.compile(r"[-+]?(?:\.\d+|\d+(?:\.\d*)?)(?:[eE][-+]?\d+)?|0[xXoObB][\w]*|"
                          r"\d[\d_:.]*")
_RESOLVER = yaml.resolver.Resolver()
_STR = "tag:yaml.org,2002:str"
_plain_ok: dict[str, bool] = {}


def _is_plain(text: str) -> bool:
    """Whether `text` reads back as itself written without quotes (in YAML 1.1 and 1.2)."""
    ok = _plain_ok.get(text)
    if ok is None:
        ok = bool(_PLAIN.fullmatch(text)) and not _NUMBER_LIKE.fullmatch(text) and \
            _RESOLVER.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, text, (True, False)) == _STR
        if len(_plain_ok) > 100_000:
            _plain_ok.clear()
        _plain_ok[text] = ok
    return ok


def _scalar(text: str) -> str:
    return text if _is_plain(text) else "'" + text.replace("'", "''") + "'"


def _lines(r: Reservation) -> Iterator[str]:
    if r.id:
        yield f"id: {_scalar(r.id)}"
    yield f"host: {_scalar(r.host)}"
    yield "gpus: " + (ALL_GPUS if r.gpus is None else "[" + ", ".join(
        f"'{c}'" if c.is_slice else str(c) for c in r.gpus) + "]")
    yield f"user: {_scalar(r.user)}"
    if r.start is not None:
        yield f"from: '{iso(r.start)}'"
    yield f"until: '{iso(r.until)}'"
    if r.comment:
        yield f"comment: {_scalar(r.comment)}"


_blocks: dict[tuple[Reservation, str], str] = {}
"""Each reservation's lines, as render wrote them last (an edit rewrites every entry)."""


def _block(r: Reservation) -> str:
    key = (r, r.id)
    block = _blocks.get(key)
    if block is None:
        lines = list(_lines(r))
        block = "- " + "\n  ".join(lines) + "\n"
        if len(_blocks) > 50_000:
            _blocks.clear()
        _blocks[key] = block
    return block


def render(reservations: Iterable[Reservation]) -> str:
    """The file's text: HEADER, then the reservations in block YAML (see above)."""
    blocks = [_block(r) for r in reservations]
    if not blocks:
        return HEADER + "reservations: []\n"
    return HEADER + "reservations:\n" + "".join(blocks)


_NUMBER = r"(?:0|[1-9]\d{0,3})"
_ITEM = rf"(?:{_NUMBER}|'{_NUMBER}/{_NUMBER}')"
_VALUE = r"'(?:[^'\n]|'')*'|[^'\n][^\n]*"
_ENTRY = re.compile(
    rf"- (?:id: (?P<id>{_VALUE})\n  )?host: (?P<host>{_VALUE})\n"
    rf"  gpus: (?P<gpus>all|\[{_ITEM}(?:, {_ITEM})*\])\n"
    rf"  user: (?P<user>{_VALUE})\n"
    r"(?:  from: '(?P<from>[0-9T:+.-]+)'\n)?  until: '(?P<until>[0-9T:+.-]+)'\n"
    rf"(?:  comment: (?P<comment>{_VALUE})\n)?")
_START = re.compile(r"(?:#[^\n]*\n)*reservations:(?P<empty> \[\])?\n")
_ORDER = ("id", "host", "gpus", "user", "from", "until", "comment")


def _read_rendered(text: str) -> dict[str, Any] | None:
    """The document of a text in render()'s layout (header comments, then one key a line in
    its order), as YAML reads it; None for any other."""
    start = _START.match(text)
    if start is None:
        return None
    position = start.end()
    if start.group("empty"):
        return {"reservations": []} if position == len(text) else None
    entries: list[dict[str, Any]] = []
    match = _ENTRY.match
    for _ in range(len(text)):
        if position == len(text):
            return {"reservations": entries}
        found = match(text, position)
        if found is None:
            return None
        position = found.end()
        groups = found.groupdict()
        entry: dict[str, Any] = {}
        for key in _ORDER:
            value = groups[key]
            if value is None:
                continue
            if key == "gpus":
                entry[key] = value if value == ALL_GPUS else \
                    [i[1:-1] if i[0] == "'" else int(i) for i in value[1:-1].split(", ")]
            elif key in ("from", "until"):
                entry[key] = value
            elif value[0] == "'":
                entry[key] = value[1:-1].replace("''", "'")
            elif _is_plain(value):
                entry[key] = value
            else:
                return None
        entries.append(entry)
    return None
