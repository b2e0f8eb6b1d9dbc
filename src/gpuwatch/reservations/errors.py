"""The one error of reservations: a reservation or a reservations file that cannot be used."""

from __future__ import annotations


class ReservationError(ValueError):
    """A reservation or a reservations file that cannot be used; the message is one line."""
