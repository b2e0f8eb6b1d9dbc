"""The errors of reservations: one line each, and a kind the service answers with its status.

Every one is a ReservationError (a ValueError), so a caller that only prints the line catches
that; `gpuwatch serve` tells them apart: a plain ReservationError is bad input (400),
NotFound an unknown id (404), Conflict a GPU someone has at that time (409), FileProblem a
reservations file, lock or audit log that cannot be read or written (the request is not at
fault; the file is unchanged).
"""

from __future__ import annotations


class ReservationError(ValueError):
    """A reservation or a reservations file that cannot be used; the message is one line."""


class NotFound(ReservationError):
    """No reservation has that id."""


class Conflict(ReservationError):
    """A GPU of the reservation is booked by another one at the same time."""


class FileProblem(ReservationError):
    """The reservations file (or its lock, or its audit log) cannot be read or written, or
    holds what gpuwatch cannot use; nothing was changed."""
