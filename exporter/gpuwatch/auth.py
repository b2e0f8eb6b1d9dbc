"""HTTP basic auth against the bcrypt hashes of the web config (exporter-toolkit format)."""

from __future__ import annotations

import base64
import functools
import hashlib
import threading

import bcrypt


class BasicAuth:
    """Checks HTTP basic auth against bcrypt hashes, caching what it has verified.

    bcrypt is slow by design (tens of milliseconds); a scrape every 15 s must not pay it
    every time, so verified credentials are remembered by their SHA-256, as the
    exporter-toolkit does.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self._users.get(user)
        if hashed is None:
            # spend the same time as for a known user, so names cannot be probed
            bcrypt.checkpw(password.encode(), _dummy_hash())
            return False
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed))).digest()
        with self._lock:
            if key in self._verified:
                return True
        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._verified.add(key)
        return True


@functools.cache
def _dummy_hash() -> bytes:
    """Hashed on first use, not at import: every start would pay for it."""
    return bcrypt.hashpw(b"gpuwatch", bcrypt.gensalt(rounds=10))
