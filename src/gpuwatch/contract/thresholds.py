"""The names of the threshold recording rules (prometheus/rules/thresholds.yml).

Each threshold is a recording rule that publishes a constant; its value is set in that file
alone and read from Prometheus by the state rules, the alerts, the dashboards and the tools.
Code names a threshold through these constants; tests/rules/test_facts.py checks that
thresholds.yml records exactly these and that no rule, test, dashboard or doc names another.
"""

from __future__ import annotations

HELD_MEMORY = "gpuwatch:threshold_held_memory_bytes:constant"
"""At or above this much device memory allocated a GPU is held."""
IDLE_UTILIZATION = "gpuwatch:threshold_idle_utilization_ratio:constant"
"""Utilisation below this counts as no work."""
IDLE_DURATION = "gpuwatch:threshold_idle_duration_seconds:constant"
"""A held GPU without work for this long is idle."""
TEMPERATURE_MARGIN = "gpuwatch:threshold_temperature_margin_celsius:constant"
"""GpuTemperatureHigh: this close to the GPU's own slowdown temperature."""
TEMPERATURE_HIGH = "gpuwatch:threshold_temperature_high_celsius:constant"
"""GpuTemperatureHigh for GPUs that report no slowdown temperature."""
RESERVATION_ENDING = "gpuwatch:threshold_reservation_ending_seconds:constant"
"""GpuReservationEndingSoon: a reservation ending within this time is announced."""

ALL: tuple[str, ...] = (HELD_MEMORY, IDLE_UTILIZATION, IDLE_DURATION, TEMPERATURE_MARGIN,
                        TEMPERATURE_HIGH, RESERVATION_ENDING)
"""In the order of thresholds.yml."""
