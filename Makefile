# The two commands of the README: `make demo` and `make test`. Everything they need is set up here.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON3 ?= python3

.PHONY: test lint demo bench bench-fleet prometheus systemd-analyze victoria-metrics clean

$(STAMP): pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

prometheus:
	@scripts/ensure-prometheus

systemd-analyze:
	@scripts/ensure-systemd-analyze

victoria-metrics:
	@scripts/ensure-victoria-metrics

lint: $(STAMP)
	$(VENV)/bin/ruff check exporter tests
	$(VENV)/bin/mypy

test: $(STAMP) prometheus systemd-analyze victoria-metrics lint
	$(VENV)/bin/pytest -q

demo: $(STAMP) prometheus
	$(PY) -m gpuwatch.demo

bench: $(STAMP)
	$(PY) -m gpuwatch.bench

bench-fleet: $(STAMP) prometheus
	$(PY) -m gpuwatch.bench_fleet

clean:
	rm -rf $(VENV) .demo .bench build dist exporter/*.egg-info
