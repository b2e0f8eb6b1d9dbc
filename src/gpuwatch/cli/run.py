"""`gpuwatch run -n N [--host H] [--model M] [--minutes M] [--wait DURATION] -- CMD ARGS...`:
claim N free GPUs of this machine through gpuwatch serve, run CMD on them, end the claim.

The claim (POST /api/v1/claims) holds the GPUs for the caller until CMD's processes show up on
them, so two jobs started at once never get the same GPU (which `pick` cannot promise).
CUDA_VISIBLE_DEVICES names the GPUs by UUID (a MIG slice, claimed one per process, by its
MIG UUID); CMD runs as a child (not through a shell) and gets the SIGINT, SIGTERM and SIGHUP
sent to gpuwatch; the claim is deleted when CMD ends; gpuwatch exits with CMD's status (128 +
the signal's number when a signal killed it, as shells say). Without --wait, no claim is one
line and exit 1 at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gpuwatch import reservations
from gpuwatch.argtypes import positive_int
from gpuwatch.cells import Cell
from gpuwatch.cli import client
from gpuwatch.cli.common import PROG, Command, UserError
from gpuwatch.fleet import local_names

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RETRY_SECONDS = 2.0
"""How often --wait asks again."""
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds of 90, 90s, 5m, 1h30m, 2d."""
    parts = re.fullmatch(r"\s*((\d+(\.\d+)?)([smhd])\s*)+\s*", text)
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*", text):
        return float(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (90, 90s, 5m, 1h30m)")
    return sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smhd])", text))


def _arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("%(prog)s [-h] -n N [--host NAME] [--model MODEL] [--minutes M] "
               "[--wait DURATION] [--server URL] -- CMD [ARGS...]")
    p.add_argument("-n", "--count", type=positive_int, required=True, metavar="N",
                   help="how many GPUs (a MIG slice only for 1: CUDA runs one per process)")
    p.add_argument("--host", metavar="NAME",
                   help="the host as the fleet names it; default: this machine, by its host "
                   "names")
    p.add_argument("--model", metavar="MODEL",
                   help="only GPUs of this model, or MIG slices of this profile (1g.10gb)")
    p.add_argument("--minutes", type=positive_int, metavar="M",
                   help="how long the claim holds the GPUs if CMD does not start using them "
                   "(default: the service's, 5)")
    p.add_argument("--wait", type=duration, metavar="DURATION",
                   help="while no GPUs are free, ask again until DURATION has passed (90s, "
                   "10m, 1h); default: give up at once")
    client.server_arguments(p)
    p.add_argument("command", nargs="+", metavar="CMD",
                   help="the command to run on the GPUs, after --")


