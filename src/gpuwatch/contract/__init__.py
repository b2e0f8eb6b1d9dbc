"""The facts everyone reads, defined once: the exporter, the CLI, the tools, the docs' checks
and the tests import them from here instead of spelling them out.

- `metrics`: every series gpuwatch-exporter serves (name, type, help, labels);
- `states`: the availability states (name, code, colour), the scrape job names, the
  recording rules the CLI reads and the "all GPUs" value of a reservation;
- `thresholds`: the names of the threshold rules of prometheus/rules/thresholds.yml;
- `prometheus`: the series Prometheus adds to every target itself;
- `ports`: the exporter's and the reservations endpoint's ports, Prometheus's default URL.

tests/rules checks the rule files, the provisioning and the docs against these modules.
"""
