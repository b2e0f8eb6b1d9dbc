"""`gpuwatch status`: the fleet as a grid, one line per cell (a GPU, or a MIG slice "0/7" right
after the lower whole GPUs), or as JSON."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import TextIO

from gpuwatch.cli.common import Command, ask_fleet
from gpuwatch.contract import states
from gpuwatch.fleet import GpuStatus

_ANSI = {"green": "32", "yellow": "33", "purple": "35", "blue": "34", "red": "31",
         "orange": "38;5;208"}
GIB = float(1 << 30)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="one JSON object per GPU or MIG slice (host, gpu, state, users, model, "
                   "memory, utilisation, reservation, claim, gpu_instance_id, profile, "
                   "mig_uuid), for scripts")
    p.add_argument("--free", action="store_true", help="only the free GPUs and MIG slices")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the states: auto (when the output is a terminal and NO_COLOR "
                   "is not set), always or never")


def _run(args: argparse.Namespace, out: TextIO) -> int:
    gpus = ask_fleet(args)
    shown = [g for g in gpus if g.state == states.FREE.name] if args.free else gpus
    if args.json:
        json.dump([g.to_json() for g in shown], out, indent=2)
        out.write("\n")
        return 0
    colour = args.color == "always" or (
        args.color == "auto" and out.isatty() and not os.environ.get("NO_COLOR"))
    out.write(render_grid(shown, colour=colour, now=time.time()))
    out.write(summary(gpus) + "\n")
    return 0


def render_grid(gpus: Sequence[GpuStatus], colour: bool, now: float) -> str:
    """The grid: one line per cell (a MIG slice as GPU/GPU-instance, its model with its
    profile, its own memory, no utilisation: NVML has none per slice), grouped by host (named
    once), states coloured; a column with the reservation (who, until when, why) and the claim
    (who, until when) when a cell shown is booked or claimed."""
    instances_of: dict[str, set[str]] = {}
    for g in gpus:
        instances_of.setdefault(g.host, set()).add(g.instance)
    reserved = any(g.reservation is not None or g.claim is not None for g in gpus)
    header = ("HOST", "GPU", "STATE", "USERS", "MODEL", "MEMORY", "UTIL") + \
        (("RESERVATION",) if reserved else ())
    rows: list[tuple[str, ...]] = []
    previous = None
    for g in gpus:
        node = g.host if len(instances_of[g.host]) == 1 else g.instance
        rows.append((node if node != previous else "", str(g.cell), _state_text(g, now),
                     _users_text(g), g.display_name or "-", _memory_text(g), _util_text(g))
                    + ((_reservation_text(g),) if reserved else ()))
        previous = node
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 5, 6}  # numbers

    def line(cells: tuple[str, ...], state: str | None = None) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            text = cell.rjust(width) if i in right else cell.ljust(width)
            if i == 2 and state is not None and colour:
                text = _paint(text, state)
            out.append(text)
        return "  ".join(out).rstrip() + "\n"

    return line(header) + "".join(line(r, g.state) for r, g in zip(rows, gpus, strict=True))


def summary(fleet: Sequence[GpuStatus]) -> str:
    """What the grid holds, cell by cell: 3 GPUs on 1 host: ..., or, with MIG slices, 1 GPU and
    10 MIG slices on 1 host: ... (the states counted over every cell)."""
    hosts = len({g.instance for g in fleet})
    counts = [f"{sum(g.state == s.name for g in fleet)} {s.name}" for s in states.ALL
              if any(g.state == s.name for g in fleet)]
    slices = sum(g.gpu_instance_id is not None for g in fleet)
    whole = len(fleet) - slices
    cells = f"{whole} GPU{'' if whole == 1 else 's'}" + (
        f" and {slices} MIG slice{'' if slices == 1 else 's'}" if slices else "")
    return (f"{cells} on {hosts} host{'' if hosts == 1 else 's'}: "
            f"{', '.join(counts) or 'none'}")


def _state_text(g: GpuStatus, now: float) -> str:
    if g.state == states.IDLE.name and g.inactive_since is not None:
        return f"{g.state} {duration(now - g.inactive_since)}"
    return g.state


def _reservation_text(g: GpuStatus) -> str:
    texts = ([g.reservation.text] if g.reservation else []) + ([g.claim.text] if g.claim else [])
    return "; ".join(texts) or "-"


def _users_text(g: GpuStatus) -> str:
    if g.users:
        return ",".join(g.users)
    # held, but by no process the exporter could see (another PID namespace)
    return "?" if g.state in (states.BUSY.name, states.IDLE.name) else "-"


def _memory_text(g: GpuStatus) -> str:
    if g.memory_used_bytes is None or g.memory_total_bytes is None:
        return "-"
    return f"{g.memory_used_bytes / GIB:.1f}/{g.memory_total_bytes / GIB:.1f} GiB"


def _util_text(g: GpuStatus) -> str:
    return "-" if g.utilization_ratio is None else f"{g.utilization_ratio * 100:.0f}%"


def _paint(text: str, state: str) -> str:
    known = states.BY_NAME.get(state)
    code = _ANSI.get(known.colour) if known else None
    return f"\033[{code}m{text}\033[0m" if code else text


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h05m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


COMMAND = Command("status", "the fleet: every GPU with its state, users, memory and utilisation",
                  _arguments, _run)
