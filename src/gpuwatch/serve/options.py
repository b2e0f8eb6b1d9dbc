"""What `gpuwatch serve` is asked to do, as one frozen object (the flags become it in
gpuwatch.cli.serve; tests build it directly)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gpuwatch.contract import ports
from gpuwatch.exporter.web import DEFAULT_READ_TIMEOUT

DEFAULT_LISTEN_ADDRESS = f":{ports.RESERVATIONS_PORT}"
DEFAULT_CLAIM_MINUTES = 5
"""How long a claim holds its GPUs when the request does not say."""
MAX_CLAIM_MINUTES = 60
"""The longest claim: a claim bridges the time until a job starts, it is no booking."""
CLAIM_POLL_SECONDS = 5.0
"""How often Prometheus is asked whether the owner of a claim now runs on its GPUs."""

DEFAULT_REFRESH_SECONDS = 15.0
"""How often the page refreshes when neither --web.refresh nor Prometheus says (the scrape
interval of job gpuwatch)."""
SCRAPE_INTERVAL_RECHECK_SECONDS = 300.0
"""How often the scrape interval is asked of Prometheus again."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?"
                       r"(?:(\d+(?:\.\d+)?)ms)?")


def parse_duration(text: str, flag: str = "--web.refresh") -> float:
    """"15s", "1m30s", "500ms", "2" (seconds) -> seconds, at least 0.1; ValueError naming
    the flag otherwise. Prometheus' scrape_interval ("15s", "1m") reads the same way."""
    value = text.strip()
    seconds: float | None = None
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.fullmatch(value)
        if value and match is not None:
            h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + s + ms / 1000
    if seconds is None or not seconds >= 0.1 or seconds > 86400:
        raise ValueError(f"{flag}: {text[:40]!r} is not a duration from 100ms to 24h (for "
                         "example 15s, 1m, 1m30s)")
    return seconds


def parse_bool(text: str, flag: str) -> bool:
    """true/false (yes/no, 1/0, on/off); ValueError naming the flag."""
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{flag}: {text[:40]!r} is neither true nor false")


def parse_url(text: str, flag: str) -> str:
    """An http(s) URL without a trailing slash; ValueError naming the flag."""
    value = text.strip().rstrip("/")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or \
            any(c.isspace() or c in "\"'<>" for c in value):
        raise ValueError(f"{flag}: {text[:80]!r} is not an http(s) URL (for example "
                         "https://grafana.lab.example)")
    return value


def parse_networks(text: str | Iterable[str]) -> tuple[Network, ...]:
    """"10.0.0.1,192.168.0.0/24,::1" -> networks; ValueError naming the bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks: list[Network] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"--web.trusted-proxies: {item!r} is not an IP address or CIDR "
                             "(for example 127.0.0.1 or 10.0.0.0/8)") from None
    return tuple(networks)


def parse_names(text: str | Iterable[str]) -> frozenset[str]:
    """"alice, bob" -> {"alice", "bob"}."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return frozenset(i.strip() for i in items if i.strip())


@dataclass(frozen=True)
class ServeOptions:
    """Everything `gpuwatch serve` needs; the defaults are the flags' defaults."""

    reservations_file: Path
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    web_config_file: Path | None = None
    prometheus: str = ports.PROMETHEUS_URL
    prometheus_timeout: float = 10.0
    prometheus_ca_file: Path | None = None
    """--prometheus.ca-file: the CA an https Prometheus' certificate is checked against. The
    credentials for Prometheus are the URL's, else the environment's, else netrc
    (gpuwatch.credentials), worked out when the service is built: never kept here."""
    admins: frozenset[str] = frozenset()
    """Unix user names (after --users.map) who may act for anyone."""
    auth_header: str | None = None
    """A header (X-Forwarded-User) naming the user, believed from trusted_proxies only."""
    trusted_proxies: tuple[Network, ...] = ()
    users_map: Path | None = None
    """A YAML mapping of login -> Unix user name."""
    max_connections: int | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT
    log_level: str = "info"
    claim_poll_seconds: float = CLAIM_POLL_SECONDS
    own_process_metrics: bool = True
    """prometheus_client's process_* series of the service itself on /metrics."""
    refresh_seconds: float | None = None
    """--web.refresh: how often the page asks again; None: the scrape interval of job
    gpuwatch as Prometheus says (DEFAULT_REFRESH_SECONDS when it cannot say)."""
    public_names: bool = True
    """--web.public-names: whether an asker without identity sees users' names, commands and
    comments (false: the fleet, bookings and claims come without them)."""
    grafana_url: str | None = None
    """--web.grafana-url: where the page links each node's dashboard."""
