"""What Prometheus itself adds to what the exporters send."""

from __future__ import annotations

SCRAPE_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped",
                 "scrape_samples_post_metric_relabeling", "scrape_series_added")
"""The series Prometheus records for every target on every scrape, whatever the target
answers (Prometheus docs, "Jobs and instances": automatically generated labels and time
series). The rules and dashboards may read them beside the exporter's metrics; the fleet
benchmark counts them per target."""
