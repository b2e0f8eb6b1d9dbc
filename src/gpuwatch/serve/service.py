"""The service's operations, checked and blocking, without HTTP: bookings (the reservations
file, through gpuwatch.reservations' store), claims (in memory), the fleet.

Every operation takes the asker's Identity and a request body already parsed as JSON (a
mapping of anything: every field is checked here), and answers plain data or raises
ApiError(status, one line). Writes are checked against the fleet Prometheus sees (an unknown
host or GPU is a 400 naming the known ones) and against each other: one lock covers a claim's
choice of GPUs and a booking's check of the claims, so no two claims share a GPU and no booking
takes a claimed one.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpuwatch import reservations as store
from gpuwatch.cells import Cell
from gpuwatch.contract import states
from gpuwatch.fleet import FleetError, GpuStatus, choose, matches_model
from gpuwatch.fleet.prometheus import PrometheusError
from gpuwatch.reservations import (
    MAX_GPU_INDEX,
    Conflict,
    FileProblem,
    Gpus,
    NotFound,
    Reservation,
    ReservationError,
    cells_phrase,
)
from gpuwatch.reservations.model import listed_gpus, share
from gpuwatch.reservations.times import iso
from gpuwatch.serve.claims import Claim, ClaimBook, in_use_by_owner, new_id
from gpuwatch.serve.identity import USER_NAME, Identity
from gpuwatch.serve.options import DEFAULT_CLAIM_MINUTES, MAX_CLAIM_MINUTES

log = logging.getLogger(__name__)

FleetSource = Callable[[], Sequence[GpuStatus]]
"""The fleet as Prometheus sees it now (gpuwatch.fleet.read_fleet); raises PrometheusError."""
IntervalSource = Callable[[], float | None]
"""The scrape interval of job gpuwatch in seconds as Prometheus has it; None when it cannot
say; may raise PrometheusError."""

MAX_FORCED_GPUS = 64
"""A forced booking of a host the fleet does not know may name GPUs 0 to this less one."""
MAX_CLAIM_GPUS = 64
_RESERVATION_KEYS = ("host", "gpus", "until", "start", "comment", "user", "force")
_EXTEND_KEYS = ("until",)
_CLAIM_KEYS = ("count", "host", "model", "minutes")
_CLAIMABLE_STATES = (states.FREE.name, states.RESERVED.name, states.CLAIMED.name)
"""States Prometheus may show for a GPU nobody uses; whether it is booked or claimed the
service knows better than the last scrape (the file and its claims)."""


class ApiError(Exception):
    """A refusal: the HTTP status and one line for the asker."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


def store_error(e: ReservationError, path: Path) -> ApiError:
    """The refusal of a store's error: 404 unknown id, 409 taken, 503 the file's trouble,
    else 400; the line without the file's name (the asker does not need the server's path)."""
    status = 404 if isinstance(e, NotFound) else 409 if isinstance(e, Conflict) else \
        503 if isinstance(e, FileProblem) else 400
    return ApiError(status, str(e).removeprefix(f"{path}: "))


@dataclass(frozen=True)
class _Body:
    """A request body's fields, each read with its type checked."""

    data: Mapping[str, Any]
    known: tuple[str, ...]

    def check_keys(self) -> None:
        unknown = sorted(set(map(str, self.data)) - set(self.known))
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; known fields: "
                           f"{', '.join(self.known)}")

    def text(self, key: str, required: bool = False, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            if required:
                raise ApiError(400, f"{key} is missing")
            return default
        if not isinstance(value, str):
            raise ApiError(400, f"{key} must be a string, got {_kind(value)}")
        return value

    def whole(self, key: str, low: int, high: int, default: int | None = None) -> int:
        value = self.data.get(key)
        if value is None:
            if default is None:
                raise ApiError(400, f"{key} is missing: a whole number from {low} to {high}")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"{key} must be a whole number from {low} to {high}, got "
                           f"{_kind(value)}")
        if not low <= value <= high:
            raise ApiError(400, f"{key} must be from {low} to {high}, got {value}")
        return value

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise ApiError(400, f"{key} must be true or false, got {_kind(value)}")
        return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number"}.get(type(value), "null") \
        if value is not None else "null"


def _host(text: str) -> str:
    host = text.strip()
    if not host or any(c.isspace() for c in host) or len(host) > 253:
        raise ApiError(400, f"host must be a host name as `gpuwatch status` shows it, got "
                       f"{text[:80]!r}")
    return host


