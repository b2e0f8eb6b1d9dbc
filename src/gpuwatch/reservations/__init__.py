"""Reservations: who has booked which GPUs of which host, until when. One YAML file.

The file is the source of truth. ``gpuwatch serve`` (and ``gpuwatch reserve / release /
reservations --file``) edit it, each edit under a lock on a file beside it (``PATH.lock``),
checked with the same rules the file is read with, and written in one step (a temporary file
in the same directory, fsync, rename; never through a symbolic link or over what is not a
regular file), so two people reserving at once never lose each other's reservation and a failed
write leaves the old file as it was. Each change is appended to the audit log beside it
(``PATH.audit.jsonl``). The reservation metrics are read from it on each scrape. A
reservation counts from ``from`` (when it was made, unless booked ahead) until ``until``;
expired reservations stop counting by themselves and may stay in the file.

    reservations:
      - id: 3f2a9c1b                       # given when it is added; stable
        host: gpu-srv-01
        gpus: [0, 1]                       # GPU indices (0-1023), MIG slices '0/7', or: all
        user: alice
        from: '2024-05-20T09:12:00+02:00'  # optional
        until: '2024-05-31T23:59:59+02:00'
        comment: NeurIPS deadline

Times are ISO 8601 with their zone. A bare date means the end of that day (``until``) or
its start (``from``) in the local time zone of the machine that reads it; the command
writes full times with their offset. Every problem is a ReservationError: one line that
names the file (errors: its kinds, NotFound, Conflict and FileProblem, for the service).

By concern: `model` (Reservation, GPU sets, targets, the rules, the file's text both ways),
`times` (what people type and what the file holds), `store` (load, find, history, and the
locked one-step edits: add, release, release_by_id, update) and `legacy` (the old
comments.json importer, which only the command imports). The names of the first three are
re-exported here; legacy's are not, so that the exporter, which imports this package, never
loads the importer.
"""

from __future__ import annotations

from gpuwatch.reservations.errors import Conflict, FileProblem, NotFound, ReservationError
from gpuwatch.reservations.model import (
    HEADER,
    MAX_COMMENT,
    MAX_GPU_INDEX,
    MAX_NAME,
    Gpus,
    Reservation,
    cells,
    cells_phrase,
    check,
    check_overlaps,
    gpus_json,
    gpus_text,
    new_id,
    parse,
    parse_gpus,
    parse_target,
    render,
)
from gpuwatch.reservations.store import (
    AUDIT_SUFFIX,
    ENV_FILE,
    FILE_MODE,
    FROM_FILE,
    LOCK_SUFFIX,
    LOCK_TIMEOUT,
    Released,
    add,
    audit_path,
    find,
    history,
    load,
    locked,
    release,
    release_by_id,
    update,
    whoami,
    write,
)
from gpuwatch.reservations.times import WHEN_FORMATS, iso, parse_when, short

__all__ = [
    "AUDIT_SUFFIX", "ENV_FILE", "FILE_MODE", "FROM_FILE", "HEADER", "LOCK_SUFFIX",
    "LOCK_TIMEOUT", "MAX_COMMENT", "MAX_GPU_INDEX", "MAX_NAME", "WHEN_FORMATS", "Conflict",
    "FileProblem", "Gpus", "NotFound", "Released", "Reservation", "ReservationError", "add",
    "audit_path", "cells", "cells_phrase", "check", "check_overlaps", "find", "gpus_json",
    "gpus_text", "history", "iso", "load", "locked", "new_id", "parse", "parse_gpus",
    "parse_target", "parse_when", "release", "release_by_id", "render", "short", "update",
    "whoami", "write",
]
