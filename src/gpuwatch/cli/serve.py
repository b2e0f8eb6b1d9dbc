"""`gpuwatch serve`: the service on the monitoring host (gpuwatch.serve): bookings, claims,
the JSON API and the booking and claim metrics. The flags become a ServeOptions here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from gpuwatch import __version__, reservations
from gpuwatch.argtypes import positive_float, positive_int
from gpuwatch.cli.common import PROG, Command
from gpuwatch.credentials import shown
from gpuwatch.exporter.web import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
    parse_listen_address,
)
from gpuwatch.fleet.prometheus import PrometheusError
from gpuwatch.reservations import ReservationError
from gpuwatch.serve.app import build
from gpuwatch.serve.options import (
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_REFRESH_SECONDS,
    ServeOptions,
    parse_bool,
    parse_duration,
    parse_names,
    parse_networks,
    parse_url,
)
from gpuwatch.yamlfile import YamlFileError

NAME = f"{PROG} serve"
log = logging.getLogger("gpuwatch")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--web.listen-address", dest="listen_address", default=DEFAULT_LISTEN_ADDRESS,
                   metavar="HOST:PORT", help="address to listen on (default %(default)s)")
    p.add_argument("--web.config.file", dest="web_config", type=Path, metavar="FILE",
                   help="exporter-toolkit web config: TLS (tls_server_config) and basic auth "
                   "(basic_auth_users: the people and Prometheus); re-read when it changes")
    p.add_argument("--web.max-connections", dest="max_connections", type=positive_int,
                   metavar="N", help="open connections at most (default "
                   f"{DEFAULT_MAX_CONNECTIONS}, fewer when the fd limit is low)")
    p.add_argument("--web.read-timeout", dest="read_timeout", type=positive_float,
                   default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                   help="longest a client may take over a handshake, a request or its answer "
                   "(default %(default)s)")
    p.add_argument("--web.auth-header", dest="auth_header", metavar="HEADER",
                   help="a header naming the user (X-Forwarded-User), believed only from "
                   "--web.trusted-proxies")
    p.add_argument("--web.trusted-proxies", dest="trusted_proxies", default="",
                   metavar="CIDR,...", help="addresses of the reverse proxies whose "
                   "--web.auth-header counts")
    p.add_argument("--web.refresh", dest="refresh", metavar="DURATION",
                   help="how often the page refreshes (15s, 1m; default: the scrape interval "
                   "of job gpuwatch as Prometheus says, else "
                   f"{DEFAULT_REFRESH_SECONDS:g}s)")
    p.add_argument("--web.public-names", dest="public_names", default="true",
                   metavar="BOOL", help="false: visitors without an identity see no user "
                   "names, commands or comments in the page and the API (default %(default)s)")
    p.add_argument("--web.grafana-url", dest="grafana_url", metavar="URL",
                   help="Grafana's URL: the page links each node to its dashboard")
    p.add_argument("--reservations.file", dest="reservations_file", type=Path, metavar="FILE",
                   help=f"the reservations file (default: ${reservations.ENV_FILE})")
    p.add_argument("--admins", default="", metavar="NAME,...",
                   help="Unix user names who may book, release and end claims for anyone")
    p.add_argument("--users.map", dest="users_map", type=Path, metavar="FILE",
                   help="YAML mapping of login to Unix user name, for logins that are not "
                   "the user's name on the nodes")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=("debug", "info", "warn", "error"), help="(default %(default)s)")


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """The options the parsed flags ask for; ValueError for a bad value."""
    path = args.reservations_file or (Path(os.environ[reservations.ENV_FILE])
                                      if os.environ.get(reservations.ENV_FILE) else None)
    if path is None:
        raise ValueError(f"--reservations.file FILE is needed (or ${reservations.ENV_FILE})")
    if args.auth_header is not None and not args.auth_header.strip():
        raise ValueError("--web.auth-header: name a header, e.g. X-Forwarded-User")
    proxies = parse_networks(args.trusted_proxies)
    if args.auth_header and not proxies:
        raise ValueError("--web.auth-header needs --web.trusted-proxies: the addresses of "
                         "the proxies that set it")
    return ServeOptions(
        reservations_file=path, listen_address=args.listen_address,
        web_config_file=args.web_config, prometheus=args.prometheus,
        prometheus_timeout=args.timeout, prometheus_ca_file=args.prometheus_ca_file,
        admins=parse_names(args.admins),
        auth_header=args.auth_header.strip() if args.auth_header else None,
        trusted_proxies=proxies, users_map=args.users_map,
        max_connections=args.max_connections, read_timeout=args.read_timeout,
        log_level=args.log_level,
        refresh_seconds=parse_duration(args.refresh) if args.refresh is not None else None,
        public_names=parse_bool(args.public_names, "--web.public-names"),
        grafana_url=parse_url(args.grafana_url, "--web.grafana-url")
        if args.grafana_url else None)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    try:
        options = options_from_args(args)
        parse_listen_address(options.listen_address)
    except ValueError as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=options.log_level.upper().replace("WARN", "WARNING"), stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s source=%(name)s msg=%(message)r")
    try:
        serving = build(options)
    except (YamlFileError, ReservationError, ValueError, PrometheusError) as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{NAME}: error: cannot listen on {options.listen_address}: "
              f"{e.strerror or e}; pick another --web.listen-address", file=sys.stderr)
        return 2
    log.info("%s %s listening on %s (reservations %s, Prometheus %s)", NAME, __version__,
             options.listen_address, options.reservations_file, shown(options.prometheus))
    with contextlib.suppress(KeyboardInterrupt):
        serving.serve_forever()
    return 0


COMMAND = Command("serve", "the service on the monitoring host: bookings, claims, their JSON "
                  "API and metrics (docs/api.md)", _arguments, _run)
