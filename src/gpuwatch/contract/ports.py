"""The ports gpuwatch listens on and reads from, defined once (the Ansible roles' defaults and
prometheus.yml are checked against these by the tests)."""

EXPORTER_PORT = 9839
"""gpuwatch-exporter on every GPU node. Not taken by the well-known GPU exporters
(dcgm-exporter 9400, nvidia_gpu_exporter 9835)."""

RESERVATIONS_PORT = EXPORTER_PORT + 1
"""The reservations endpoint on the monitoring host (bound to 127.0.0.1 beside Prometheus)."""

PROMETHEUS_URL = "http://localhost:9090"
"""Where the `gpuwatch` command looks for Prometheus when neither --prometheus nor
GPUWATCH_PROMETHEUS says."""

ALERTMANAGER_PORT = 9093
"""Alertmanager on the monitoring host (Prometheus' `alerting:` and its self-scrape job)."""
