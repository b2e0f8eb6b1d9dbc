"""`gpuwatch pick N`: the indices of N free GPUs of this host, for CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import argparse
import getpass
from typing import TextIO

from gpuwatch.argtypes import positive_int
from gpuwatch.cli.common import Command, ask_fleet
from gpuwatch.fleet import gpus_of_host, local_names, pick


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("count", type=positive_int, metavar="N", help="how many GPUs")
    p.add_argument("--host", metavar="NAME",
                   help="the host (its host label, or its target HOST:PORT); default: this "
                   "machine, by its host names")
    p.add_argument("--user", metavar="NAME",
                   help="GPUs reserved for NAME and not in use come first (default: you)")


def _run(args: argparse.Namespace, out: TextIO) -> int:
    gpus = ask_fleet(args)
    names = [args.host] if args.host else local_names(args.prometheus)
    chosen = pick(gpus_of_host(gpus, names), args.count, args.user or getpass.getuser())
    out.write(",".join(map(str, chosen)) + "\n")
    return 0


COMMAND = Command("pick", "the indices of N free GPUs on this host (yours first, when you have "
                  "booked some), comma-separated; it holds nothing (gpuwatch run claims them); "
                  "exits 1 when there are fewer than N",
                  _arguments, _run)
