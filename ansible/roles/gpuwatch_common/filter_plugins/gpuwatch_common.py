"""Filters the gpuwatch roles share: systemd's quoting of command lines and environment files,
the parsing of listen addresses, and the bcrypt hashes of web configurations. Loaded with the
gpuwatch_common role (the roles that import it get them).

Plain Python without Ansible imports, so that the tests call the same functions directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

LISTEN_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]*):(?P<port>[0-9]{1,5})$")
"""HOST:PORT, [IPv6]:PORT or :PORT, as --web.listen-address takes it."""
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
"""Hosts that mean every address: a client on the same machine reaches them on loopback."""
_NEEDS_QUOTES = re.compile(r"[\s'\"\\;]")
CONTINUATION = " \\\n    "
"""Between the words of a command line in a unit: one argument per line."""


def systemd_quote(word: object) -> str:
    """One word of ExecStart=, as systemd reads it back: backslashes and double quotes escaped,
    % and $ doubled (no specifier or variable expansion), quoted where it holds white space,
    quotes, a backslash or a semicolon, or nothing."""
    escaped = (str(word).replace("\\", "\\\\").replace('"', '\\"')
               .replace("%", "%%").replace("$", "$$"))
    if not escaped or _NEEDS_QUOTES.search(escaped):
        return f'"{escaped}"'
    return escaped


def systemd_command(argv: Iterable[object]) -> str:
    """A command line for ExecStart=: every word quoted for systemd, one per line."""
    words = [systemd_quote(word) for word in argv]
    if not words:
        raise ValueError("systemd_command needs at least the program")
    return CONTINUATION.join(words)


def listen_address(address: object) -> dict[str, Any]:
    """HOST:PORT taken apart: valid (bool), host (without brackets), port (int; 0 when not
    valid) and probe_host (where a client on the same machine connects: loopback for a
    wildcard host)."""
    match = LISTEN_ADDRESS.match(str(address))
    port = int(match.group("port")) if match else 0
    if match is None or not 1 <= port <= 65535:
        return {"valid": False, "host": "", "port": 0, "probe_host": ""}
    host = match.group("host").removeprefix("[").removesuffix("]")
    return {"valid": True, "host": host, "port": port,
            "probe_host": "127.0.0.1" if host in WILDCARD_HOSTS else host}


def systemd_environment_value(value: object) -> str:
    """A value of an EnvironmentFile= line, as systemd reads it back: in double quotes, with
    the characters a shell escapes there (backslash, double quote, $, backtick) escaped.
    A line break cannot be kept: ValueError."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError("an environment file value cannot hold a line break")
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
"""How bcrypt hashes begin, as exporter-toolkit reads them in basic_auth_users."""


def bcrypt_users(passwords: Mapping[str, object], current: Mapping[str, object] | None = None,
                 cost: int = 10) -> dict[str, str]:
    """basic_auth_users of an exporter-toolkit web configuration: each user's password as a
    bcrypt hash. A hash of `current` (the configuration on the host) is kept while it still
    matches the password, so that a second run writes the same file; others are new, with a
    fresh salt. Needs the bcrypt module on the controller."""
    try:
        import bcrypt
    except ImportError as e:
        raise ValueError("hashing web passwords needs the Python module bcrypt on the "
                         "controller: pip install bcrypt into the Python that runs "
                         "ansible-playbook") from e
    kept = current if isinstance(current, Mapping) else {}
    hashes: dict[str, str] = {}
    for user, password in passwords.items():
        secret = str(password).encode()
        old = kept.get(user)
        if isinstance(old, str) and old.startswith(BCRYPT_PREFIXES):
            try:
                if bcrypt.checkpw(secret, old.encode()):
                    hashes[str(user)] = old
                    continue
            except ValueError:
                pass  # not a hash bcrypt can read: replaced below
        hashes[str(user)] = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=cost)).decode()
    return hashes


class FilterModule:
    """gpuwatch_systemd_command, gpuwatch_systemd_quote, gpuwatch_systemd_environment_value,
    gpuwatch_listen_address, gpuwatch_bcrypt_users."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "gpuwatch_systemd_command": systemd_command,
            "gpuwatch_systemd_quote": systemd_quote,
            "gpuwatch_systemd_environment_value": systemd_environment_value,
            "gpuwatch_bcrypt_users": bcrypt_users,
            "gpuwatch_listen_address": listen_address,
        }
