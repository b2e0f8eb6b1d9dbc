"""The availability states of a GPU, defined once: name, code, meaning, colour.

Prometheus computes the state of every GPU (prometheus/rules/state.yml) and publishes it in
two recording rules: ``instance_gpu:gpuwatch_state:info`` (one series per GPU, value 1, with
the labels ``state``, ``users``, ``model`` and, for a booked GPU, ``reservation``) and
``instance_gpu:gpuwatch_state:code`` (one series per GPU whose value is the state's code, for
panels that colour by value). The CLI,
the docs, the dashboards' checks and the tests read the names and codes from here; a test
keeps the rules in step with this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class State:
    name: str
    """The value of the ``state`` label and of ``gpuwatch status --json``."""
    code: int
    """The value of ``instance_gpu:gpuwatch_state:code``."""
    meaning: str
    colour: str
    """A colour name that both Grafana and the terminal grid know."""


FREE = State("free", 0, "answered this scrape: no process on it, less memory allocated than "
             "the held threshold", "green")
BUSY = State("busy", 1, "held: processes on it, or memory allocated at or above the held "
             "threshold; a booked GPU that its holder uses, even without work", "yellow")
IDLE = State("idle", 2, "held, but no work (utilisation below the idle threshold) for the "
             "idle duration", "purple")
RESERVED = State("reserved", 3, "booked (gpuwatch reserve) and not used by whoever booked it "
                 "(a GPU its holder uses is busy)", "blue")
DOWN = State("down", 4, "no fresh reading: the target is down, NVML is unavailable, the GPU is "
             "lost, hung or missing, or the series that tell held from free are not there; a "
             "booked GPU too", "red")

ALL: tuple[State, ...] = (FREE, BUSY, IDLE, RESERVED, DOWN)
BY_NAME: dict[str, State] = {s.name: s for s in ALL}
BY_CODE: dict[int, State] = {s.code: s for s in ALL}

JOB = "gpuwatch"
"""The scrape job of the exporters in prometheus/prometheus.yml."""
RESERVATIONS_JOB = "gpuwatch-reservations"
"""The scrape job of the reservations endpoint in prometheus/prometheus.yml."""

# The recording rules that the CLI and the grid read (prometheus/rules/state.yml).
STATE_INFO = "instance_gpu:gpuwatch_state:info"
STATE_CODE = "instance_gpu:gpuwatch_state:code"
INACTIVE_SINCE = "instance_gpu:gpuwatch_inactive_since:timestamp_seconds"
RESERVED_UNTIL = "instance_gpu:gpuwatch_reserved_until:timestamp_seconds"
