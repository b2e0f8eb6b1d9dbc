"""What every command shares: the one-line error, the command table's entry, the options
accepted before and after a command (Prometheus), the reservations file, and the clock."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gpuwatch import reservations
from gpuwatch.argtypes import positive_float
from gpuwatch.contract import ports, states
from gpuwatch.fleet import GpuStatus, read_fleet
from gpuwatch.fleet.prometheus import DEFAULT_TIMEOUT, ENV_PASSWORD, ENV_TOKEN, ENV_USER, Prometheus
from gpuwatch.reservations import ReservationError

PROG = "gpuwatch"
ENV_PROMETHEUS = "GPUWATCH_PROMETHEUS"
ENV_PROMETHEUS_CA_FILE = "GPUWATCH_PROMETHEUS_CA_FILE"
DEFAULT_PROMETHEUS = ports.PROMETHEUS_URL


class UserError(Exception):
    """Something to tell the user in one line, then exit 1."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


def default_or_suppress(defaults: bool) -> Callable[[object], object]:
    """For options given both before and after a command: the default lives on one parser
    only, so a value given before the command is not overwritten by the other's default."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS
    return default


# -- Prometheus --------------------------------------------------------------------------------

def common_arguments(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Options accepted before and after the command; the defaults live on the top level."""
    default = default_or_suppress(defaults)
    p.add_argument("--prometheus", metavar="URL",
                   default=default(os.environ.get(ENV_PROMETHEUS) or DEFAULT_PROMETHEUS),
                   help=f"the Prometheus to ask (default: ${ENV_PROMETHEUS}, else "
                   f"{DEFAULT_PROMETHEUS}); its credentials: http://USER:PASSWORD@HOST:PORT "
                   f"in the URL, else ${ENV_USER} and ${ENV_PASSWORD} (or ${ENV_TOKEN}), else "
                   "the netrc entry of its host ($NETRC, else ~/.netrc)")
    p.add_argument("--prometheus.ca-file", dest="prometheus_ca_file", type=Path,
                   metavar="PATH", default=default(_env_path(ENV_PROMETHEUS_CA_FILE)),
                   help="the PEM file of the CA that signed an https Prometheus' certificate "
                   f"(default: ${ENV_PROMETHEUS_CA_FILE}, else the system's CAs)")
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                   default=default(DEFAULT_TIMEOUT),
                   help="how long to wait for Prometheus, or gpuwatch serve (default "
                   f"{DEFAULT_TIMEOUT:g})")


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def prometheus(args: argparse.Namespace) -> Prometheus:
    """The client of --prometheus, with the credentials of the URL, the environment or netrc,
    trusting --prometheus.ca-file; PrometheusError when they cannot be had."""
    return Prometheus.from_environment(args.prometheus, args.timeout,
                                       ca_file=getattr(args, "prometheus_ca_file", None))


def ask_fleet(args: argparse.Namespace) -> list[GpuStatus]:
    """Every GPU the Prometheus of --prometheus knows; UserError when it knows none."""
    client = prometheus(args)
    found = read_fleet(client, processes=False)  # the CLI shows no processes
    if not found:
        raise UserError(f"Prometheus at {client.shown_url} knows no GPUs (no "
                        f"{states.STATE_INFO} series): are the gpuwatch rules loaded and the "
                        "exporters in its targets?")
    return found


# -- the reservations file ---------------------------------------------------------------------

def file_arguments(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--file", type=Path, metavar="PATH",
                   default=None if defaults else argparse.SUPPRESS,
                   help="the reservations file itself, for the admin on the monitoring host "
                   f"(default: ${reservations.ENV_FILE} when no --server is given)")


def reservations_file(args: argparse.Namespace) -> Path:
    """--file, else the file of the environment; UserError naming both ways (and the
    service's) when there is neither."""
    path: Path | None = args.file
    if path is None and os.environ.get(reservations.ENV_FILE):
        path = Path(os.environ[reservations.ENV_FILE])
    if path is None:
        raise UserError("which reservations? Pass --server URL or set GPUWATCH_SERVER "
                        "(gpuwatch serve); on the monitoring host, --file PATH or "
                        f"{reservations.ENV_FILE} (the file gpuwatch serve reads)")
    return path


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def when(text: str, moment: dt.datetime, end: bool, option: str) -> dt.datetime:
    """The time `option` gives, from `moment`; UserError naming the option."""
    try:
        return reservations.parse_when(text, moment, end=end).replace(microsecond=0)
    except ReservationError as e:
        raise UserError(f"{option} {e}") from None
