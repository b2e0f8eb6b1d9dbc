"""Claims: free GPUs (or a MIG slice) of one host held for a user for a few minutes
(`gpuwatch run`), until their time is up or the user's process shows up on every one of them.

Kept in memory: a claim bridges the seconds between asking for GPUs and the job holding them,
so a restart of the service simply ends the claims in flight (their jobs then run on GPUs
that show as busy by them, or the CLI asks again).
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpuwatch.cells import Cell
from gpuwatch.reservations.times import iso


@dataclass(frozen=True)
class Claim:
    id: str
    host: str
    gpus: tuple[Cell, ...]
    """The cells held: whole GPUs, or one MIG slice."""
    uuids: tuple[str, ...]
    """What CUDA_VISIBLE_DEVICES takes, one per cell: the GPU's UUID, a slice's MIG UUID."""
    user: str
    until: float
    """Unix time the claim ends unless it ends before (by use, or released)."""
    created: float

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "host": self.host, "gpus": [c.to_json() for c in self.gpus],
                "uuids": list(self.uuids), "user": self.user,
                "until": iso(dt.datetime.fromtimestamp(self.until, dt.timezone.utc))}

    def holds(self, host: str, cell: Cell) -> bool:
        """Whether it holds hardware of `cell` (Cell.overlaps)."""
        return host == self.host and any(c.overlaps(cell) for c in self.gpus)


def new_id() -> str:
    """A claim's id: short, unguessable enough that ids are not a way to find claims."""
    return "c" + secrets.token_hex(6)


class ClaimBook:
    """The claims in force. Thread-safe; the service takes its own lock around a check and
    the add that follows it, so that two claims never share a GPU."""

    def __init__(self) -> None:
        self._claims: dict[str, Claim] = {}
        self._lock = threading.Lock()

    def active(self, now: float) -> list[Claim]:
        """The claims whose time is not up, oldest first; those that are up are dropped."""
        with self._lock:
            for claim in [c for c in self._claims.values() if c.until <= now]:
                del self._claims[claim.id]
            return sorted(self._claims.values(), key=lambda c: (c.created, c.id))

    def get(self, claim_id: str) -> Claim | None:
        with self._lock:
            return self._claims.get(claim_id)

    def add(self, claim: Claim) -> None:
        with self._lock:
            self._claims[claim.id] = claim

    def remove(self, claim_id: str) -> Claim | None:
        with self._lock:
            return self._claims.pop(claim_id, None)

    def remove_all(self, claims: Iterable[Claim]) -> None:
        with self._lock:
            for claim in claims:
                self._claims.pop(claim.id, None)

    def held(self, now: float) -> set[tuple[str, Cell]]:
        """(host, cell) of every GPU or slice an active claim holds."""
        return {(c.host, g) for c in self.active(now) for g in c.gpus}


def in_use_by_owner(claim: Claim,
                    users_by_gpu: Mapping[tuple[str, Cell], Sequence[str]]) -> bool:
    """Whether a process of the claim's owner runs on every cell it holds (a slice's users
    are the slice's own)."""
    return all(claim.user in users_by_gpu.get((claim.host, g), ()) for g in claim.gpus)
