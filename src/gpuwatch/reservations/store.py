"""The reservations file on disk: read it (load, find, history), and edit it one writer at a time.

Each edit holds a lock on a file beside it (``PATH.lock``), checks every reservation it writes
with the rules the file is read with (model.check), and replaces the file in one step (a
temporary file in the same directory, fsync, rename), so two people reserving at once never
lose each other's reservation and a failed write leaves the old file as it was. Nothing is
ever written through a symbolic link or over what is not a regular file. Each change is
appended, under the same lock, to the audit log beside the file (``PATH.audit.jsonl``: one
JSON object a line, never rewritten). add, release and release_by_id are the edits
`gpuwatch reserve`, `gpuwatch release` and `gpuwatch serve` make.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpuwatch.cells import Cell
from gpuwatch.reservations.errors import Conflict, FileProblem, NotFound, ReservationError
from gpuwatch.reservations.model import (
    Gpus,
    Reservation,
    as_stored,
    cells_phrase,
    check,
    check_overlaps,
    gpus_text,
    new_id,
    parse,
    remember,
    render,
    share,
    with_ids,
)
from gpuwatch.reservations.times import fromisoformat, iso

ENV_FILE = "GPUWATCH_RESERVATIONS"
"""The environment variable naming the file when --file is not given."""
LOCK_SUFFIX = ".lock"
AUDIT_SUFFIX = ".audit.jsonl"
"""The audit log is the file's path with this added: reservations.yml.audit.jsonl."""
LOCK_TIMEOUT = 10.0
"""Seconds an edit waits for another one to finish before it gives up."""
FILE_MODE = 0o644
"""A new file is readable by everyone: the exporter, running as its own user, reads it. A new
audit log gets the file's mode and group."""
STALE_TEMP_SECONDS = 60.0
"""A temporary file of a writer that died is removed by the next write once it is this old."""
FROM_FILE = "file"
"""The audit log's `from` for an edit of the file itself (the command with --file)."""

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int, what: str = "the reservations file") -> FileProblem:
    return FileProblem(f"{path}: {what} is {_kind(mode)}, not a regular file; give the path of "
                       "a file (gpuwatch creates it) or remove what is there")


def _symlink(path: Path, what: str = "the reservations file") -> FileProblem:
    return FileProblem(f"{path}: {what} is a symbolic link, and gpuwatch never writes through "
                       f"one; use the file it points to ({os.path.realpath(path)}), or replace "
                       "the link by the file")


def load(path: Path, now: dt.datetime, tz: dt.tzinfo | None = None) -> list[Reservation]:
    """The reservations of the file; none when it does not exist yet. FileProblem when it
    cannot be read or is not a regular file (a FIFO is never waited on), or its content
    breaks the rules."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket
            raise _not_regular(path, stat.S_IFSOCK) from None
        raise FileProblem(f"{path}: cannot read: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise FileProblem(f"{path}: cannot read: {reason}") from None
    finally:
        os.close(fd)
    try:
        return parse(text, path, now, tz)
    except FileProblem:
        raise
    except ReservationError as e:
        raise FileProblem(str(e)) from None


def find(path: Path, reservation_id: str, now: dt.datetime,
         tz: dt.tzinfo | None = None) -> Reservation:
    """The reservation with that id; NotFound when none has it."""
    for r in load(path, now, tz):
        if r.id == reservation_id:
            return r
    raise _unknown(path, reservation_id)


def _unknown(path: Path, reservation_id: str) -> NotFound:
    return NotFound(f"{path}: no booking has the id {reservation_id!r}; `gpuwatch "
                    "reservations --json` lists them with their ids")


# -- editing the file: one writer at a time, replaced in one step -----------------------------

def _refuse_link_or_special(path: Path, what: str = "the reservations file") -> None:
    """FileProblem when `path` is a symbolic link or exists as anything but a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise FileProblem(f"{path}: cannot look at {what}: {e.strerror}") from None
    if stat.S_ISLNK(mode):
        raise _symlink(path, what)
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, what)


