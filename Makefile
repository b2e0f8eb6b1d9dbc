# The two commands of the README: `make demo` and `make test`. Everything they need is set up here.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Grafana's frontend data code (@grafana/data) that tests/test_grafana.py runs on the grid.
GRAFANA_JS := tests/grafana_frontend/node_modules/.installed
PYTHON3 ?= python3

.PHONY: test lint demo bench bench-soak bench-fleet prometheus systemd-analyze victoria-metrics proxies gcc clean

$(STAMP): pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(GRAFANA_JS): tests/grafana_frontend/package.json tests/grafana_frontend/package-lock.json
	@scripts/ensure-node
	cd tests/grafana_frontend && npm ci --no-audit --no-fund --loglevel=error
	touch $@

prometheus:
	@scripts/ensure-prometheus

systemd-analyze:
	@scripts/ensure-systemd-analyze

victoria-metrics:
	@scripts/ensure-victoria-metrics

proxies:
	@scripts/ensure-proxies

gcc:
	@scripts/ensure-gcc

lint: $(STAMP)
	$(VENV)/bin/ruff check src tools tests
	$(VENV)/bin/mypy

test: $(STAMP) $(GRAFANA_JS) prometheus systemd-analyze victoria-metrics proxies gcc lint
	$(VENV)/bin/pytest -q

demo: $(STAMP) prometheus
	$(PY) -m tools.demo

bench: $(STAMP)
	$(PY) -m tools.bench

# 10,000 scrapes of an exporter process on the fake libnvidia-ml (gcc), with process churn
bench-soak: $(STAMP) gcc
	$(PY) -m tools.bench_soak

bench-fleet: $(STAMP) prometheus
	$(PY) -m tools.bench_fleet

clean:
	rm -rf $(VENV) .demo .bench build dist src/*.egg-info tests/grafana_frontend/node_modules
