"""`gpuwatch pick N`: the indices of N free GPUs of this host, or the MIG UUID of a free MIG
slice (N = 1), for CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import argparse
import getpass
from typing import TextIO

from gpuwatch.argtypes import positive_int
from gpuwatch.cli.common import Command, ask_fleet
from gpuwatch.fleet import GpuStatus, gpus_of_host, local_names, pick


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("count", type=positive_int, metavar="N",
                   help="how many GPUs (a MIG slice only for 1: CUDA runs one per process)")
    p.add_argument("--host", metavar="NAME",
                   help="the host (its host label, or its target HOST:PORT); default: this "
                   "machine, by its host names")
    p.add_argument("--user", metavar="NAME",
                   help="GPUs reserved for NAME and not in use come first (default: you)")
    p.add_argument("--model", metavar="MODEL",
                   help="only GPUs of this model (part of its name, or its display name) or "
                   "MIG slices of this profile (1g.10gb)")


def _run(args: argparse.Namespace, out: TextIO) -> int:
    gpus = ask_fleet(args)
    names = [args.host] if args.host else local_names(args.prometheus)
    chosen = pick(gpus_of_host(gpus, names), args.count, args.user or getpass.getuser(),
                  args.model)
    out.write(",".join(map(visible_device, chosen)) + "\n")
    return 0


def visible_device(cell: GpuStatus) -> str:
    """What CUDA_VISIBLE_DEVICES takes for a cell: a whole GPU's index, a slice's MIG UUID."""
    if cell.gpu_instance_id is None:
        return str(cell.gpu)
    return cell.mig_uuid or ""  # pick() hands out no slice without its MIG UUID


COMMAND = Command("pick", "the indices of N free GPUs on this host (yours first, when you have "
                  "booked some), comma-separated, or the MIG UUID of a free MIG slice for "
                  "N=1; it holds nothing (gpuwatch run claims them); exits 1 when there are "
                  "fewer than N",
                  _arguments, _run)