@dataclass(frozen=True)
class Claim:
    id: str
    host: str
    gpus: tuple[Cell, ...]
    """Whole GPUs, or one MIG slice."""
    uuids: tuple[str, ...]
    """What CUDA_VISIBLE_DEVICES takes: GPU UUIDs, or a slice's MIG UUID."""
    user: str
    until: dt.datetime

    def __post_init__(self) -> None:
        # indices given as numbers are whole GPUs
        object.__setattr__(self, "gpus", tuple(
            c if isinstance(c, Cell) else Cell(c) for c in self.gpus))

    @classmethod
    def from_api(cls, raw: Any, url: str) -> Claim:
        try:
            claim = cls(id=str(raw["id"]), host=str(raw["host"]),
                        gpus=tuple(Cell.from_json(i) for i in raw["gpus"]),
                        uuids=tuple(str(u) for u in raw["uuids"]), user=str(raw["user"]),
                        until=dt.datetime.fromisoformat(raw["until"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            claim = None
        if claim is None or not claim.uuids or len(claim.uuids) != len(claim.gpus):
            raise client.ServiceError(f"gpuwatch serve at {url} answered a claim the client "
                                      "cannot read (id, host, gpus, uuids, user, until)")
        return claim

    def describe(self) -> str:
        cells = ",".join(map(str, self.gpus))
        which = f"slice {cells}" if any(c.is_slice for c in self.gpus) else \
            f"GPU{'s' if len(self.gpus) > 1 else ''} {cells}"
        return f"{which} of {self.host} for {self.user} until {reservations.short(self.until)}"


def this_host(service: client.Service) -> str:
    """The host name the fleet knows this machine by (the first of its names that is a host or
    an instance there, as `pick` finds it)."""
    answer = service.get("/api/v1/fleet")
    gpus = answer.get("gpus") if isinstance(answer, dict) else None
    if not isinstance(gpus, list):
        raise client.ServiceError(f"{service.url}/api/v1/fleet did not answer a list of GPUs; "
                                  "is it gpuwatch serve?")
    known = [(str(g.get("host", "")), str(g.get("instance", ""))) for g in gpus
             if isinstance(g, dict)]
    names = local_names(service.url)
    for name in names:
        for host, instance in known:
            if name.lower() in (host.lower(), instance.lower()):
                return host
    hosts = sorted({h for h, _ in known})
    raise UserError(f"{' / '.join(names) or 'this host'} is not among the hosts of the fleet "
                    f"({', '.join(hosts) or 'none'}); pass --host")


def claim(service: client.Service, body: Mapping[str, Any], wait: float | None,
          clock: Callable[[], float] | None = None,
          sleep: Callable[[float], None] | None = None) -> Claim:
    """The claim of `body`; a refusal (409) is asked again until `wait` seconds have passed."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    deadline = clock() + (wait or 0)
    while True:
        try:
            return Claim.from_api(service.post("/api/v1/claims", dict(body)), service.url)
        except client.ServiceError as e:
            left = deadline - clock()
            if e.status != 409 or left <= 0:
                if e.status == 409 and wait:
                    raise client.ServiceError(f"{e} (still, after waiting {wait:g} s)",
                                              e.status) from None
                raise
            sleep(min(RETRY_SECONDS, left))


def run_child(command: Sequence[str], env: Mapping[str, str]) -> int:
    """CMD's exit status (128 + signal when a signal ended it; 127 not found, 126 not
    runnable, as shells say), forwarding SIGINT, SIGTERM and SIGHUP sent to us.

    Those signals are blocked and taken with sigtimedwait, so none is lost between starting
    the child and waiting for it. One from the terminal (Ctrl-C) has reached the child
    already, as the foreground process group's, and is not sent twice; one sent by a process
    (kill PID) is forwarded."""
    watched = {*FORWARDED, signal.SIGCHLD}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            child = subprocess.Popen(list(command), env=dict(env),
                                     preexec_fn=lambda: signal.pthread_sigmask(
                                         signal.SIG_SETMASK, before))
        except FileNotFoundError:
            print(f"{PROG}: error: {command[0]}: command not found", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"{PROG}: error: {command[0]}: permission denied", file=sys.stderr)
            return 126
        while (code := child.poll()) is None:
            got = signal.sigtimedwait(watched, 1.0)
            if got is not None and got.si_signo in FORWARDED and got.si_code <= 0:
                child.send_signal(got.si_signo)  # si_code <= 0: sent by a process, not a tty
    finally:
        # what stayed pending of ours (e.g. a second Ctrl-C at the very end) is dropped
        while signal.sigtimedwait(watched, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return 128 - code if code < 0 else code


def _run(args: argparse.Namespace, out: TextIO) -> int:
    service = client.service(args)
    body: dict[str, Any] = {"count": args.count, "host": args.host or this_host(service)}
    if args.model:
        body["model"] = args.model
    if args.minutes:
        body["minutes"] = args.minutes
    try:
        held = claim(service, body, args.wait)
    except KeyboardInterrupt:  # Ctrl-C while waiting for GPUs: no traceback, as shells exit
        return 128 + signal.SIGINT
    try:
        print(f"{PROG}: claimed {held.describe()} ({held.id})", file=sys.stderr)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(held.uuids))
        return run_child(args.command, env)
    except KeyboardInterrupt:  # before the command started
        return 128 + signal.SIGINT
    finally:
        end_claim(service, held)


def end_claim(service: client.Service, held: Claim) -> None:
    """DELETE the claim; gone already (ended by time or by use: 404) is fine, any other
    failure is one line (the claim then ends by its time)."""
    try:
        service.delete(f"/api/v1/claims/{held.id}")
    except client.ServiceError as e:
        if e.status != 404:
            print(f"{PROG}: warning: the claim {held.id} stays until "
                  f"{reservations.short(held.until)}: {e}", file=sys.stderr)


COMMAND = Command("run", "claim N free GPUs of this host through gpuwatch serve, run a command "
                  "on them (CUDA_VISIBLE_DEVICES), end the claim with it", _arguments, _run)
