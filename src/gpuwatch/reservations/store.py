"""The reservations file on disk: read it (load), and edit it one writer at a time.

Each edit holds a lock on a file beside it (``PATH.lock``) and replaces the file in one step
(a temporary file in the same directory, fsync, rename), so two people reserving at once never
lose each other's reservation and a failed write leaves the old file as it was. add and release
are the edits `gpuwatch reserve` and `gpuwatch release` make.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpuwatch.reservations.errors import ReservationError
from gpuwatch.reservations.model import Gpus, Reservation, check_overlaps, gpus_text, parse, render
from gpuwatch.reservations.times import iso

ENV_FILE = "GPUWATCH_RESERVATIONS"
"""The environment variable naming the file when --file is not given."""
LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT = 10.0
"""Seconds an edit waits for another one to finish before it gives up."""
FILE_MODE = 0o644
"""A new file is readable by everyone: the exporter, running as its own user, reads it."""


def load(path: Path, now: dt.datetime, tz: dt.tzinfo | None = None) -> list[Reservation]:
    """The reservations of the file; none when it does not exist yet."""
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


def write(path: Path, reservations: Iterable[Reservation]) -> None:
    """Replaces the file in one step: a temporary file beside it, written and fsynced, then
    renamed over it. On any failure the old file stays as it was and the temporary goes."""
    text = render(reservations)
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
    returns the new reservations. Nothing is written when `change` raises."""
    path = resolve(path)
    if not path.parent.is_dir():
        raise ReservationError(f"{path}: the directory {path.parent} does not exist")
    with locked(path):
        reservations = change(load(path, now, tz))
        check_overlaps(reservations, path, now)
        write(path, reservations)
    return reservations


# -- reserve, release -------------------------------------------------------------------------

def add(path: Path, reservation: Reservation, now: dt.datetime, replace_own: bool = False,
        tz: dt.tzinfo | None = None) -> list[Reservation]:
    """Adds a reservation. It must end in the future and take no GPU another reservation has at the
    same time; with `replace_own`, the user's own reservations of those GPUs give way (to extend
    or shorten one)."""
    if reservation.until <= now:
        raise ReservationError(f"{path}: until {iso(reservation.until)} is not in the future "
                               f"(now: {iso(now)})")
    if reservation.start is not None and reservation.start >= reservation.until:
        raise ReservationError(f"{path}: from {iso(reservation.start)} is not before until "
                               f"{iso(reservation.until)}")

    def change(reservations: list[Reservation]) -> list[Reservation]:
        if replace_own:
            reservations = _give_back(reservations, path, now, reservation.host,
                                      reservation.gpus, reservation.user)[1]
        for other in reservations:
            if not other.expired(now) and other.overlaps(reservation):
                hint = "; to change your own booking, add --replace" \
                    if other.user == reservation.user else "; ask them, or pick other GPUs"
                which, verb = _shared(reservation, other)
                raise ReservationError(f"{path}: {which} of {reservation.host} {verb} already "
                                       f"booked: {other.describe()}{hint}")
        return [*reservations, reservation]

    return update(path, change, now, tz)


def _shared(a: Reservation, b: Reservation) -> tuple[str, str]:
    """The GPUs two reservations of one host share, and the verb that goes with them."""
    if a.gpus is None and b.gpus is None:
        return "every GPU", "is"
    shared = tuple(sorted(set(a.gpus or b.gpus or ()) & set(b.gpus or a.gpus or ())))
    return (f"GPUs {gpus_text(shared)}", "are") if len(shared) > 1 else \
        (f"GPU {shared[0]}", "is")


def _give_back(reservations: Sequence[Reservation], path: Path | str, now: dt.datetime,
               host: str | None, gpus: Gpus, user: str | None, expired: bool = False
               ) -> tuple[list[Reservation], list[Reservation]]:
    """(the reservations concerned, as they were; all reservations after giving back): the `gpus` of
    `host` (every GPU when None; every host when `host` is None) booked by `user` (anyone
    when None), among the reservations that have ended (`expired`) or not. A reservation of several
    GPUs keeps those not given back."""
    concerned: list[Reservation] = []
    result: list[Reservation] = []
    for b in reservations:
        if b.expired(now) != expired or (user is not None and b.user != user) or \
                (host is not None and not b.shares_gpus(host, gpus)):
            result.append(b)
            continue
        concerned.append(b)
        if host is None or gpus is None:
            continue  # the whole reservation goes
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
    """The reservations as they were before being wholly or partly given back."""
    reservations: list[Reservation]


def release(path: Path, now: dt.datetime, host: str | None = None, gpus: Gpus = None,
            user: str | None = None, expired: bool = False,
            tz: dt.tzinfo | None = None) -> Released:
    """Gives GPUs back: the `gpus` of `host` (all of them when None), and/or everything
    `user` booked; with `expired`, the reservations that have ended (of `host`/`user`, or all).
    ReservationError when nothing matches."""
    if host is None and user is None and not expired:
        raise ReservationError("say what to release: HOST:GPUS, --user NAME, or --expired")
    removed: list[Reservation] = []

    def change(reservations: list[Reservation]) -> list[Reservation]:
        concerned, result = _give_back(reservations, path, now, host, gpus, user, expired)
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
