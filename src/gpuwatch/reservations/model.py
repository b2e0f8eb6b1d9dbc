"""What a reservation is: a host's GPUs for a user until a time, and the file's text.

`Reservation` and the GPU set it holds (`Gpus`: sorted indices, or None for every GPU), how
people write GPUs and targets (parse_gpus, gpus_text, parse_target), and the reservations
file's text both ways (parse, render), checked for two reservations of one GPU at once. No
file is read or written here: gpuwatch.reservations.store does that.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpuwatch.contract.states import ALL_GPUS
from gpuwatch.reservations.errors import ReservationError
from gpuwatch.reservations.times import file_time, iso, short
from gpuwatch.yamlfile import parse_yaml

HEADER = (
    "# GPU reservations. Edit with `gpuwatch reserve`, `gpuwatch release` and\n"
    "# `gpuwatch reservations` (docs/reservations.md), which lock the file and check it.\n"
    "# Times are ISO 8601 with their zone; bookings that have ended stop counting.\n"
)
_KEYS = ("host", "gpus", "user", "from", "until", "comment")


# -- GPUs and targets -------------------------------------------------------------------------

Gpus = tuple[int, ...] | None
"""GPU indices, sorted; None: every GPU of the host."""


def parse_gpus(text: str) -> Gpus:
    """``all``, ``0,2``, ``0-3`` or a mix (``0,4-6``) -> sorted indices, or None for all."""
    text = text.strip()
    if text.lower() == ALL_GPUS:
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
        return ALL_GPUS
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
                                 "gpus": ALL_GPUS if self.gpus is None else _Indices(self.gpus),
                                 "user": self.user}
        if self.start is not None:
            entry["from"] = iso(self.start)
        entry["until"] = iso(self.until)
        if self.comment:
            entry["comment"] = self.comment
        return entry

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        return {"host": self.host, "gpus": ALL_GPUS if self.gpus is None else list(self.gpus),
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
    until = file_time(raw["until"], True, f"{where}: until", tz)
    start = file_time(raw["from"], False, f"{where}: from", tz) \
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
    """The reservations of a file's text; ReservationError naming `path` for the first problem,
    including two reservations of the same GPU at the same time (expired ones aside)."""
    doc = parse_yaml(text, path, ReservationError)
    if doc is None:
        return []
    if not isinstance(doc, dict) or set(doc) - {"reservations"}:
        raise ReservationError(f"{path}: expected a mapping with one key, reservations (a "
                               "list of bookings)")
    entries = doc.get("reservations") or []
    if not isinstance(entries, list):
        raise ReservationError(f"{path}: reservations: expected a list of bookings")
    reservations = []
    for index, raw in enumerate(entries):
        try:
            reservations.append(_entry(raw, _label(index, raw), tz))
        except ReservationError as e:
            raise ReservationError(f"{path}: {e}") from None
    check_overlaps(reservations, path, now)
    return reservations


def check_overlaps(reservations: Sequence[Reservation], path: Path | str,
                   now: dt.datetime) -> None:
    current = [b for b in reservations if not b.expired(now)]
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


def render(reservations: Iterable[Reservation]) -> str:
    body = yaml.dump({"reservations": [b.to_yaml() for b in reservations]}, Dumper=_Dumper,
                     sort_keys=False, allow_unicode=True, width=1000)
    return HEADER + body