def _open_regular(path: Path, flags: int, what: str, mode: int = 0o644) -> int:
    """A descriptor of `path` opened without following a link and without waiting on a FIFO;
    FileProblem when it is a link or not a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink(path, what) from None
        if e.errno in (errno.ENXIO, errno.EISDIR):
            raise _not_regular(path, stat.S_IFSOCK if e.errno == errno.ENXIO else stat.S_IFDIR,
                               what) from None
        raise
    st_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        raise _not_regular(path, st_mode, what)
    return fd


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Holds the lock beside `path` (PATH.lock) for an edit; another edit waits up to
    `timeout` seconds. flock works on a descriptor opened read-only, so people who may not
    write the lock file itself (created by someone else) can still take it. The lock is never
    taken through a symbolic link, nor on what is not a regular file."""
    lock = path.with_name(path.name + LOCK_SUFFIX)
    try:
        fd = _open_regular(lock, os.O_RDONLY | os.O_CREAT, "the lock")
    except OSError as e:
        raise FileProblem(f"{path}: cannot open the lock {lock}: {e.strerror}; people "
                          "who book need write access to its directory") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FileProblem(f"{path}: another edit has held {lock} for more "
                                      f"than {timeout:g} s; try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names write() gives its temporary files (tempfile's 8 random characters)."""
    return re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")


def _remove_stale_temps(path: Path, now: float) -> None:
    """Removes the temporary files a killed writer left beside `path` (regular files of
    write()'s name pattern, older than STALE_TEMP_SECONDS); called under the lock, so no
    writer is using them."""
    pattern = _temp_pattern(path)
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(entry.path)


def _file_mode(path: Path) -> tuple[int, int | None]:
    """The mode and group a new version of the file (or a new audit log) gets."""
    try:
        old = os.lstat(path)
        return old.st_mode & 0o7777, old.st_gid
    except FileNotFoundError:
        return FILE_MODE, None


def write(path: Path, reservations: Iterable[Reservation]) -> list[Reservation]:
    """Replaces the file in one step: a temporary file beside it, written and fsynced, then
    renamed over it. Every reservation is checked first (model.check) and those without an id
    get one; returns what was written. On any failure the old file stays as it was and the
    temporary goes; a symbolic link or a non-regular file at `path` is refused. Hold
    locked(path) when others may edit the file (update does)."""
    written = [as_stored(r) for r in with_ids(list(reservations))]
    for r in written:
        _check(path, r)
    _replace(path, render(written))
    return written


def _check(path: Path, reservation: Reservation) -> None:
    try:
        check(reservation)
    except ReservationError as e:
        raise ReservationError(f"{path}: not written: {e}; the file is unchanged") from None


def _replace(path: Path, text: str) -> None:
    _refuse_link_or_special(path)
    mode, group = _file_mode(path)
    _remove_stale_temps(path, time.time())
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise FileProblem(f"{path}: cannot write in {path.parent}: {e.strerror}; people "
                          "who book need write access to that directory") from None
    renamed = False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if group is not None:
            with contextlib.suppress(PermissionError):  # keep the group where we may
                os.chown(tmp, -1, group)
        _refuse_link_or_special(path)  # the path could have changed while we wrote
        os.replace(tmp, path)
        renamed = True
    except OSError as e:
        raise FileProblem(f"{path}: not written ({e.strerror or e}); the file is "
                          "unchanged") from None
    finally:
        if not renamed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# -- the audit log ------------------------------------------------------------------------------

def audit_path(path: Path) -> Path:
    """The audit log of a reservations file: PATH.audit.jsonl beside it."""
    return path.with_name(path.name + AUDIT_SUFFIX)


def whoami() -> str:
    """The Unix user running this process: who an edit with --file is by."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _open_audit(path: Path) -> int:
    """The audit log opened for appending (created with the file's mode and group when it is
    new); FileProblem, before anything is changed, when it cannot be."""
    log = audit_path(path)
    what = "the audit log"
    try:
        try:
            fd = _open_regular(log, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, what)
        except FileExistsError:
            return _open_regular(log, os.O_RDWR | os.O_APPEND, what)
        mode, group = _file_mode(path)
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode & 0o666)
            if group is not None:
                os.fchown(fd, -1, group)
        return fd
    except FileProblem as e:
        raise FileProblem(f"{e}; the reservations file is unchanged") from None
    except OSError as e:
        raise FileProblem(f"{path}: cannot append to the audit log {log}: {e.strerror}; the "
                          "reservations file is unchanged") from None


def _append(fd: int, record: dict[str, Any]) -> None:
    """One line at the end of the log; a last line a killed writer left unfinished is ended
    first, so the new one stays readable."""
    size = os.fstat(fd).st_size
    line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
    if size and os.pread(fd, 1, size - 1) != b"\n":
        line = "\n" + line
    os.write(fd, line.encode("utf-8"))


def _record(action: str, who: str | None, source: str, now: dt.datetime,
            before: Sequence[Reservation], after: Sequence[Reservation]) -> dict[str, Any] | None:
    """What the audit log says of a change, or None when nothing changed. `reservations`: for
    a release, the bookings given back as they were (`kept`: what stays of those given back in
    part); otherwise the bookings added or changed as they are now (`removed`: those that
    went)."""
    old = {r.id: r for r in before}
    new = {r.id: r for r in after}
    gone = [r for r in before if r.id not in new]
    changed = [(r, new[r.id]) for r in before if r.id in new and new[r.id] != r]
    added = [r for r in after if r.id not in old]
    if not (gone or changed or added):
        return None
    entry: dict[str, Any] = {"time": iso(now), "who": who or whoami(), "action": action,
                             "from": source}
    if action == "release":
        entry["reservations"] = [r.to_api() for r in gone] + [r.to_api() for r, _ in changed]
        if changed:
            entry["kept"] = [r.to_api() for _, r in changed]
    else:
        entry["reservations"] = [r.to_api() for r in added] + [r.to_api() for _, r in changed]
        if gone:
            entry["removed"] = [r.to_api() for r in gone]
    return entry


def history(path: Path, user: str | None = None, reservation_id: str | None = None,
            since: dt.datetime | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The audit log's entries, oldest first: each {"time", "who", "action" (add, release,
    update, import), "from" (the client's address, or "file"), "reservations": [R, ...]} and,
    for some, "kept" or "removed" (see the log's description in docs/reservations.md). Only
    those by or for `user` (who made the change, or whose booking it is), of the booking
    `reservation_id`, at or after `since`; the last `limit`. No log yet: none. A line that is
    not a JSON object (the last one, cut short by a writer that was killed) is skipped."""
    log = audit_path(path)
    try:
        fd = os.open(log, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise FileProblem(f"{log}: cannot read the audit log: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(log, mode, "the audit log")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise FileProblem(f"{log}: cannot read the audit log: {e.strerror}") from None
    finally:
        os.close(fd)
    entries: list[dict[str, Any]] = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not _wanted(entry, user, reservation_id, since):
            continue
        entries.append(entry)
    return entries[-limit:] if limit is not None and limit >= 0 else entries


def _wanted(entry: dict[str, Any], user: str | None, reservation_id: str | None,
            since: dt.datetime | None) -> bool:
    concerned: list[dict[str, Any]] = []
    for key in ("reservations", "kept", "removed"):
        value = entry.get(key)
        if isinstance(value, list):
            concerned.extend(r for r in value if isinstance(r, dict))
    if user is not None and entry.get("who") != user and \
            not any(r.get("user") == user for r in concerned):
        return False
    if reservation_id is not None and not any(r.get("id") == reservation_id for r in concerned):
        return False
    if since is not None:
        try:
            if fromisoformat(str(entry.get("time"))) < since:
                return False
        except (ValueError, TypeError):
            return False
    return True


# -- edits ----------------------------------------------------------------------------------

def update(path: Path, change: Callable[[list[Reservation]], list[Reservation]],
           now: dt.datetime, tz: dt.tzinfo | None = None, *, action: str = "update",
           who: str | None = None, source: str = FROM_FILE) -> list[Reservation]:
    """Reads the file, applies `change`, checks and writes the result and appends what changed
    to the audit log (`action`, by `who`, default the Unix user, from `source`: the client's
    address, or "file"), all under the lock; returns the new reservations. Nothing is written
    when `change` raises, or a reservation it makes breaks the file's rules (model.check) or
    takes a GPU another one has at the same time."""
    if not path.parent.is_dir():
        raise FileProblem(f"{path}: the directory {path.parent} does not exist")
    _refuse_link_or_special(path)
    with locked(path):
        before = load(path, now, tz)
        known = {id(r) for r in before}
        reservations = [r if id(r) in known else as_stored(r)
                        for r in with_ids(change(list(before)))]
        for r in reservations:
            if id(r) not in known:  # what was read has been checked already
                _check(path, r)
        if len({r.id for r in reservations}) != len(reservations):
            raise ReservationError(f"{path}: not written: two bookings would have the same id; "
                                   "the file is unchanged")
        check_overlaps(reservations, path, now)
        record = _record(action, who, source, now, before, reservations)
        audit = _open_audit(path) if record else None
        text = render(reservations)
        try:
            _replace(path, text)
            remember(text, tz, reservations)
            if audit is not None and record is not None:
                with contextlib.suppress(OSError):  # the change is made; the log is best kept
                    _append(audit, record)
        finally:
            if audit is not None:
                os.close(audit)
    return reservations


def add(path: Path, reservation: Reservation, now: dt.datetime, replace_own: bool = False,
        tz: dt.tzinfo | None = None, *, who: str | None = None, source: str = FROM_FILE,
        allowed: Callable[[Sequence[Reservation]], None] | None = None) -> Reservation:
    """Adds a reservation and returns it as stored (with its new id). It must meet the file's
    rules, end in the future and take no GPU another reservation has at the same time
    (Conflict); with `replace_own`, the user's own reservations of those GPUs give way (to
    extend or shorten one). `allowed`, when given, sees the file's reservations under the lock
    and may raise to refuse (nothing is written then)."""
    if reservation.until <= now:
        raise ReservationError(f"{path}: until {iso(reservation.until)} is not in the future "
                               f"(now: {iso(now)})")
    try:
        check(reservation)
    except ReservationError as e:
        raise ReservationError(f"{path}: not booked: {e}") from None
    stored: list[Reservation] = []

    def change(reservations: list[Reservation]) -> list[Reservation]:
        if allowed is not None:
            allowed(reservations)
        if replace_own:
            reservations = _give_back(reservations, path, now, reservation.host,
                                      reservation.gpus, reservation.user)[1]
        for other in reservations:
            if not other.expired(now) and other.overlaps(reservation):
                hint = "; to change your own booking, add --replace" \
                    if other.user == reservation.user else "; ask them, or pick other GPUs"
                which, verb = _shared(reservation, other)
                raise Conflict(f"{path}: {which} of {reservation.host} {verb} already "
                               f"booked: {other.describe()}{hint}")
        taken = {r.id for r in reservations}
        new = as_stored(reservation if reservation.id and reservation.id not in taken else
                        replace(reservation, id=new_id(taken)))
        stored[:] = [new]
        return [*reservations, new]

    update(path, change, now, tz, action="add", who=who, source=source)
    return stored[0]


def _shared(a: Reservation, b: Reservation) -> tuple[str, str]:
    """The GPUs (or slices) two reservations of one host share, and the verb that goes with
    them."""
    shared = share(a.gpus, b.gpus)
    return cells_phrase(shared), "are" if shared is not None and len(shared) > 1 else "is"


def _give_back(reservations: Sequence[Reservation], path: Path | str, now: dt.datetime,
               host: str | None, gpus: Gpus, user: str | None, expired: bool = False
               ) -> tuple[list[Reservation], list[Reservation]]:
    """(the reservations concerned, as they were; all reservations after giving back): the `gpus` of
    `host` (every GPU when None; every host when `host` is None) booked by `user` (anyone
    when None), among the reservations that have ended (`expired`) or not. A reservation of several
    GPUs keeps those not given back (and its id)."""
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
        part = next((c for c in gpus for whole in b.gpus
                     if whole.covers(c) and whole != c), None)
        if part is not None:
            raise ReservationError(f"{path}: {b.describe()} books GPU {part.gpu} whole; "
                                   f"release {b.host}:{part.gpu}, then book the slices to keep")
        left = kept_cells(b.gpus, gpus)
        if left:
            result.append(replace(b, gpus=left))
    return concerned, result


def kept_cells(booked: Sequence[Cell], given_back: Gpus) -> tuple[Cell, ...]:
    """The cells of a booking that stay booked when `given_back` (None: all) is released."""
    if given_back is None:
        return ()
    return tuple(c for c in booked if not any(g.covers(c) for g in given_back))


@dataclass(frozen=True)
class Released:
    removed: list[Reservation]
    """The reservations as they were before being wholly or partly given back."""
    reservations: list[Reservation]


def release(path: Path, now: dt.datetime, host: str | None = None, gpus: Gpus = None,
            user: str | None = None, expired: bool = False,
            tz: dt.tzinfo | None = None, *, who: str | None = None,
            source: str = FROM_FILE) -> Released:
    """Gives GPUs back: the `gpus` of `host` (all of them when None), and/or everything
    `user` booked; with `expired`, the reservations that have ended (of `host`/`user`, or all).
    NotFound when nothing matches."""
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
            raise NotFound(f"{path}: there is no {what}; `gpuwatch reservations"
                           f"{' --all' if expired else ''}` lists them")
        removed[:] = concerned
        return result

    return Released(removed, update(path, change, now, tz, action="release", who=who,
                                    source=source))


def release_by_id(path: Path, reservation_id: str, now: dt.datetime,
                  tz: dt.tzinfo | None = None, *, who: str | None = None,
                  source: str = FROM_FILE,
                  allowed: Callable[[Reservation], None] | None = None) -> Reservation:
    """Removes the reservation with that id and returns it; NotFound when none has it.
    `allowed` sees it under the lock and may raise to refuse (the owner check of the
    service); nothing is written then."""
    removed: list[Reservation] = []

    def change(reservations: list[Reservation]) -> list[Reservation]:
        for r in reservations:
            if r.id == reservation_id:
                if allowed is not None:
                    allowed(r)
                removed[:] = [r]
                return [o for o in reservations if o is not r]
        raise _unknown(path, reservation_id)

    update(path, change, now, tz, action="release", who=who, source=source)
    return removed[0]
