"""The availability states of a GPU, defined once: name, code, colour.

Prometheus computes the state of every cell, a whole GPU or a MIG slice
(prometheus/rules/state.yml), and publishes it in two recording rules:
``instance_gpu:gpuwatch_state:info`` (one series per cell, value 1, with the labels
``state``, ``users``, ``model`` and, for a booked cell, ``reservation``, for a claimed one
``claim``; a slice's ``gpu`` is its cell text "0/7", with ``gpu_instance_id``, ``profile``
and ``mig_uuid``; a MIG-enabled GPU has none) and
``instance_gpu:gpuwatch_state:code`` (one series per cell whose value is the state's code,
for panels that colour by value). The CLI, the dashboards' checks and the tests read the names
and codes from here; tests keep the rules and the table of docs/prometheus.md ("GPU states",
which says what each state means) in step with this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class State:
    name: str
    """The value of the ``state`` label and of ``gpuwatch status --json``."""
    code: int
    """The value of ``instance_gpu:gpuwatch_state:code``."""
    colour: str
    """A colour name that both Grafana and the terminal grid know."""


FREE = State("free", 0, "green")
BUSY = State("busy", 1, "yellow")
IDLE = State("idle", 2, "purple")
RESERVED = State("reserved", 3, "blue")
DOWN = State("down", 4, "red")
CLAIMED = State("claimed", 5, "orange")
"""Held for ``gpuwatch run`` (a claim of ``gpuwatch serve``) and not yet used."""

ALL: tuple[State, ...] = (FREE, BUSY, IDLE, CLAIMED, RESERVED, DOWN)
"""Every state, in the order docs/prometheus.md lists them (its table says which state wins
where two apply: a claimed GPU that is held is busy or idle, a booked one claimed, down any)."""
BY_NAME: dict[str, State] = {s.name: s for s in ALL}

ALL_GPUS = "all"
"""A reservation of every GPU of a host: how people write it (``gpuwatch reserve host:all``,
``gpus: all`` in the reservations file) and the value of the ``gpu`` label of its series
(``nvidia_gpu_reservation_end_timestamp_seconds``, which rules/state.yml matches; a booking
of some cells has the cell's text there, "0" or "0/7")."""

JOB = "gpuwatch"
"""The scrape job of the exporters in prometheus/prometheus.yml."""
RESERVATIONS_JOB = "gpuwatch-reservations"
"""The scrape job of the reservations endpoint in prometheus/prometheus.yml."""

# The recording rules that the CLI and the grid read (prometheus/rules/state.yml).
STATE_INFO = "instance_gpu:gpuwatch_state:info"
STATE_CODE = "instance_gpu:gpuwatch_state:code"
INACTIVE_SINCE = "instance_gpu:gpuwatch_inactive_since:timestamp_seconds"
RESERVED_UNTIL = "instance_gpu:gpuwatch_reserved_until:timestamp_seconds"
CLAIMED_UNTIL = "instance_gpu:gpuwatch_claimed_until:timestamp_seconds"
