# The two commands of the README: `make demo` and `make test`. Everything they need is set up here.
# One venv, two stamps: `make demo` (and the benchmarks) install the package with its runtime
# dependencies only; `make test` adds the test extra (pytest, ruff, mypy, Ansible, Grafana's SDK).
VENV    ?= .venv
PY      := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test
# Grafana's frontend data code (@grafana/data) that tests/e2e/test_grafana.py runs on the grid.
GRAFANA_JS := tests/grafana_frontend/node_modules/.installed
# axe-core (pinned in tests/browser/package-lock.json), which tests/browser runs in the page.
BROWSER_JS := tests/browser/node_modules/.installed
# Playwright drives Debian's Chromium (scripts/ensure-chromium) and never fetches a browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
PYTHON3 ?= python3

.PHONY: test unit lint demo bench bench-soak bench-fleet bench-reservations bench-page screenshots prometheus alertmanager chromium systemd-analyze victoria-metrics proxies gcc clean

$(PY):
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TESTING): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(RUNTIME)

$(GRAFANA_JS): tests/grafana_frontend/package.json tests/grafana_frontend/package-lock.json
	@scripts/ensure-node
	cd tests/grafana_frontend && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(BROWSER_JS): tests/browser/package.json tests/browser/package-lock.json
	@scripts/ensure-node
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error
	touch $@

prometheus:
	@scripts/ensure-prometheus

alertmanager:
	@scripts/ensure-alertmanager

chromium:
	@scripts/ensure-chromium

systemd-analyze:
	@scripts/ensure-systemd-analyze

victoria-metrics:
	@scripts/ensure-victoria-metrics

proxies:
	@scripts/ensure-proxies

gcc:
	@scripts/ensure-gcc

lint: $(TESTING)
	$(VENV)/bin/ruff check src tools tests
	$(VENV)/bin/mypy

# pytest-xdist runs the test files on TEST_WORKERS processes, each file (and its module
# fixtures) on one of them; tests/conftest.py collects the slow folders first and
# --no-loadscope-reorder keeps that order, so the Ansible deployment overlaps the tests that
# wait on Prometheus. `make test TEST_WORKERS=0` runs everything in one process.
TEST_WORKERS ?= 2
test: $(TESTING) $(GRAFANA_JS) $(BROWSER_JS) prometheus alertmanager chromium systemd-analyze victoria-metrics proxies gcc lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The fast loop: the unit and golden tests with the venv alone (no apt, no npm); the tests
# that ask for an apt-installed program (tests/conftest.py marks them apt) are left out.
unit: $(TESTING)
	$(VENV)/bin/pytest -q -m "not apt" tests/unit tests/golden

demo: $(RUNTIME) prometheus alertmanager
	$(PY) -m tools.demo

bench: $(RUNTIME)
	$(PY) -m tools.bench

# 10,000 scrapes of an exporter process on the fake libnvidia-ml (gcc), with process churn
bench-soak: $(RUNTIME) gcc
	$(PY) -m tools.bench_soak

bench-fleet: $(RUNTIME) prometheus
	$(PY) -m tools.bench_fleet

# load, list, add and release at 1,000 and 10,000 bookings of the reservations file
bench-reservations: $(RUNTIME)
	$(PY) -m tools.bench_reservations

# the lab's page of a synthetic 1,000-GPU fleet in Chromium: first render and a re-render
bench-page: $(TESTING) chromium
	$(PY) -m tools.bench_page

# docs/screenshots/grid-{light,dark,phone}.png of the page over a demo-like fleet
screenshots: $(TESTING) prometheus chromium
	$(PY) -m tools.screenshots

clean:
	rm -rf $(VENV) .demo .bench build dist src/*.egg-info tests/grafana_frontend/node_modules tests/browser/node_modules