def parse_gpus_field(value: object) -> Gpus:
    """gpus as a list of indices and MIG slices ("0/7"), "all", or a string as the CLI takes
    it ("0,2", "0-3", "0/7,0/8")."""
    if isinstance(value, list):
        if not value or not all(isinstance(i, (int, str)) and not isinstance(i, bool)
                                for i in value):
            raise ApiError(400, "gpus must be a non-empty list of GPU indices and MIG slices "
                           "(\"0/7\"), \"all\", or a string such as \"0-3\"")
        if any(isinstance(i, int) and (i < 0 or i > MAX_GPU_INDEX) for i in value):
            raise ApiError(400, f"gpus: indices run from 0 to at most {MAX_GPU_INDEX}")
        try:
            return listed_gpus(value)
        except ReservationError as e:
            raise ApiError(400, str(e)) from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ApiError(400, "gpus must be a list of GPU indices and MIG slices (\"0/7\"), "
                       f"\"all\", or a string such as \"0-3\", got {_kind(value)}")
    if any(int(n) > MAX_GPU_INDEX for n in re.findall(r"\d{1,12}", value)) or \
            re.search(r"\d{13}", value):
        raise ApiError(400, f"gpus {value[:40]!r}: indices run from 0 to at most "
                       f"{MAX_GPU_INDEX}")
    try:
        return store.parse_gpus(value)
    except ReservationError as e:
        raise ApiError(400, f"gpus: {e}") from None


def _cuda_uuid(g: GpuStatus) -> str:
    """What CUDA_VISIBLE_DEVICES takes for it: the MIG UUID of a slice, else the GPU's UUID
    ("" when the series do not say)."""
    return (g.mig_uuid or "") if g.cell.is_slice else g.uuid


