"""Filters the gpuwatch roles share: systemd's quoting of command lines and the parsing of
listen addresses. Loaded with the gpuwatch_common role (the roles that import it get them).

Plain Python without Ansible imports, so that the tests call the same functions directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
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


class FilterModule:
    """gpuwatch_systemd_command, gpuwatch_systemd_quote, gpuwatch_listen_address."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "gpuwatch_systemd_command": systemd_command,
            "gpuwatch_systemd_quote": systemd_quote,
            "gpuwatch_listen_address": listen_address,
        }
