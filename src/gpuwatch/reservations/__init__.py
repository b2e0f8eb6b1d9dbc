"""Reservations: who has booked which GPUs of which host, until when. One YAML file.

The file is the source of truth. ``gpuwatch reserve / release / reservations`` edit it, each
edit under a lock on a file beside it (``PATH.lock``) and written in one step (a temporary
file in the same directory, fsync, rename), so two people reserving at once never lose each
other's reservation and a failed write leaves the old file as it was. The exporter's reservation
collector reads it on each scrape. A reservation counts from ``from`` (when it was made, unless
booked ahead) until ``until``; expired reservations stop counting by themselves and may stay in
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

By concern: `model` (Reservation, GPU sets, targets, the file's text both ways), `times`
(what people type and what the file holds), `store` (load, and the locked one-step edits:
add, release, update) and `legacy` (the old comments.json importer, which only the command
imports). The names of the first three are re-exported here; legacy's are not, so that the
exporter, which imports this package, never loads the importer.
"""

from __future__ import annotations

from gpuwatch.reservations.errors import ReservationError
from gpuwatch.reservations.model import (
    HEADER,
    Gpus,
    Reservation,
    check_overlaps,
    gpus_text,
    parse,
    parse_gpus,
    parse_target,
    render,
)
from gpuwatch.reservations.store import (
    ENV_FILE,
    FILE_MODE,
    LOCK_SUFFIX,
    LOCK_TIMEOUT,
    Released,
    add,
    load,
    locked,
    release,
    resolve,
    update,
    write,
)
from gpuwatch.reservations.times import WHEN_FORMATS, iso, parse_when, short

__all__ = [
    "ENV_FILE", "FILE_MODE", "HEADER", "LOCK_SUFFIX", "LOCK_TIMEOUT", "WHEN_FORMATS", "Gpus",
    "Released", "Reservation", "ReservationError", "add", "check_overlaps", "gpus_text", "iso",
    "load", "locked", "parse", "parse_gpus", "parse_target", "parse_when", "release", "render",
    "resolve", "short", "update", "write",
]
