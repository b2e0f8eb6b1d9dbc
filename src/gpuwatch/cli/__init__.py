"""gpuwatch: which GPU is free, and who holds the others, from Prometheus.

Argument parsing and output only, one module per command (status, pick, reserve, release,
reservations with its import action), registered in one table (COMMANDS); what they share is
in gpuwatch.cli.common. The fleet comes from gpuwatch.fleet, the states from
gpuwatch.contract.states, the reservations from gpuwatch.reservations (the reservations file,
which reserve, release and reservations edit without asking Prometheus).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from gpuwatch import __version__
from gpuwatch.cli import pick, release, reservations, reserve, run, serve, status
from gpuwatch.cli.common import PROG, Command, UserError, common_arguments
from gpuwatch.fleet import FleetError
from gpuwatch.fleet.prometheus import PrometheusError
from gpuwatch.reservations import ReservationError

COMMANDS: tuple[Command, ...] = (status.COMMAND, pick.COMMAND, reserve.COMMAND,
                                 release.COMMAND, reservations.COMMAND, run.COMMAND, serve.COMMAND)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Which GPU is free right now, and who "
                                "holds the others: the GPU fleet from Prometheus.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common_arguments(p, defaults=True)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        common_arguments(sub, defaults=False)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args, out or sys.stdout)
    except (PrometheusError, FleetError, UserError, ReservationError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (gpuwatch status | head): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code
