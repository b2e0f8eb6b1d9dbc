"""What `gpuwatch serve` is asked to do, as one frozen object (the flags become it in
gpuwatch.cli.serve; tests build it directly)."""

from __future__ import annotations

import ipaddress
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

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
