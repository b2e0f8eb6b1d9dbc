"""HTTP basic auth against the bcrypt hashes of the web config (exporter-toolkit format)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import bcrypt

log = logging.getLogger(__name__)

MAX_PASSWORD_BYTES = 72
"""bcrypt reads no more; Go's bcrypt refuses longer passwords, and so does Python's (bcrypt 5
raises ValueError): such a password can never match."""


@dataclass(frozen=True)
class Budget:
    """A token bucket: `burst` bcrypt checks at once, refilled at `per_second`."""

    burst: float
    per_second: float


PER_CLIENT = Budget(burst=5, per_second=1)
"""New (not yet cached) credentials checked per client address: enough for a person who
mistypes, too few for guessing."""
OVERALL = Budget(burst=20, per_second=5)
"""New credentials checked for all clients together, so that many addresses cannot burn the
node's CPU either: at cost 10 (about 60 ms), at most a third of one core."""


class _Bucket:
    def __init__(self, budget: Budget, now: float) -> None:
        self.budget, self.tokens, self.at = budget, budget.burst, now
        self.dry = False
        """Refused since the last token was taken (logged once)."""

    def refill(self, now: float) -> bool:
        """Whether a token is left after refilling up to now."""
        self.tokens = min(self.budget.burst,
                          self.tokens + (now - self.at) * self.budget.per_second)
        self.at = now
        return self.tokens >= 1


class _LRU:
    """A bounded set of digests, the least recently used forgotten first."""

    def __init__(self, size: int) -> None:
        self._size, self._keys = size, OrderedDict[bytes, None]()

    def seen(self, key: bytes) -> bool:
        if key not in self._keys:
            return False
        self._keys.move_to_end(key)
        return True

    def add(self, key: bytes) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)


class BasicAuth:
    """Checks HTTP basic auth against bcrypt hashes, at a bounded cost.

    bcrypt is slow by design (tens of milliseconds per check). A scrape every 15 s must not pay
    it every time, so the outcome of a check, success or failure, is remembered by the SHA-256
    of user, password and hash, as exporter-toolkit does; repeating the same wrong password
    costs nothing. Credentials not seen before are checked one at a time (as exporter-toolkit
    does) and only while the client's and the overall budgets last; beyond them the answer is
    "no" without a check. An unknown user is checked against a dummy hash of the users' cost
    and counts against the same budgets, so it costs what a known user costs. Thread-safe.
    """

    def __init__(self, users: Mapping[str, bytes], *, per_client: Budget = PER_CLIENT,
                 overall: Budget = OVERALL, cache_size: int = 1024, clients: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_client, self._clock = per_client, clock
        self._verified, self._refused = _LRU(cache_size), _LRU(cache_size)
        self._overall = _Bucket(overall, clock())
        self._clients: OrderedDict[str, _Bucket] = OrderedDict()
        self._max_clients = clients
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()
        self.set_users(users)

    def set_users(self, users: Mapping[str, bytes]) -> None:
        """New users and hashes (a reloaded web config); the caches stay valid, as their keys
        hold the hash."""
        costs = Counter(hashed[4:6] for hashed in users.values())
        cost = max(costs, key=lambda c: (costs[c], c)) if costs else b"10"
        # bcrypt spends the cost on it and then fails to match it: no hashing at start
        dummy = b"$2b$" + cost + b"$" + b"." * 53
        with self._lock:
            self._users, self._dummy = dict(users), dummy

    def allows(self, header: str | None, client: str = "") -> bool:
        """Whether the Authorization header holds a user's password; client (the peer's
        address) is charged for a bcrypt check of credentials not seen before."""
        credentials = _credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        if len(password) > MAX_PASSWORD_BYTES:
            return False
        with self._lock:
            hashed = self._users.get(user)
            known = hashed is not None
            against = hashed if hashed is not None else self._dummy
            key = hashlib.sha256(b"".join(len(part).to_bytes(4, "big") + part for part in (
                user.encode(errors="surrogatepass"), password, against))).digest()
            if self._verified.seen(key):
                return known
            if self._refused.seen(key):
                return False
            if not self._charge(client):
                return False
        with self._bcrypt:
            try:
                matches = bcrypt.checkpw(password, against)
            except ValueError:  # a hash bcrypt refuses: load_web_config lets none through
                matches = False
        allowed = matches and known
        with self._lock:
            (self._verified if allowed else self._refused).add(key)
        return allowed

    def user(self, header: str | None, client: str = "") -> str | None:
        """The user whose password the Authorization header holds, as `allows` checks it;
        None when it holds none."""
        credentials = _credentials(header)
        if credentials is None or not self.allows(header, client):
            return None
        return credentials[0]

    def _charge(self, client: str) -> bool:
        """Takes one check from the client's budget and the overall one, or none when either
        is spent. Called with the lock held."""
        now = self._clock()
        bucket = self._clients.get(client)
        if bucket is None:
            bucket = self._clients[client] = _Bucket(self._per_client, now)
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
        self._clients.move_to_end(client)
        for spent, name in ((bucket, f"from {client or 'an unnamed client'}"),
                            (self._overall, "from all clients together")):
            if not spent.refill(now):
                if not spent.dry:
                    spent.dry = True
                    log.warning("basic auth: too many new credentials %s; refusing them "
                                "unchecked until the budget refills", name)
                return False
        for spent in (bucket, self._overall):
            spent.tokens -= 1
            spent.dry = False
        return True


def _credentials(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) of a Basic Authorization header; None when it is not one."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None