class Service:
    """Bookings, claims and the fleet, for identities. Thread-safe."""

    def __init__(self, reservations_file: Path, fleet: FleetSource, *,
                 clock: Callable[[], float] = time.time, tz: dt.tzinfo | None = None,
                 default_claim_minutes: int = DEFAULT_CLAIM_MINUTES,
                 max_claim_minutes: int = MAX_CLAIM_MINUTES) -> None:
        self.path = reservations_file
        self.fleet_source = fleet
        self.clock = clock
        self.tz = tz
        self.default_claim_minutes = default_claim_minutes
        self.max_claim_minutes = max_claim_minutes
        self.claims = ClaimBook()
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, Cell], tuple[str, float]] = {}
        """(instance, cell) -> (state, since): the state each GPU or slice was last seen in
        and since when it has been seen in it (a change seen between two readings of the
        fleet)."""
        self._seen_lock = threading.Lock()

    # -- time, file, fleet ---------------------------------------------------------------

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(int(self.clock()), dt.timezone.utc)

    def _load(self, now: dt.datetime) -> list[Reservation]:
        try:
            return store.load(self.path, now, self.tz)
        except ReservationError as e:
            raise ApiError(503, f"the reservations file cannot be used: {e}; an admin must "
                           "fix it") from None

    def fleet(self) -> list[GpuStatus]:
        """The fleet now, each GPU's `since` filled in where its series do not tell and this
        service saw it change to its state."""
        try:
            gpus = list(self.fleet_source())
        except (PrometheusError, FleetError, OSError) as e:
            raise ApiError(503, f"the fleet is not known now: {e}") from None
        return self._with_since(gpus)

    def _with_since(self, gpus: list[GpuStatus]) -> list[GpuStatus]:
        moment = self.clock()
        out = []
        with self._seen_lock:
            seen, self._seen = self._seen, {}
            first = not seen
            for g in gpus:
                key = (g.instance, g.cell)
                before = seen.get(key)
                if before is not None and before[0] == g.state:
                    since = before[1]
                elif before is not None or not first:
                    since = g.updated if g.updated is not None else moment  # a change seen
                else:
                    since = float("nan")  # in that state since before this service looked
                self._seen[key] = (g.state, since)
                if g.since is None and since == since:  # not nan
                    g = replace(g, since=since)
                out.append(g)
        return out

    def _gpus_of(self, fleet: Sequence[GpuStatus], host: str, admin: bool) -> list[GpuStatus]:
        """The GPUs of the host as `gpuwatch status` names it (or, when none is named so
        exactly, its name in another case or its exporter's instance)."""
        gpus = [g for g in fleet if g.host == host]
        if not gpus:
            wanted = host.lower()
            gpus = [g for g in fleet if wanted in (g.host.lower(), g.instance.lower())]
        if len({g.host for g in gpus}) > 1:
            raise ApiError(400, f"{host} names several hosts "
                           f"({', '.join(sorted({g.host for g in gpus}))}); name one")
        if not gpus:
            hosts = sorted({g.host for g in fleet})
            hint = "; an admin may pass \"force\": true for a host that is not up yet" \
                if admin else ""
            raise ApiError(400, f"{host} is not among the hosts Prometheus knows "
                           f"({', '.join(hosts) or 'none'}){hint}")
        return gpus

    def _check_gpus(self, host: str, gpus: Gpus, known: Sequence[Cell]) -> None:
        """A booking names cells the fleet has: a whole GPU (a MIG-enabled one too, whose
        cells are its slices: the booking covers them) or a slice the fleet shows."""
        if gpus is None:
            return
        indices = {c.gpu for c in known}
        unknown = [c for c in gpus if c not in known if c.is_slice or c.gpu not in indices]
        if unknown:
            have = tuple(sorted(set(known), key=Cell.sort_key))
            raise ApiError(400, f"{host} has {cells_phrase(have)}; it has no "
                           f"{cells_phrase(tuple(sorted(unknown, key=Cell.sort_key)))}")

    # -- bookings ------------------------------------------------------------------------

    def list_reservations(self) -> list[dict[str, Any]]:
        """Every booking of the file, in its order: those that have ended too (until in the
        past), until someone releases them (`gpuwatch release --expired`)."""
        return [r.to_api() for r in self._load(self.now())]

    def create_reservation(self, who: Identity, data: Mapping[str, Any]) -> dict[str, Any]:
        if who.user is None:
            raise ApiError(401, "who are you? Bookings need a user (basic auth or the proxy)")
        body = _Body(data, _RESERVATION_KEYS)
        body.check_keys()
        host = _host(body.text("host", required=True))
        if "gpus" not in data:
            raise ApiError(400, "gpus is missing: a list of indices, \"all\", or \"0-3\"")
        gpus = parse_gpus_field(data["gpus"])
        user = body.text("user", default=who.user).strip()
        force = body.flag("force")
        if user != who.user and not who.admin:
            raise ApiError(403, f"only an admin books for someone else ({user})")
        if not USER_NAME.fullmatch(user):
            raise ApiError(400, f"user must be a user name, got {user[:40]!r}")
        if force and not who.admin:
            raise ApiError(403, "only an admin may force a booking of a host that is not up")
        comment = " ".join(body.text("comment").split())
        now = self.now()
        until = self._when(body.text("until", required=True), now, True, "until")
        start = self._when(body.text("start", default="now"), now, False, "start")
        if until <= now:
            raise ApiError(400, f"until {iso(until)} is not in the future (now: {iso(now)})")
        if start >= until:
            raise ApiError(400, f"start {iso(start)} is not before until {iso(until)}")
        try:
            fleet = self.fleet()
        except ApiError:
            if not force:
                raise
            fleet = []
        if force and not any(g.host == host for g in fleet):
            if gpus is not None and max(c.gpu for c in gpus) >= MAX_FORCED_GPUS:
                raise ApiError(400, f"a forced booking names GPUs 0 to {MAX_FORCED_GPUS - 1}")
        else:
            known = self._gpus_of(fleet, host, who.admin)
            host = known[0].host
            self._check_gpus(host, gpus, [g.cell for g in known])
        booking = Reservation(host=host, gpus=gpus, user=user, until=until, start=start,
                              comment=comment)
        with self._lock:
            self._check_claims(booking, now)
            try:
                stored = store.add(self.path, booking, now, tz=self.tz, who=who.user,
                                   source=who.client)
            except ReservationError as e:
                raise store_error(e, self.path) from None
        log.info("%s booked %s (id %s)", self._who(who), stored.describe(), stored.id)
        return stored.to_api()

    def _check_claims(self, booking: Reservation, now: dt.datetime) -> None:
        for claim in self.claims.active(self.clock()):
            if claim.host != booking.host or claim.user == booking.user:
                continue
            shared = share(booking.gpus, claim.gpus)
            starts = booking.start or now
            if shared and starts.timestamp() < claim.until:
                raise ApiError(409, f"{cells_phrase(shared)} of {claim.host} "
                               f"{'are' if len(shared) > 1 else 'is'} "
                               f"claimed by {claim.user} until "
                               f"{iso(dt.datetime.fromtimestamp(claim.until, dt.timezone.utc))}")

    def _when(self, text: str, now: dt.datetime, end: bool, key: str) -> dt.datetime:
        try:
            return store.parse_when(text, now, end, self.tz)
        except ReservationError as e:
            raise ApiError(400, f"{key}: {e}") from None
        except (ValueError, OverflowError):  # a number past int()'s digit limit, say
            raise ApiError(400, f"{key}: {text[:40]!r}... is not a time: use "
                           f"{store.WHEN_FORMATS}") from None

    def extend_reservation(self, who: Identity, reservation: str,
                           data: Mapping[str, Any]) -> dict[str, Any]:
        """A new end for a booking (longer or shorter), by its owner or an admin; the same
        checks as a new booking (no one else's booking or claim of its GPUs then)."""
        if who.user is None:
            raise ApiError(401, "who are you? Changing a booking needs a user (basic auth or "
                           "the proxy)")
        body = _Body(data, _EXTEND_KEYS)
        body.check_keys()
        now = self.now()
        until = self._when(body.text("until", required=True), now, True, "until")
        if until <= now:
            raise ApiError(400, f"until {iso(until)} is not in the future (now: {iso(now)})")
        changed: list[Reservation] = []

        def change(reservations: list[Reservation]) -> list[Reservation]:
            for i, r in enumerate(reservations):
                if r.id != reservation:
                    continue
                if not who.may_act_for(r.user):
                    raise ApiError(403, f"{r.describe()} is {r.user}'s: only they or an admin "
                                   "change it")
                if r.start is not None and r.start >= until:
                    raise ApiError(400, f"until {iso(until)} is not after its start "
                                   f"{iso(r.start)}")
                new = replace(r, until=until)
                for other in reservations:
                    if other is not r and not other.expired(now) and other.overlaps(new):
                        raise Conflict(f"{self.path}: {r.host} is booked then already: "
                                       f"{other.describe()}")
                self._check_claims(new, now)
                changed[:] = [new]
                return [*reservations[:i], new, *reservations[i + 1:]]
            raise NotFound(f"{self.path}: no booking has the id {reservation[:40]!r}")

        with self._lock:
            try:
                stored = store.update(self.path, change, now, self.tz, action="update",
                                      who=who.user, source=who.client)
            except ReservationError as e:
                raise store_error(e, self.path) from None
        found = next(r for r in stored if r.id == reservation)
        log.info("%s changed %s (id %s)", self._who(who), found.describe(), found.id)
        return found.to_api()

    def delete_reservation(self, who: Identity, reservation: str) -> None:
        if who.user is None:
            raise ApiError(401, "who are you? Releasing needs a user (basic auth or the proxy)")

        def allowed(found: Reservation) -> None:
            if not who.may_act_for(found.user):
                raise ApiError(403, f"{found.describe()} is {found.user}'s: only they or an "
                               "admin release it")

        with self._lock:
            try:
                removed = store.release_by_id(self.path, reservation, self.now(), tz=self.tz,
                                              who=who.user, source=who.client, allowed=allowed)
            except ReservationError as e:
                raise store_error(e, self.path) from None
        log.info("%s released %s (id %s)", self._who(who), removed.describe(), removed.id)

    def history(self, who: Identity) -> list[dict[str, Any]]:
        """The audit log: all of it for an admin, else the entries by or for the asker."""
        if who.user is None:
            raise ApiError(401, "who are you? The history needs a user (basic auth or the "
                           "proxy)")
        try:
            return store.history(self.path, user=None if who.admin else who.user)
        except ReservationError as e:
            raise store_error(e, self.path) from None

    # -- claims --------------------------------------------------------------------------

    def list_claims(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.claims.active(self.clock())]

    def create_claim(self, who: Identity, data: Mapping[str, Any]) -> dict[str, Any]:
        if who.user is None:
            raise ApiError(401, "who are you? Claims need a user (basic auth or the proxy)")
        body = _Body(data, _CLAIM_KEYS)
        body.check_keys()
        count = body.whole("count", 1, MAX_CLAIM_GPUS)
        host = _host(body.text("host", required=True))
        model = body.text("model").strip().lower()
        minutes = body.whole("minutes", 1, self.max_claim_minutes, self.default_claim_minutes)
        gpus = self._gpus_of(self.fleet(), host, False)
        host = gpus[0].host
        # a MIG-enabled GPU is no cell of its own: CUDA runs on its slices
        parents = {g.gpu for g in gpus if g.cell.is_slice}
        gpus = [g for g in gpus if g.cell.is_slice or g.gpu not in parents]
        if model:
            gpus = [g for g in gpus if matches_model(g, model)]
            if not gpus:
                raise ApiError(409, f"{host} has no GPU of the model {model!r}")
            if count > 1 and all(g.cell.is_slice for g in gpus):
                raise ApiError(409, f"{model!r} names MIG slices of {host}: CUDA runs one MIG "
                               "slice per process; ask for -n 1")
        with self._lock:
            moment = self.clock()
            now = dt.datetime.fromtimestamp(int(moment), dt.timezone.utc)
            until = float(int(moment) + minutes * 60)
            window = Reservation(host=host, gpus=None, user=who.user, start=now,
                                 until=dt.datetime.fromtimestamp(until, dt.timezone.utc))
            booked = [r for r in self._load(now) if r.overlaps(window) and not r.expired(now)]
            held = [c for (h, c) in self.claims.held(moment) if h == host]
            mine: list[GpuStatus] = []
            free: list[GpuStatus] = []
            for g in gpus:
                cell = g.cell
                if any(c.overlaps(cell) for c in held) or g.state not in _CLAIMABLE_STATES or \
                        g.users or not _cuda_uuid(g):  # CUDA_VISIBLE_DEVICES names it
                    continue
                bookers = {r.user for r in booked
                           if r.gpus is None or any(b.overlaps(cell) for b in r.gpus)}
                if not bookers:
                    free.append(g)
                elif bookers == {who.user}:
                    mine.append(g)
            chosen = choose(mine, free, count)
            if len(chosen) < count:
                usable = [g for g in mine + free if not g.cell.is_slice]
                slices = len(mine) + len(free) - len(usable)
                also = f" and {slices} MIG slice{'' if slices == 1 else 's'}, one per " \
                    "process (-n 1)" if slices else ""
                raise ApiError(409, f"{host} has {len(usable)} GPU"
                               f"{'' if len(usable) == 1 else 's'}{also} free to claim "
                               f"(of {len(gpus)}{' ' + model if model else ''}), {count} wanted")
            chosen.sort(key=lambda g: g.cell.sort_key())
            claim = Claim(id=new_id(), host=host, gpus=tuple(g.cell for g in chosen),
                          uuids=tuple(_cuda_uuid(g) for g in chosen), user=who.user,
                          until=until, created=moment)
            self.claims.add(claim)
        log.info("%s claimed %s of %s for %d min (claim %s)", self._who(who),
                 cells_phrase(claim.gpus), host, minutes, claim.id)
        return claim.to_json()

    def delete_claim(self, who: Identity, claim_id: str) -> None:
        if who.user is None:
            raise ApiError(401, "who are you? Ending a claim needs a user (basic auth or the "
                           "proxy)")
        claim = self.claims.get(claim_id)
        if claim is None or claim.until <= self.clock():
            raise ApiError(404, f"no claim has the id {claim_id[:40]!r}; it may have ended")
        if not who.may_act_for(claim.user):
            raise ApiError(403, f"claim {claim.id} is {claim.user}'s: only they or an admin "
                           "end it")
        self.claims.remove(claim.id)
        log.info("%s ended claim %s", self._who(who), claim.id)

    def end_claims_in_use(self) -> list[Claim]:
        """Ends the claims whose owner now runs on every claimed GPU (as Prometheus shows
        it); asks Prometheus only while there are claims. The claims ended."""
        active = self.claims.active(self.clock())
        if not active:
            return []
        try:
            fleet = list(self.fleet_source())
        except (PrometheusError, FleetError, OSError) as e:
            log.debug("claims not checked for use: %s", e)
            return []
        users = {(g.host, g.cell): g.users for g in fleet}
        ended = [c for c in active if in_use_by_owner(c, users)]
        self.claims.remove_all(ended)
        for claim in ended:
            log.info("claim %s of %s ended: %s runs on %s", claim.id, claim.host,
                     claim.user, cells_phrase(claim.gpus))
        return ended

    @staticmethod
    def _who(who: Identity) -> str:
        return f"{who.user} ({who.via} from {who.client or 'unknown'})"
